"""Shared test setup.

Triton reads TRITON_INTERPRET when it is first imported, so the CPU interpreter is switched on
here, before any test module can import triton. With a GPU the real kernels run instead.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_interpreter = pytest.mark.skip(
        reason="Triton's interpreter is off with CUDA present; the gpu tests run the kernels"
    )
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and HAS_CUDA:
            item.add_marker(skip_interpreter)


def pytest_report_header(config: pytest.Config) -> str | None:
    """Says up front when Triton's interpreter cannot run the kernels here, so that the kernel
    tests' failures are not mistaken for bugs in the kernels."""
    problem = _interpreter_problem()
    return f"WARNING: {problem}" if problem else None


def _interpreter_problem() -> str | None:
    if HAS_CUDA:
        return None
    try:
        import numpy as np
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def count(ptr):
        # A loop bound loaded from memory, as the kernels' page and block tables give them.
        total = 0
        for _ in range(0, tl.load(ptr)):
            total += 1
        tl.store(ptr, total)

    try:
        count[(1,)](torch.full((1,), 3, dtype=torch.int32))
    except Exception as error:  # the interpreter's failure is the finding here
        return (
            f"Triton {triton.__version__}'s interpreter cannot run crcm's kernels with NumPy "
            f"{np.__version__} ({type(error).__name__}: {error}); the kernel tests that use it "
            "will fail. Triton 3.6 with NumPy 2.4 does this: use NumPy < 2.4 or a newer Triton."
        )
    return None
