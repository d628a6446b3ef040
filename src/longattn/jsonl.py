"""JSONL result files that survive killed runs: appends always start on a fresh line, so a row torn by a kill
(no trailing newline) never swallows the first row of the resumed run."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO


def open_append(path: Path) -> TextIO:
    """``path`` opened for appending (folder created), after closing a torn last line with a newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
        if torn:
            with path.open("a") as f:
                f.write("\n")
    return path.open("a")
