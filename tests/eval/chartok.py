"""A byte-level tokenizer with the slice of the transformers tokenizer API the eval uses, for tiny offline models."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class ByteTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens: bool = True, return_tensors: str | None = None):
        texts = [text] if isinstance(text, str) else list(text)
        ids = [list(t.encode("utf-8")) for t in texts]
        if return_tensors == "pt":
            return SimpleNamespace(input_ids=torch.tensor(ids))
        return SimpleNamespace(input_ids=ids[0] if isinstance(text, str) else ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids if not (skip_special_tokens and int(i) == 0)).decode("utf-8", "replace")
