"""crcm: real-time autoregressive video diffusion.

Causal-rCM distillation (teacher-forcing consistency + self-forcing distribution matching) and a
streaming runtime: a Rust scheduler / KV page pool / frame buffer (``crcm._native``) driving
torch models and Triton kernels (``crcm.kernels``).
"""

from crcm._native import FrameBuffer, Plan, Scheduler
from crcm._native import __version__ as __version__
from crcm.errors import (
    BufferClosedError,
    ConfigError,
    CrcmError,
    FrameShapeError,
    FrameTimeoutError,
    InvalidStateError,
    PagesExhaustedError,
    StreamExistsError,
    UnknownPlanError,
    UnknownStreamError,
)

__all__ = [
    "BufferClosedError",
    "ConfigError",
    "CrcmError",
    "FrameBuffer",
    "FrameShapeError",
    "FrameTimeoutError",
    "InvalidStateError",
    "PagesExhaustedError",
    "Plan",
    "Scheduler",
    "StreamExistsError",
    "UnknownPlanError",
    "UnknownStreamError",
    "__version__",
]
