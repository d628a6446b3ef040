"""Test setup: without CUDA, Triton kernels run under the interpreter (must be set before triton is imported)."""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# "ci" (the default) draws the same examples every run, so CI cannot turn red by chance; HYPOTHESIS_PROFILE=explore
# draws fresh, more numerous examples when hunting for bugs.
_common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=15, derandomize=True, **_common)
settings.register_profile("explore", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def seeded_global_rng(request):
    """Each test starts from its own fixed seed, so a test's random inputs do not depend on which tests ran before
    it (a failure seen once is seen again on re-run)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
