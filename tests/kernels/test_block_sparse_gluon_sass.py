"""The Hopper Gluon kernels (forward, backward dK/dV) compiled for sm_90 on this (GPU-less) machine: they must build
with the installed Triton, without register spills, inside the shared-memory limit, with the warp-specialised
register split, and keep two products in flight together (the overlap they exist for). Running them is tests/gpu's
job (test_gpu_kernels.py)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch
import triton

SM90_SHARED_LIMIT = 232448  # bytes of dynamic shared memory one block may use on sm_90


def _cuobjdump() -> str:
    import triton.backends.nvidia as nv

    path = os.path.join(nv.__path__[0], "bin", "cuobjdump")
    if not os.path.exists(path):
        pytest.skip("this Triton wheel ships no cuobjdump")
    return path


def _compile(kernel: str, dtype: torch.dtype, head_dim: int):
    """triton.compile for sm_90 of the forward ("fwd"), dK/dV ("dkdv") or dQ ("dq") kernel with the launch's own
    signature and constants."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from longattn.kernels import block_sparse_gluon as kbg
    from longattn.kernels import block_sparse_gluon_bwd as kbgb

    x = torch.zeros(1, 1, 256, head_dim, dtype=dtype)

    def desc(rows: int) -> str:
        return mangle_type(kbg.descriptor(x, rows))

    fn = {"fwd": kbg._fwd_ws_kernel, "dkdv": kbgb._bwd_dkdv_ws_kernel, "dq": kbgb._bwd_dq_ws_kernel}[kernel]
    sig = dict.fromkeys(fn.arg_names, "i32")
    sig.update(LSE="*fp32", IDX="*i32", CNT="*i32", FULL="*i32", TID="*i32", TILES="*i32", qk_scale="fp32")
    if kernel == "fwd":
        sig.update(desc_q=desc(kbg.BLOCK // 2), desc_o=desc(kbg.BLOCK // 2), desc_k=desc(kbg.BLOCK),
                   desc_v=desc(kbg.BLOCK), BLOCK_Q="constexpr", NSLOT="constexpr")
        consts = {"BLOCK_Q": kbg.BLOCK, "NSLOT": kbg.STAGES}
    elif kernel == "dq":
        sig.update(desc_q=desc(kbg.BLOCK // 2), desc_do=desc(kbg.BLOCK // 2), desc_dq=desc(kbg.BLOCK // 2),
                   desc_k=desc(kbg.BLOCK), desc_v=desc(kbg.BLOCK), DELTA="*fp32", sm_scale="fp32",
                   NSLOT="constexpr")
        consts = {"NSLOT": kbgb.DQ_SLOTS}
    else:
        sig.update({n: desc(kbgb.KV_ROWS) for n in ("desc_k", "desc_v", "desc_dk", "desc_dv")})
        sig.update({n: desc(kbgb.Q_ROWS[head_dim]) for n in ("desc_q", "desc_do")})
        sig.update(DELTA="*fp32", sm_scale="fp32", NS="constexpr")
        consts = {"NS": kbgb.SLOTS}
    return triton.compile(GluonASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4})


CONFIGS = {"fwd-bf16-d128": ("fwd", torch.bfloat16, 128), "fwd-fp16-d64": ("fwd", torch.float16, 64),
           "dkdv-bf16-d128": ("dkdv", torch.bfloat16, 128), "dkdv-fp16-d64": ("dkdv", torch.float16, 64),
           "dq-bf16-d128": ("dq", torch.bfloat16, 128), "dq-fp16-d64": ("dq", torch.float16, 64)}


def report() -> None:
    """Compile every config and print what the test checks, as JSON (run in a subprocess, see below)."""
    import json
    import tempfile

    out = {}
    for name, (which, dtype, head_dim) in CONFIGS.items():
        kernel = _compile(which, dtype, head_dim)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        out[name] = {
            "spills": bool(re.search(r"\b(LDL|STL)\b", sass)),
            "shared": kernel.metadata.shared,
            "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
            "overlap": "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass,
            "producer_regs": bool(re.search(r"SETMAXREG\.DEALLOC\S* 0x18\b", sass)),
            "consumer_regs": sorted(set(re.findall(r"SETMAXREG\.TRY_ALLOC\S* UP\d, (0x[0-9a-f]+)\b", sass))),
        }
    print(json.dumps(out))


@pytest.fixture(scope="module")
def compiled() -> dict:
    """The report from a fresh interpreter without TRITON_INTERPRET: under the interpreter (as the rest of the
    suite runs) triton.language's own jit helpers are interpreted functions the compiler cannot inline."""
    import json
    import sys

    _cuobjdump()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-c", "from tests.kernels.test_block_sparse_gluon_sass import report; "
                          "report()"], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("fwd")])
def test_gluon_forward_compiles_for_hopper(compiled, name):
    got, head_dim = compiled[name], CONFIGS[name][2]
    assert not got["spills"], "register spills to local memory"
    assert got["shared"] <= SM90_SHARED_LIMIT
    # two consumers x (first Q @ K^T, loop Q @ K^T, loop P @ V, last P @ V): head_dim/16 or 128/16 wgmmas each
    assert got["hgmma"] == 2 * (2 * (head_dim // 16) + 2 * (128 // 16))
    # the loop waits for Q @ K^T with P @ V still in flight: a wait that leaves one wgmma group outstanding
    assert got["overlap"]
    # warp specialisation happened: the producer warp gives registers up, the second consumer takes 232
    assert got["producer_regs"] and hex(232) in got["consumer_regs"]


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("dkdv")])
def test_gluon_dkdv_compiles_for_hopper(compiled, name):
    from longattn.kernels.block_sparse_gluon_bwd import Q_ROWS

    got, head_dim = compiled[name], CONFIGS[name][2]
    assert not got["spills"], "register spills to local memory"
    assert got["shared"] <= SM90_SHARED_LIMIT
    # two consumers x (S^T = K Q^T and dP^T = V dO^T: head_dim/16 wgmmas each; dV and dK: query rows/16 each)
    assert got["hgmma"] == 2 * (2 * (head_dim // 16) + 2 * (Q_ROWS[head_dim] // 16))
    # S^T is waited for with dP^T still in flight
    assert got["overlap"]
    # the producer (default partition) gives registers up; both consumers take 240
    assert got["producer_regs"] and hex(240) in got["consumer_regs"]


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("dq")])
def test_gluon_dq_compiles_for_hopper(compiled, name):
    got, head_dim = compiled[name], CONFIGS[name][2]
    assert not got["spills"], "register spills to local memory"
    assert got["shared"] <= SM90_SHARED_LIMIT
    # two consumers x (S = Q Kᵀ and dP = dO Vᵀ: head_dim/16 wgmmas each; dQ += dS K: 128/16)
    assert got["hgmma"] == 2 * (2 * (head_dim // 16) + 128 // 16)
    assert got["overlap"]  # S is waited for with dP still in flight
    assert got["producer_regs"] and hex(240) in got["consumer_regs"]
