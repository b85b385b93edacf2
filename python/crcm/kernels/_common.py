"""What the attention kernels share: the optional Triton import, backend choice, input checks.

Triton ships with the Linux CUDA wheels of torch but not with CPU-only or macOS wheels, so the
kernel modules must import without it: the torch reference is the CPU path everywhere (design §3).
"""

import math
import os
from typing import Literal

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests

    class _NoTriton:
        """Stands in for ``triton`` and ``triton.language`` so that kernel definitions parse.

        ``jit`` returns the plain function and ``constexpr`` is only read by annotations; the
        kernels are never launched because :func:`resolve_backend` refuses "triton".
        """

        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()
    InterpretedFunction = ()  # isinstance(x, ()) is always False
    HAS_TRITON = False

__all__ = [
    "BACKEND_ENV",
    "HAS_TRITON",
    "Backend",
    "check_scale",
    "is_interpreted",
    "resolve_backend",
    "tl",
    "triton",
]

Backend = Literal["auto", "triton", "torch"]
BACKEND_ENV = "CRCM_ATTENTION_BACKEND"
_BACKENDS = ("auto", "triton", "torch")
# Kernel tiles need power-of-two head dims (tl.arange) of at least 16 (tl.dot's minimum); the GPU
# tile sizes are chosen for 64 and 128.
_TRITON_HEAD_DIMS = (16, 32, 64, 128)
# fp32 runs only in the interpreter, where it checks the kernels' logic exactly. On GPUs an fp32
# tl.dot is either TF32 (too coarse for an fp32 caller) or IEEE FMA loops that spill heavily (and
# crashed Triton 3.9's LLVM for the JVP at D=128 in an offline sm_90 compile); fp32 callers on
# CUDA get the torch path instead.
_GPU_DTYPES = (torch.float16, torch.bfloat16)
_INTERPRETER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_backend(
    backend: str, kernel: object, device: torch.device, dtype: torch.dtype, head_dim: int
) -> Literal["triton", "torch"]:
    """Pick the implementation for one call.

    An explicit ``backend`` ("triton" or "torch") wins; with "auto" the environment variable
    ``CRCM_ATTENTION_BACKEND`` decides, and without it Triton runs when the tensors are on CUDA
    and the kernel supports their dtype and head dim. Triton on CPU tensors works only under the
    interpreter (``TRITON_INTERPRET=1`` set before triton was imported), which is how the tests
    run the kernels without a GPU.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
        if backend not in _BACKENDS:
            raise ValueError(
                f"{BACKEND_ENV} must be one of {_BACKENDS}, got {os.environ[BACKEND_ENV]!r}"
            )
    interpreted = is_interpreted(kernel)
    dtypes = _INTERPRETER_DTYPES if interpreted else _GPU_DTYPES
    supported = dtype in dtypes and head_dim in _TRITON_HEAD_DIMS
    if backend == "auto":
        return "triton" if HAS_TRITON and supported and device.type == "cuda" else "torch"
    if backend == "torch":
        return "torch"
    if not HAS_TRITON:
        raise ValueError("backend='triton' needs the triton package, which is not installed")
    if not supported:
        raise ValueError(
            f"the Triton kernel supports dtypes {dtypes} and head dims {_TRITON_HEAD_DIMS}, "
            f"got {dtype} and head_dim={head_dim}"
        )
    if device.type != "cuda" and not interpreted:
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 "
            "before triton is imported to run the kernel in Triton's interpreter"
        )
    return "triton"


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` runs in Triton's CPU interpreter (decided when it was decorated)."""
    return isinstance(kernel, InterpretedFunction)


def check_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: ``1/sqrt(head_dim)`` by default, else a positive finite number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    return float(scale)
