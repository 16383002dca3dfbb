"""Shared test setup: hardware gating and the Triton interpreter on machines without CUDA."""

from __future__ import annotations

import os

# Must happen before any @triton.jit kernel is defined: without a GPU the kernels run in Triton's interpreter.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: one thread is as fast, and on a loaded 2-core machine two threads spin against the load
# (seen here: 0.03 s with one thread, 7 s with two, for the same generate call).
torch.set_num_threads(1)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def reference_kernels():
    """Model-level tests run the torch references: the interpreter would run every kernel program in numpy.
    The kernels themselves are tested in tests/test_kernels_*.py, and once end to end in test_cache.py."""
    from kernels import reference_only

    with reference_only():
        yield
