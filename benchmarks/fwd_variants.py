"""Forward-kernel experiments (issue 2: forward >= 1.2x FlexAttention): variants of the TMA forward's full-block
loop on one GPU call, each checked against the production kernel and timed beside it and compiled FlexAttention.

Variants (constexpr switches of one experimental kernel; the partial-block loop is the production one):
  ROWS=64   each 128-row query block split over two 4-warp programs of 64 rows (two programs per SM with one
            K/V stage each, scheduled independently: no shared barrier keeps their softmax and MMA phases aligned)
  COLS=64   each 128-key block walked as two 64-key steps (half the S tile per step; FlexAttention's block width)
  EXP=1     odd columns' exp2 on the FMA/ALU pipes (Cody-Waite split + degree-3 polynomial, rel. err 1e-4),
            even columns on the MUFU unit (FA4's split of the exponentials between the two pipes)
  LAZY      the running max is only raised (and acc rescaled) when some row's max grew by more than 2^8,
            a program-uniform branch (FA4's conditional rescaling at tile granularity)
Usage: fwd_variants.py [SEQ] [PATTERNS] [VARIANTS] [noflex]; `aot` as the only argument compiles every variant
for sm_90 on a CPU machine and prints registers / spills / HGMMA and wait counts instead.
Notes: benchmarks/NOTES-kernels.md."""

import sys

import torch
import triton
import triton.language as tl

from longattn.kernels import block_sparse as kbs


@triton.jit
def _exp2_fma(x):
    """2^x for x <= 0 without the MUFU unit: round x to an integer n with the 1.5 * 2^23 trick, 2^(x - n) by a
    degree-3 minimax polynomial on [-0.5, 0.5] (max relative error 1.0e-4), n added to the exponent bits."""
    x = tl.maximum(x, -126.0)
    t = x + 12582912.0
    f = x - (t - 12582912.0)
    p = 0.05500858277082443 * f + 0.24221037328243256
    p = p * f + 0.6932829022407532
    p = p * f + 1.0
    n = t.to(tl.int32, bitcast=True) << 23
    return (p.to(tl.int32, bitcast=True) + n).to(tl.float32, bitcast=True)


