"""Exceptions of crcm. The native runtime raises these classes too (by name, from Rust).

Each error also derives from the built-in exception a caller would naturally catch (a bad
config is a ``ValueError``, an unknown stream a ``KeyError``, a timeout a ``TimeoutError``).
"""

from __future__ import annotations


class CrcmError(Exception):
    """Base class of every error crcm raises on purpose."""

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ConfigError(CrcmError, ValueError):
    """A configuration value is out of range or inconsistent."""


class UnknownStreamError(CrcmError, KeyError):
    """No open stream has this id."""


class StreamExistsError(CrcmError, ValueError):
    """A stream with this id is already open."""


class PagesExhaustedError(CrcmError):
    """Admission control refused a stream: not enough KV pages are unreserved."""


class InvalidStateError(CrcmError, RuntimeError):
    """The operation is not valid in the stream's current state."""


class UnknownPlanError(CrcmError, KeyError):
    """The plan id is not in flight (already completed or failed, or never issued)."""


class BadPageError(CrcmError, ValueError):
    """A page id outside the pool or not allocated."""


class FrameShapeError(CrcmError, ValueError):
    """A frame does not have the frame buffer's shape."""


class FrameTimeoutError(CrcmError, TimeoutError):
    """A blocking frame-buffer call ran out of time."""


class BufferClosedError(CrcmError):
    """The frame buffer was closed."""


class NonFiniteError(CrcmError, ValueError):
    """A tensor that must be finite holds NaN or infinite values (e.g. a model's output, which
    would otherwise decode to black frames)."""


__all__ = [
    "BadPageError",
    "BufferClosedError",
    "ConfigError",
    "CrcmError",
    "FrameShapeError",
    "FrameTimeoutError",
    "InvalidStateError",
    "NonFiniteError",
    "PagesExhaustedError",
    "StreamExistsError",
    "UnknownPlanError",
    "UnknownStreamError",
]
