"""crcm: real-time autoregressive video diffusion.

Causal-rCM distillation (teacher-forcing consistency + self-forcing distribution matching) and a
streaming runtime: a Rust scheduler / KV page pool / frame buffer (``crcm._native``) driving
torch models and Triton kernels (``crcm.kernels``).
"""

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from crcm.pipeline import Pipeline, load
    from crcm.runtime import Runtime, Session, generate
    from crcm.sampling import SamplerConfig

# The torch-backed API loads on first use, so that `import crcm` stays light for code that
# only drives the native runtime.
_LAZY = {
    "Pipeline": "crcm.pipeline",
    "load": "crcm.pipeline",
    "Runtime": "crcm.runtime",
    "Session": "crcm.runtime",
    "generate": "crcm.runtime",
    "SamplerConfig": "crcm.sampling",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'crcm' has no attribute {name!r}")


__all__ = [
    "BufferClosedError",
    "ConfigError",
    "CrcmError",
    "FrameBuffer",
    "FrameShapeError",
    "FrameTimeoutError",
    "InvalidStateError",
    "PagesExhaustedError",
    "Pipeline",
    "Plan",
    "Runtime",
    "SamplerConfig",
    "Scheduler",
    "Session",
    "StreamExistsError",
    "UnknownPlanError",
    "UnknownStreamError",
    "__version__",
    "generate",
    "load",
]
