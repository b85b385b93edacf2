"""What the attention kernels share: the optional Triton import, backend choice, input checks.

Triton ships with the Linux CUDA wheels of torch but not with CPU-only or macOS wheels, so the
kernel modules must import without it: the torch reference is the CPU path everywhere (design §3).
"""

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
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
    OutOfResources = RuntimeError
    HAS_TRITON = False

__all__ = [
    "BACKEND_ENV",
    "HAS_TRITON",
    "INTERPRETER_CONFIG",
    "Backend",
    "LaunchConfig",
    "LaunchLadder",
    "check_scale",
    "forced_launch_config",
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


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch parameters of one compilation of a kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def kwargs(self) -> dict[str, int]:
        """The kernel launch's keyword arguments."""
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }


# The interpreter is slow per element and the tests use tiny shapes: the smallest legal tiles.
INTERPRETER_CONFIG = LaunchConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
_FORCED: ContextVar[LaunchConfig | None] = ContextVar("crcm_forced_launch_config", default=None)


@contextlib.contextmanager
def forced_launch_config(config: LaunchConfig) -> Iterator[None]:
    """Launch every kernel with ``config`` inside the block (benchmarks that compare tile sizes,
    tests of other tilings under the interpreter); the usual choice resumes after it."""
    token = _FORCED.set(config)
    try:
        yield
    finally:
        _FORCED.reset(token)


class LaunchLadder:
    """A kernel's GPU launch configurations in order of preference, and per device and
    specialisation the first that fits.

    Why a ladder and not one configuration: the preferred tiles' shared memory (up to 172 KiB of
    multi-buffered K/V tiles) fits sm_90's 227 KiB but not sm_80's 163 KiB or sm_86/sm_89's
    99 KiB, and Triton reports that only when it loads the compiled kernel (``OutOfResources``,
    before anything runs). So the first launch on a device walks down the ladder, and the rung
    that loaded is remembered. Why not ``triton.autotune``: timing candidates on first use
    stalls a streaming session for seconds whenever a new shape appears; the order here comes
    from ``benches/bench_kernels.py --configs`` on a real GPU instead.
    """

    def __init__(self, name: str, rungs: Callable[[int], Sequence[LaunchConfig]]) -> None:
        self._name = name
        self._rungs = rungs  # head_dim -> configurations, preferred first
        self._fits: dict[tuple, LaunchConfig] = {}

    def rungs(self, head_dim: int) -> Sequence[LaunchConfig]:
        return self._rungs(head_dim)

    def launch(
        self,
        launch: Callable[[LaunchConfig], None],
        *,
        device: torch.device,
        head_dim: int,
        interpreted: bool,
        specialisation: tuple = (),
    ) -> LaunchConfig:
        """Run ``launch(config)`` with the configuration for this device; return it.

        ``launch`` must be repeatable (it is retried with the next rung when a configuration
        does not fit); ``specialisation`` must name everything else that changes the resources
        of the kernels ``launch`` runs (dtype, constexpr flags, which variants it launches), since
        the rung that fitted is reused for the same key without a fallback.
        """
        forced = _FORCED.get()
        if forced is not None or interpreted:
            config = forced or INTERPRETER_CONFIG
            launch(config)
            return config
        key = (device.index, head_dim, *specialisation)
        if key in self._fits:
            launch(self._fits[key])
            return self._fits[key]
        refusals = []
        for config in self._rungs(head_dim):
            try:
                launch(config)
            except OutOfResources as error:
                refusals.append(f"{config}: {error}")
                continue
            self._fits[key] = config
            return config
        raise RuntimeError(
            f"no launch configuration of the {self._name} kernel fits this GPU "
            f"(head_dim={head_dim}); set CRCM_ATTENTION_BACKEND=torch to use the torch path. "
            "Refusals: " + "; ".join(refusals)
        )