@triton.jit
def _exp2(x, EXP: tl.constexpr):
    """exp2 of a [rows, cols] tile: MUFU (0), MUFU / polynomial split by column parity (1)."""
    if EXP == 1:
        ROWS: tl.constexpr = x.shape[0]
        COLS: tl.constexpr = x.shape[1]
        xa, xb = tl.split(tl.reshape(x, [ROWS, COLS // 2, 2]))
        return tl.reshape(tl.join(tl.math.exp2(xa), _exp2_fma(xb)), [ROWS, COLS])
    else:
        return tl.math.exp2(x)


@triton.jit
def _update(s, m_i, l_i, acc, v, qk_scale, LAZY: tl.constexpr, EXP: tl.constexpr):
    """One full block's online-softmax step on raw scores s; returns (m, l, acc)."""
    if LAZY:
        m_cand = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if tl.max(m_cand - m_i, 0) > 8.0:
            alpha = tl.math.exp2(m_i - m_cand)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_cand
        p = _exp2(s * qk_scale - m_i[:, None], EXP)
        l_i = l_i + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = _exp2(s * qk_scale - m_new[:, None], EXP)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _fwd_var_kernel(
    desc_q, desc_k, desc_v, desc_o, LSE, s_lb, s_lh,
    IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch,
    qk_scale, H, GROUP, SEQ_Q, N_QB,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, HEAD_DIM: tl.constexpr, DTYPE_KEY: tl.constexpr,
    LAZY: tl.constexpr, EXP: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """The production _fwd_tma_kernel with the full-block loop's softmax switched by LAZY / EXP, ROWS query rows
    per program and COLS keys per step."""
    WORDS: tl.constexpr = BLOCK_KV // 32
    STEPS: tl.constexpr = BLOCK_KV // COLS
    SUB: tl.constexpr = BLOCK_Q // ROWS
    pid_m = N_QB - 1 - tl.program_id(0) // SUB
    r0 = (tl.program_id(0) % SUB) * ROWS
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q0 = pid_m * BLOCK_Q + r0
    offs_m = tl.arange(0, ROWS)
    q = kbs._tile(desc_q, b, h, q0, ROWS, HEAD_DIM)
    row = b.to(tl.int64) * s_ib + h * s_ih + pid_m * s_im
    crow = b.to(tl.int64) * s_cb + h * s_ch + pid_m
    n_full = tl.load(FULL + crow)
    n_all = tl.load(CNT + crow)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for j in range(0, n_full):
        for t in tl.static_range(STEPS):
            k0 = tl.load(IDX + row + j) * BLOCK_KV + t * COLS
            s = tl.dot(q, tl.trans(kbs._tile(desc_k, b, hk, k0, COLS, HEAD_DIM)))
            v = kbs._tile(desc_v, b, hk, k0, COLS, HEAD_DIM)
            m_i, l_i, acc = _update(s, m_i, l_i, acc, v, qk_scale, LAZY, EXP)
    for j in range(n_full, n_all):
        for t in tl.static_range(STEPS):
            k0 = tl.load(IDX + row + j) * BLOCK_KV + t * COLS
            s = tl.dot(q, tl.trans(kbs._tile(desc_k, b, hk, k0, COLS, HEAD_DIM))) * qk_scale
            tile = tl.load(TID + row + j).to(tl.int64)
            keep = kbs._tile_keep(TILES, tile, r0 + offs_m, t * COLS, BLOCK_Q, WORDS, ROWS, COLS)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = kbs._tile(desc_v, b, hk, k0, COLS, HEAD_DIM)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    desc_o.store([b, h, q0, 0], out.to(q.dtype).reshape(1, 1, ROWS, HEAD_DIM))
    tl.store(LSE + b.to(tl.int64) * s_lb + h * s_lh + q0 + offs_m, lse, mask=offs_m < SEQ_Q - q0)


VARIANTS = {"base": (False, 0, 128, 128), "lazy": (True, 0, 128, 128), "exp-split": (False, 1, 128, 128),
            "rows64": (False, 0, 64, 128), "cols64": (False, 0, 128, 64)}  # lazy, exp, rows, cols
CONFIGS = {(128, 128): [(8, 2), (8, 3)], (64, 128): [(4, 1), (4, 2)], (128, 64): [(8, 2), (8, 3), (8, 4)]}


def variant(q, k, v, bs, name: str, cfg: tuple[int, int]):
    """One launch of the experimental kernel at a forced (warps, stages)."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    from triton.tools.tensor_descriptor import TensorDescriptor

    grid, args, consts = kbs._fwd_tma_args(q, k, v, out, lse, bs, q.shape[-1] ** -0.5)
    lazy, exp, rows, cols = VARIANTS[name]
    sub = consts["BLOCK_Q"] // rows

    def desc(t, n):
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, n, t.shape[-1]])

    args = (desc(q, rows), desc(k, cols), desc(v, cols), desc(out, rows), *args[4:])
    _fwd_var_kernel[(grid[0] * sub, grid[1])](*args, **consts, LAZY=lazy, EXP=exp, ROWS=rows, COLS=cols,
                                              num_warps=cfg[0], num_stages=cfg[1])
    return out, lse


def aot() -> None:
    """Compile every variant for sm_90 here (no GPU) and print the resource report and SASS counts."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"desc_q": None, "desc_k": None, "desc_v": None, "desc_o": None, "LSE": "*fp32", "s_lb": "i32",
           "s_lh": "i32", "IDX": "*i32", "CNT": "*i32", "FULL": "*i32", "TID": "*i32", "TILES": "*i32",
           "s_ib": "i32", "s_ih": "i32", "s_im": "i32", "s_cb": "i32", "s_ch": "i32", "qk_scale": "fp32",
           "H": "i32", "GROUP": "i32", "SEQ_Q": "i32", "N_QB": "i32", "BLOCK_Q": "constexpr",
           "BLOCK_KV": "constexpr", "HEAD_DIM": "constexpr", "DTYPE_KEY": "constexpr", "LAZY": "constexpr",
           "EXP": "constexpr", "ROWS": "constexpr",
           "COLS": "constexpr"}
    bin_dir = triton.backends.nvidia.__path__[0] + "/bin"
    for name, (lazy, exp, rows, cols) in VARIANTS.items():
        sig["desc_q"] = sig["desc_o"] = f"tensordesc<bf16[1, 1, {rows}, 128]>"
        sig["desc_k"] = sig["desc_v"] = f"tensordesc<bf16[1, 1, {cols}, 128]>"
        for w, st in CONFIGS[rows, cols]:
            consts = {"BLOCK_Q": 128, "BLOCK_KV": 128, "HEAD_DIM": 128, "DTYPE_KEY": "torch.bfloat16",
                      "LAZY": lazy, "EXP": exp, "ROWS": rows, "COLS": cols}
            src = ASTSource(_fwd_var_kernel, sig, consts)
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": w, "num_stages": st})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                sass = subprocess.run([f"{bin_dir}/cuobjdump", "-sass", f.name], capture_output=True,
                                      text=True).stdout
                usage = subprocess.run([f"{bin_dir}/cuobjdump", "-res-usage", f.name], capture_output=True,
                                       text=True).stdout
            counts = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "WARPGROUP.DEPBAR", "BAR.SYNC",
                                                                        "MUFU.EX2", "LDL", "STL", "STS", "LDS")}
            regs = re.search(r"REG:(\d+)", usage).group(1)
            stack = re.search(r"STACK:(\d+)", usage).group(1)
            print(f"{name:14s} ({w},{st}) regs {regs} stack {stack} smem {k.metadata.shared} {counts}")


