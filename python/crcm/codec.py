"""Codecs: display frames (uint8) ↔ model space (float), design §2.

The frame buffer always holds display-ready ``uint8 [B, T, H, W, C]`` frames; the DiT works on
``float [B, T', C', H', W']``. A codec is the only thing that crosses between the two:
  - ``PixelCodec``: pixels scaled to [-1, 1], optionally space-to-depth patched so that small
    games give few tokens (lossless up to the uint8 rounding of ``decode``);
  - ``VAECodec``: the slot for a latent video VAE, given as encode/decode functions;
  - ``crcm.wan.vae.WanVAECodec``: Wan2.1's causal video VAE, decoded stream by stream.

A :class:`StreamingCodec` decodes a stream chunk by chunk with state kept between chunks (a
causal VAE's convolution caches): the runtime opens one state per stream, owned by its session,
copied on fork and dropped on close, and decodes the chunks that finish in the same step in one
batched call. Codecs without state (``PixelCodec``) decode each chunk on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from crcm.errors import NonFiniteError

__all__ = [
    "Codec",
    "PixelCodec",
    "StreamingCodec",
    "VAECodec",
    "frames_to_unit",
    "model_frames_for",
    "unit_to_frames",
    "video_frame_span",
]


@runtime_checkable
class Codec(Protocol):
    """Maps display frames to model space and back.

    Attributes:
        frame_hw: display frame size (H, W) in pixels.
        frame_channels: display channels (3 for RGB).
        channels: model-space channels C'.
        spatial_downsample: H / H' (and W / W').
        temporal_downsample: frames per model frame (1 unless a video VAE compresses time).
    """

    frame_hw: tuple[int, int]
    frame_channels: int
    channels: int
    spatial_downsample: int
    temporal_downsample: int

    def encode(self, frames_B_T_H_W_C: Tensor | np.ndarray) -> Tensor:
        """``uint8 [B, T, H, W, C]`` frames → ``float32 [B, T', C', H', W']``."""
        ...

    def decode(self, x_B_T_C_H_W: Tensor) -> Tensor:
        """``float [B, T', C', H', W']`` → ``uint8 [B, T, H, W, C]`` frames (CPU or x's device)."""
        ...


@runtime_checkable
class StreamingCodec(Codec, Protocol):
    """A codec that decodes each stream incrementally, its state kept between chunks.

    Attributes:
        first_frame_alone: a causal video VAE's layout: model frame 0 decodes to 1 frame and
            every later one to ``temporal_downsample`` frames (Wan: 1, 4, 4, …).
    """

    first_frame_alone: bool

    def open_stream(self) -> object:
        """A fresh decoder state for one stream (nothing decoded yet)."""
        ...

    def fork_stream(self, state: object) -> object:
        """An independent copy of ``state`` (a forked session continues from it)."""
        ...

    def decode_streams(self, chunks: list[Tensor], states: list[object]) -> list[Tensor]:
        """Decodes the next chunk of each stream, ``float [T', C', H', W']`` each, in one
        batched call where it can; advances each state. Returns ``uint8 [T, H, W, C]`` frames
        per stream."""
        ...


def video_frame_span(codec: Codec, first: int, count: int) -> tuple[int, int]:
    """The display frames of model frames ``first … first + count − 1``: ``(start, length)``.

    Without temporal compression these are the same numbers; a causal video VAE
    (``first_frame_alone``) gives frame 0 one display frame and every later one
    ``temporal_downsample``.
    """
    td = codec.temporal_downsample
    if not getattr(codec, "first_frame_alone", False):
        return first * td, count * td

    def start(i: int) -> int:
        return 0 if i == 0 else 1 + (i - 1) * td

    return start(first), start(first + count) - start(first)


def model_frames_for(codec: Codec, display_frames: int) -> int:
    """The fewest model frames that decode to at least ``display_frames`` display frames (the
    inverse of :func:`video_frame_span`)."""
    td = codec.temporal_downsample
    if getattr(codec, "first_frame_alone", False):
        return 1 + -(-(display_frames - 1) // td)
    return -(-display_frames // td)


def frames_to_unit(
    frames_B_T_H_W_C: Tensor | np.ndarray, frame_hw: tuple[int, int], frame_channels: int
) -> Tensor:
    """Validate display frames and map them to ``float32 [B, T, C, H, W]`` in [-1, 1]."""
    if isinstance(frames_B_T_H_W_C, np.ndarray):
        frames_B_T_H_W_C = torch.from_numpy(frames_B_T_H_W_C)
    if not isinstance(frames_B_T_H_W_C, Tensor) or frames_B_T_H_W_C.dtype != torch.uint8:
        got = _describe(frames_B_T_H_W_C)
        raise TypeError(f"frames must be a uint8 tensor or array, got {got}")
    expected = (*frame_hw, frame_channels)
    if frames_B_T_H_W_C.ndim != 5 or tuple(frames_B_T_H_W_C.shape[2:]) != expected:
        raise ValueError(
            f"frames must be [B, T, {', '.join(map(str, expected))}], "
            f"got {list(frames_B_T_H_W_C.shape)}"
        )
    x_B_T_C_H_W = frames_B_T_H_W_C.permute(0, 1, 4, 2, 3).float()
    return x_B_T_C_H_W / 127.5 - 1.0


def unit_to_frames(x_B_T_C_H_W: Tensor) -> Tensor:
    """``[-1, 1]`` floats → ``uint8 [B, T, H, W, C]`` (rounded, out-of-range values clipped).

    NaN or infinite values raise :class:`~crcm.errors.NonFiniteError`: cast to ``uint8`` they
    would become black (or arbitrary) pixels, a broken model looking like a dark frame.
    """
    if not isinstance(x_B_T_C_H_W, Tensor) or not x_B_T_C_H_W.is_floating_point():
        raise TypeError(f"expected a floating tensor, got {_describe(x_B_T_C_H_W)}")
    if x_B_T_C_H_W.ndim != 5:
        raise ValueError(f"expected [B, T, C, H, W], got {list(x_B_T_C_H_W.shape)}")
    if not bool(torch.isfinite(x_B_T_C_H_W).all()):
        bad = int((~torch.isfinite(x_B_T_C_H_W)).sum())
        raise NonFiniteError(
            f"{bad} of {x_B_T_C_H_W.numel()} values to decode are not finite (NaN or inf): the "
            "model's output is broken; refusing to turn it into black frames"
        )
    pixels = ((x_B_T_C_H_W.float() + 1.0) * 127.5).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous()


class PixelCodec:
    """Pixels as model space: ``x = frame/127.5 − 1``, then optional space-to-depth by ``patch``.

    With ``patch = p`` each ``p × p`` pixel block becomes ``p²·C`` channels (channel-major, as
    ``F.pixel_unshuffle``), so ``[B, T, H, W, C]`` frames become ``[B, T, C·p², H/p, W/p]``.
    """

    temporal_downsample = 1

    def __init__(
        self, frame_hw: tuple[int, int] = (64, 64), frame_channels: int = 3, patch: int = 1
    ) -> None:
        if patch <= 0 or frame_channels <= 0 or min(frame_hw) <= 0:
            raise ValueError(f"invalid PixelCodec({frame_hw=}, {frame_channels=}, {patch=})")
        if frame_hw[0] % patch or frame_hw[1] % patch:
            raise ValueError(f"frame size {frame_hw} is not divisible by patch={patch}")
        self.frame_hw = (int(frame_hw[0]), int(frame_hw[1]))
        self.frame_channels = frame_channels
        self.patch = patch
        self.channels = frame_channels * patch * patch
        self.spatial_downsample = patch

    def encode(self, frames_B_T_H_W_C: Tensor | np.ndarray) -> Tensor:
        """``uint8 [B, T, H, W, C]`` → ``float32 [B, T, C·p², H/p, W/p]`` in [-1, 1]."""
        x_B_T_C_H_W = frames_to_unit(frames_B_T_H_W_C, self.frame_hw, self.frame_channels)
        if self.patch == 1:
            return x_B_T_C_H_W
        return F.pixel_unshuffle(x_B_T_C_H_W, self.patch)

    def decode(self, x_B_T_C_H_W: Tensor) -> Tensor:
        """``float [B, T, C·p², H/p, W/p]`` → ``uint8 [B, T, H, W, C]``."""
        h, w = (n // self.patch for n in self.frame_hw)
        if (
            not isinstance(x_B_T_C_H_W, Tensor)
            or x_B_T_C_H_W.ndim != 5
            or tuple(x_B_T_C_H_W.shape[2:]) != (self.channels, h, w)
        ):
            raise ValueError(
                f"expected [B, T, {self.channels}, {h}, {w}], got {_describe(x_B_T_C_H_W)}"
            )
        if self.patch > 1:
            x_B_T_C_H_W = F.pixel_shuffle(x_B_T_C_H_W, self.patch)
        return unit_to_frames(x_B_T_C_H_W)


class VAECodec:
    """A latent video VAE plugged in as two functions (crcm ships no VAE weights).

    ``encode_fn(video_B_T_C_H_W)`` receives display frames scaled to float32 [-1, 1] and returns
    normalised latents ``[B, T', channels, H/s, W/s]``; ``decode_fn`` is its inverse, returning
    [-1, 1] video ``[B, T, C, H, W]``. For Wan2.1's VAE: ``channels = 16``, ``s = 8``,
    ``temporal_downsample = 4`` (causal: ``T' = 1 + (T − 1)/4``), latents normalised with the
    VAE's per-channel mean/std. The codec checks shapes on both sides.
    """

    def __init__(
        self,
        encode_fn: Callable[[Tensor], Tensor],
        decode_fn: Callable[[Tensor], Tensor],
        *,
        frame_hw: tuple[int, int],
        channels: int,
        spatial_downsample: int,
        temporal_downsample: int = 1,
        frame_channels: int = 3,
    ) -> None:
        if min(channels, spatial_downsample, temporal_downsample, frame_channels) <= 0:
            raise ValueError("VAECodec sizes must be positive")
        if frame_hw[0] % spatial_downsample or frame_hw[1] % spatial_downsample:
            raise ValueError(f"{frame_hw=} is not divisible by {spatial_downsample=}")
        self.encode_fn, self.decode_fn = encode_fn, decode_fn
        self.frame_hw = (int(frame_hw[0]), int(frame_hw[1]))
        self.frame_channels = frame_channels
        self.channels = channels
        self.spatial_downsample = spatial_downsample
        self.temporal_downsample = temporal_downsample

    @property
    def latent_hw(self) -> tuple[int, int]:
        s = self.spatial_downsample
        return (self.frame_hw[0] // s, self.frame_hw[1] // s)

    def encode(self, frames_B_T_H_W_C: Tensor | np.ndarray) -> Tensor:
        """``uint8 [B, T, H, W, C]`` → ``float [B, T', channels, H/s, W/s]``."""
        video = frames_to_unit(frames_B_T_H_W_C, self.frame_hw, self.frame_channels)
        latents = self.encode_fn(video)
        self._check(latents, (self.channels, *self.latent_hw), "encode_fn")
        return latents

    def decode(self, x_B_T_C_H_W: Tensor) -> Tensor:
        """``float [B, T', channels, H/s, W/s]`` → ``uint8 [B, T, H, W, C]``."""
        self._check(x_B_T_C_H_W, (self.channels, *self.latent_hw), "decode input")
        video = self.decode_fn(x_B_T_C_H_W)
        self._check(video, (self.frame_channels, *self.frame_hw), "decode_fn")
        return unit_to_frames(video)

    @staticmethod
    def _check(x: object, trailing: tuple[int, int, int], what: str) -> None:
        if (
            not isinstance(x, Tensor)
            or not x.is_floating_point()
            or x.ndim != 5
            or tuple(x.shape[2:]) != trailing
        ):
            dims = ", ".join(map(str, trailing))
            raise ValueError(f"{what}: expected floating [B, T, {dims}], got {_describe(x)}")


def _describe(x: object) -> str:
    if isinstance(x, (Tensor, np.ndarray)):
        return f"{x.dtype} of shape {list(x.shape)}"
    return type(x).__name__
