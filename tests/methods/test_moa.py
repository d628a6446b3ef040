"""MoA: the profiling search (planted local vs global heads, budget respected, JSON round trip), the prefill
method on the oracle rule, dense at budget 1.0, errors, and the end-to-end path through ``patch``."""

from __future__ import annotations

import pytest
import torch

from longattn.methods.prefill.moa import MoA, MoAConfig, search_moa, window_density
from longattn.methods.registry import get
from tests.methods.prefill_checks import SHAPES, check_keeps_everything, check_standard, qkv


def _config(n_heads: int, rules=((16.0, 0.0), (0.0, 0.25), (8.0, 0.5), (0.0, 1.0))) -> MoAConfig:
    return MoAConfig({0: [rules[h % len(rules)] for h in range(n_heads)]}, density=0.5)


@pytest.mark.parametrize(("Sq", "Skv", "Hq", "Hkv", "D", "dtype"), SHAPES)
def test_oracle_and_density(Sq, Skv, Hq, Hkv, D, dtype):
    check_standard(MoA(_config(Hq), block=32), Sq, Skv, Hq, Hkv, D, dtype)


def test_windows_follow_the_elastic_rule():
    q, k, _ = qkv(300)
    allowed = MoA(_config(4), block=32).estimate(q, k).to_dense()[0]
    d = torch.arange(300).view(-1, 1) - torch.arange(300).view(1, -1)
    for h, w in enumerate([16, 75, 158, 300]):
        assert torch.equal(allowed[h], (d >= 0) & (d < w)), h


def _local_and_global(S: int = 256):
    """Head 0 attends to itself only; head 1 attends to the first 4 tokens (sinks): windows hurt head 1 only."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, S, 32, generator=g) for _ in range(3))
    k[:, 0] = q[:, 0] * 3
    u = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    q[:, 1] = 4 * u + 0.1 * q[:, 1]
    k[:, 1, :4] = 4 * u
    return {0: (q, k, v)}


def test_search_gives_the_budget_to_the_head_that_needs_it(tmp_path):
    samples = _local_and_global()
    cfg = search_moa(samples, density=0.52, alphas=(1, 16, 64), betas=(0.0, 0.5, 1.0))
    w_local, w_global = cfg.windows(0, 256)
    assert w_local == 1 and w_global == 256
    lengths = cfg.lengths
    mean = sum(window_density(w, n) for n in lengths for w in (min(w_local, n), n)) / (2 * len(lengths))
    assert mean <= 0.52
    cfg.save(tmp_path / "moa.json")
    assert MoAConfig.load(tmp_path / "moa.json") == cfg


def test_budget_one_is_dense_and_a_small_budget_is_respected():
    samples = {layer: qkv(96, 96, 4, 2, 32, seed=layer) for layer in (0, 1)}
    dense_cfg = search_moa(samples, density=1.0)
    assert all(b == 1.0 for rules in dense_cfg.rules.values() for _, b in rules)
    q, k, v = qkv(300, 300, 4, 2, 32, seed=7)
    check_keeps_everything(MoA(dense_cfg, block=32).estimate(q, k, layer=1), q, k, v)
    cfg = search_moa(samples, density=0.3, alphas=(1, 8, 32), betas=(0.0, 0.25, 1.0))
    kept = [window_density(w, n) for n in cfg.lengths for layer in (0, 1) for w in cfg.windows(layer, n)]
    assert sum(kept) / len(kept) <= 0.3 + 1e-9


def test_registered_and_bad_input(tmp_path):
    assert get("moa").factory is MoA and get("moa_windows").family == "pattern"
    samples = _local_and_global(64)
    with pytest.raises(ValueError, match=r"density: budget 0.01 is below"):
        search_moa(samples, density=0.01, alphas=(16,), betas=(0.0,))
    with pytest.raises(ValueError, match=r"density: expected a number in \(0, 1\]"):
        search_moa(samples, density=1.5)
    with pytest.raises(ValueError, match=r"lengths: expected calibration lengths in \[1, 64\]"):
        search_moa(samples, density=0.5, lengths=[128])
    with pytest.raises(ValueError, match="samples: layer 0 has 10 queries for 64 keys"):
        search_moa({0: (samples[0][0][:, :, :10], samples[0][1], samples[0][2])}, density=0.5)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a MoA config"):
        MoA(tmp_path / "bad.json")
    with pytest.raises(TypeError, match="config: expected a MoAConfig or a JSON path"):
        MoA(3)
    q, k, _ = qkv(100)
    with pytest.raises(ValueError, match="layer: the MoA config has rules for layers \\[0\\], not layer 2"):
        MoA(_config(4)).estimate(q, k, layer=2)
    with pytest.raises(ValueError, match="config: layer 0 has rules for 2 heads, the input has 4"):
        MoA(_config(2)).estimate(q, k)


def test_patched_llama_with_a_saved_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    import longattn
    from longattn.methods.prefill.moa import calibrate_moa

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
    full = calibrate_moa(model, ids[:, :128], density=1.0, path=tmp_path / "full.json")
    sparse = calibrate_moa(model, ids[:, :128], density=0.3, path=tmp_path / "sparse.json", alphas=(4, 16),
                           betas=(0.0, 0.1, 1.0))
    assert model.config._attn_implementation == "sdpa" and sorted(full.rules) == [0, 1]
    with torch.no_grad():
        with longattn.patch(model, prefill="moa", impl="reference", config=tmp_path / "full.json"):
            ours_full = model(ids).logits
        with longattn.patch(model, prefill="moa", impl="gather", config=str(tmp_path / "sparse.json")):
            ours_sparse = model(ids).logits
            out = model.generate(ids[:, :50], max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert (ours_full - dense).abs().max() <= 1e-4
    assert (ours_sparse - dense).abs().max() > 1e-3
    assert out.shape == (1, 53)
    assert sparse.density == 0.3
