"""Bad arguments fail at the factory with ValueError/TypeError naming the argument, the value and the expectation."""

from __future__ import annotations

import pytest
import torch

from longattn import masks as M

BAD = [
    # (call, exception, argument named in the message, fragment of the message)
    (lambda: M.sliding_window(0), ValueError, "window", "expected a positive int, got 0"),
    (lambda: M.sliding_window(2.5), TypeError, "window", "float 2.5"),
    (lambda: M.sliding_window(True), TypeError, "window", "bool"),
    (lambda: M.sliding_window(4, causal=1), TypeError, "causal", "expected a bool"),
    (lambda: M.sliding_window(4, offset="3"), TypeError, "offset", "expected an int"),
    (lambda: M.causal(offset=1.0), TypeError, "offset", "float"),
    (lambda: M.sinks(-1, 4), ValueError, "num_sinks", "non-negative"),
    (lambda: M.sinks(4, 0), ValueError, "window", "positive"),
    (lambda: M.dilated(4, 0), ValueError, "dilation", "got 0"),
    (lambda: M.dilated(0, 2), ValueError, "window", "got 0"),
    (lambda: M.dilated(4, 2, granularity=0), ValueError, "granularity", "got 0"),
    (lambda: M.strided(0), ValueError, "stride", "got 0"),
    (lambda: M.strided(2, local_window=-1), ValueError, "local_window", "got -1"),
    (lambda: M.block_local(-3), ValueError, "block", "got -3"),
    (lambda: M.global_tokens(-1), ValueError, "num_global", "got -1"),
    (lambda: M.power(local=-1), ValueError, "local", "got -1"),
    (lambda: M.power(granularity=None), TypeError, "granularity", "NoneType"),
    (lambda: M.longlora_shifted(0, 4), ValueError, "group", "got 0"),
    (lambda: M.longlora_shifted(4, 0), ValueError, "num_heads", "got 0"),
    (lambda: M.random_blocks(64, 64, 8, 9), ValueError, "num_random", "[1, 8]"),
    (lambda: M.random_blocks(0, 64, 8, 1), ValueError, "seq_q", "got 0"),
    (lambda: M.random_blocks(64, 64, 8, 1, num_heads=0), ValueError, "num_heads", "got 0"),
    (lambda: M.random_blocks(64, 64, 8, 1, seed=1.5), TypeError, "seed", "float"),
    (lambda: M.bigbird(64, 64, 8, window_blocks=0), ValueError, "window_blocks", "got 0"),
    (lambda: M.bigbird(64, 64, 8, num_random=100), ValueError, "num_random", "got 100"),
    (lambda: M.document([3, -1]), ValueError, "seq_lens", "got -1 at index 1"),
    (lambda: M.document([]), ValueError, "seq_lens", "at least one"),
    (lambda: M.document("abc"), TypeError, "seq_lens", "str"),
    (lambda: M.document(torch.tensor([[1, 2]])), TypeError, "seq_lens", "shape (1, 2)"),
    (lambda: M.document(torch.tensor([1.0, 2.0])), TypeError, "seq_lens", "float32"),
    (lambda: M.document([3, 4], kv_seq_lens=[3]), ValueError, "kv_seq_lens", "expected 2 lengths"),
    (lambda: M.document([3, 4.5]), TypeError, "seq_lens[1]", "float"),
    (lambda: M.document_ids(torch.tensor([0.5])), TypeError, "q_ids", "dtype"),
    (lambda: M.document_ids([0, 1], kv_ids=5), TypeError, "kv_ids", "int"),
    (lambda: M.per_head_window([4, 0]), ValueError, "windows", "got 0 at index 1"),
    (lambda: M.neighborhood((4, 4, 4, 4), 3), ValueError, "grid", "1 to 3 axis lengths"),
    (lambda: M.neighborhood(0, 3), ValueError, "grid", "got 0"),
    (lambda: M.neighborhood((8, 8), (3, 3, 3)), ValueError, "kernel_size", "got 3 values"),
    (lambda: M.neighborhood((8, 8), 5, dilation=2), ValueError, "kernel_size", "kernel_size * dilation <= grid"),
    (lambda: M.neighborhood(16, 3, stride=4), ValueError, "stride", "stride <= kernel_size"),
    (lambda: M.neighborhood((8, 8), 3, causal=(True, 1)), TypeError, "causal[1]", "expected a bool"),
    (lambda: M.neighborhood(16, 0), ValueError, "kernel_size", "got 0"),
    (lambda: M.radial(0, 16), ValueError, "num_frames", "got 0"),
    (lambda: M.radial(4, 16, min_window=0), ValueError, "min_window", "got 0"),
    (lambda: M.radial(4, 16, sink_frames=5), ValueError, "sink_frames", "[0, 4]"),
]


@pytest.mark.parametrize(("call", "exc", "arg", "fragment"), BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_arguments_name_the_argument(call, exc, arg, fragment):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(f"{arg}: "), msg
    assert fragment in msg, msg


def test_int_like_arguments_are_accepted():
    """numpy-style and 0-dim integer tensors count as ints; sequences may be tuples or tensors."""
    a = M.sliding_window(torch.tensor(4), offset=torch.tensor(-1))
    b = M.sliding_window(4, offset=-1)
    assert a.name == b.name
    assert M.document((3, 4)).name == M.document(torch.tensor([3, 4], dtype=torch.int32)).name
