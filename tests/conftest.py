"""Test setup: CUDA when present, else Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triflash's kernels are decorated, so this runs before any test
module imports triflash. Outputs are NaN-poisoned (TRIFLASH_POISON_OUTPUTS) so unwritten elements
fail. On CPU the interpreter's bf16/fp8 arithmetic is corrected by ``interp_patch`` (test-only).
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["TRIFLASH_POISON_OUTPUTS"] = "1"

if not HAS_CUDA:
    import interp_patch  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)

    interp_patch.apply()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu tier)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _release_cuda_cache():
    """On a GPU, give cached blocks back after each test: pytest-xdist workers share one device, and a
    worker's idle cache (20+ GiB after the 128k paged tests) must not starve the >2^31-element tests."""
    yield
    if HAS_CUDA:
        torch.cuda.empty_cache()