def main() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention
    from triton.testing import do_bench

    from longattn.bench.kernels import PATTERNS
    from longattn.masks.block_sparse import BlockSparse

    S = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["sliding_window", "sink_window", "dilated", "random_90"]
    chosen = sys.argv[3].split(",") if len(sys.argv) > 3 and sys.argv[3] != "noflex" else list(VARIANTS)
    H, D, dev, dt = 32, 128, "cuda", torch.bfloat16
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())

    def bench(fn) -> float:
        return do_bench(fn, warmup=50, rep=300, return_mode="median")

    q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=dt) for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    print(f"cudnn causal: {cudnn:.2f} ms")
    table = []
    for pat in names:
        bs = BlockSparse.from_mask_mod(PATTERNS[pat](S, H, 128, dev), 1, H, S, S, 128, device=dev)
        area = bs.density() * S * S
        ideal = cudnn * area / (S * (S + 1) / 2)
        ref, ref_lse = kbs.block_sparse_forward(q, k, v, bs, D ** -0.5)
        res = {"production": bench(lambda b=bs: kbs.block_sparse_forward(q, k, v, b, D ** -0.5))}
        for name in chosen:
            for cfg in CONFIGS[VARIANTS[name][2:]]:
                key = f"{name}{cfg}"
                try:
                    o, lse = variant(q, k, v, bs, name, cfg)
                    err = (o.float() - ref.float()).abs().max().item()
                    lerr = (lse - ref_lse).abs().max().item()
                    if err > 3e-2 or lerr > 1e-3 or torch.isnan(o).any():
                        print(f"{pat} {key}: WRONG (max abs diff {err:.2e}, lse {lerr:.2e})")
                        continue
                    res[key] = bench(lambda b=bs, n=name, c=cfg: variant(q, k, v, b, n, c))
                except Exception as e:  # noqa: BLE001
                    print(f"{pat} {key}: FAILED {type(e).__name__}: {str(e)[:300]}")
        if "noflex" not in sys.argv:
            torch._dynamo.reset()
            flex = torch.compile(flex_attention, dynamic=False)
            bm = bs.to_flex()
            res["flex"] = bench(lambda f=flex, m=bm: f(q, k, v, block_mask=m))
        for key, ms in res.items():
            line = (f"{pat:15s} {key:24s} {ms:8.3f} ms  frac_ideal {ideal / ms:.3f}  "
                    f"x_flex {res.get('flex', float('nan')) / ms:.3f}")
            print(line, flush=True)
            table.append(line)
    print("\n".join(table))


if __name__ == "__main__":
    aot() if sys.argv[1:] == ["aot"] else main()
