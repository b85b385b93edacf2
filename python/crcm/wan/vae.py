"""Wan's causal video VAE (diffusers' ``AutoencoderKLWan``) as a streaming codec.

The network is diffusers' own; this module only drives it. Wan's decoder is causal in time: each
3D convolution keeps the last two frames of its input in a cache list (diffusers' ``feat_cache``)
so a video decodes latent frame by latent frame. :class:`WanVAECodec` keeps one such list per
stream (:class:`WanDecoderState`), so a stream's chunks decode as they arrive without re-decoding
the past, and streams at the same point decode in one batched call. The module's own
``_feat_map`` / ``_conv_idx`` are never used: streams interleave freely.

Latents in model space are normalised per channel like diffusers' Wan pipelines:
``x = (z − latents_mean) / latents_std``, with ``z`` the posterior mean.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanCausalConv3d,
    patchify,
    unpatchify,
)
from torch import Tensor

from crcm.codec import frames_to_unit, unit_to_frames
from crcm.errors import ConfigError
from crcm.wan.folder import read_weights, weight_files

__all__ = ["WanDecoderState", "WanVAECodec"]

CacheEntry = Tensor | str | None  # diffusers: None (nothing yet), "Rep" (after frame 0), frames


@dataclasses.dataclass
class WanDecoderState:
    """One stream's decoder: its causal-convolution caches (batch size 1) and how many latent
    frames it has decoded (0: the next chunk is the stream's first, whose frame 0 is special)."""

    cache: list[CacheEntry]
    latent_frames: int = 0


class WanVAECodec:
    """``uint8`` frames ↔ normalised Wan latents ``[B, T', z_dim, H/s, W/s]``, decoded per stream.

    Latent frame 0 is one video frame, every later one ``temporal_downsample`` frames, so ``T``
    video frames (``T = 1 + 4k`` for Wan2.1) encode to ``T' = 1 + k`` latent frames.
    """

    first_frame_alone = True

    def __init__(self, vae: AutoencoderKLWan, frame_hw: tuple[int, int]) -> None:
        if not isinstance(vae, AutoencoderKLWan):
            raise ConfigError(f"expected a diffusers AutoencoderKLWan, got {type(vae).__name__}")
        cfg = vae.config
        self.vae = vae.eval()
        self.patch_size = int(cfg.patch_size or 1)  # Wan2.2's VAE patchifies pixels first
        self.frame_hw = (int(frame_hw[0]), int(frame_hw[1]))
        self.frame_channels = int(cfg.in_channels) // self.patch_size**2  # in_channels: patched
        self.channels = int(cfg.z_dim)
        self.spatial_downsample = 2 ** (len(cfg.dim_mult) - 1) * self.patch_size
        self.temporal_downsample = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        s = self.spatial_downsample
        if min(self.frame_hw) <= 0 or self.frame_hw[0] % s or self.frame_hw[1] % s:
            raise ConfigError(f"frame size {self.frame_hw} is not a positive multiple of {s}")
        self.latent_hw = (self.frame_hw[0] // s, self.frame_hw[1] // s)
        if len(cfg.latents_mean) != self.channels or len(cfg.latents_std) != self.channels:
            raise ConfigError(f"latents_mean/latents_std must have z_dim={self.channels} values")
        param = next(vae.parameters())
        self.device, self.dtype = param.device, param.dtype
        shape = (self.channels, 1, 1)  # broadcast over [B, T, C, h, w]
        self._mean = torch.tensor(cfg.latents_mean, device=self.device).view(shape)
        self._std = torch.tensor(cfg.latents_std, device=self.device).view(shape)
        # One cache slot per causal conv, as diffusers' clear_cache allocates (1×1×1 shortcuts
        # and resample time convs get a slot each but never use it).
        self._decoder_slots = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self._encoder_slots = sum(isinstance(m, WanCausalConv3d) for m in vae.encoder.modules())

    @classmethod
    def from_folder(
        cls,
        vae_dir: str | os.PathLike[str],
        frame_hw: tuple[int, int],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> WanVAECodec:
        """Load a diffusers VAE folder (``config.json`` + safetensors, possibly sharded).

        The model is built on the meta device and the weights are assigned straight from the
        files, so a large VAE is allocated once. Nothing is unpickled or downloaded.
        """
        folder = Path(vae_dir)
        config_path = folder / "config.json"
        if not folder.is_dir():
            raise ConfigError(f"VAE folder not found: {folder}")
        if not config_path.is_file():
            raise ConfigError(f"VAE config not found: {config_path}")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"unreadable VAE config {config_path}: {e}") from e
        with torch.device("meta"):
            vae = AutoencoderKLWan.from_config(config)
        weights = read_weights(weight_files(folder, what="VAE"), dtype=dtype, device=device)
        expected = set(vae.state_dict())
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if missing or unexpected:
            raise ConfigError(
                f"VAE weights in {folder} do not match {config_path}: "
                f"missing {missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} "
                f"({len(unexpected)})"
            )
        vae.load_state_dict(weights, strict=True, assign=True)
        return cls(vae.requires_grad_(False), frame_hw)

    # --- encode -----------------------------------------------------------------------------

    def encode(self, frames_B_T_H_W_C: Tensor | np.ndarray) -> Tensor:
        """``uint8 [B, T, H, W, C]`` (``T = 1 + td·k``) → ``float32 [B, 1 + k, z_dim, h, w]``.

        The posterior mean, normalised. Frame 0 is encoded alone and then ``td`` frames at a
        time, as diffusers' ``_encode`` does, but with a cache list of its own.
        """
        video = frames_to_unit(frames_B_T_H_W_C, self.frame_hw, self.frame_channels)
        num_frames, td = video.shape[1], self.temporal_downsample
        if (num_frames - 1) % td:
            raise ValueError(f"encode needs 1 + {td}·k frames, got {num_frames}")
        x = video.transpose(1, 2).to(self.device, self.dtype)  # [B, C, T, H, W]
        if self.patch_size > 1:
            x = patchify(x, patch_size=self.patch_size)
        cache: list[CacheEntry] = [None] * self._encoder_slots
        with torch.inference_mode():
            bounds = [(0, 1)] + [(a, a + td) for a in range(1, num_frames, td)]
            pieces = [
                self.vae.encoder(x[:, :, a:b], feat_cache=cache, feat_idx=[0]) for a, b in bounds
            ]
            moments = self.vae.quant_conv(torch.cat(pieces, dim=2))
            mean = moments[:, : self.channels].transpose(1, 2).float()  # [B, T', C, h, w]
            return (mean - self._mean) / self._std

    # --- decode -----------------------------------------------------------------------------

    def decode(self, x_B_T_C_H_W: Tensor) -> Tensor:
        """Whole sequences → ``uint8 [B, T, H, W, C]``, frame by frame as diffusers' ``_decode``."""
        self._check_latents(x_B_T_C_H_W, 5, "decode input")
        latents = x_B_T_C_H_W.to(self.device)
        cache: list[CacheEntry] = [None] * self._decoder_slots
        with torch.inference_mode():
            videos = [
                self._decode_step(latents[:, t : t + 1], cache, first=t == 0)
                for t in range(latents.shape[1])
            ]
            return unit_to_frames(torch.cat(videos, dim=1))

    def open_stream(self) -> WanDecoderState:
        """A fresh per-stream decoder state (nothing decoded yet)."""
        return WanDecoderState([None] * self._decoder_slots)

    def fork_stream(self, state: WanDecoderState) -> WanDecoderState:
        """An independent deep copy: every cached tensor is cloned."""
        with torch.inference_mode():
            cache = [e.clone() if isinstance(e, Tensor) else e for e in state.cache]
        return WanDecoderState(cache, state.latent_frames)

    def state_nbytes(self, state: WanDecoderState) -> int:
        """Bytes of cached features one stream holds (Wan2.1 at 480×832 in bf16: ~GBs)."""
        return sum(e.numel() * e.element_size() for e in state.cache if isinstance(e, Tensor))

    def decode_streams(self, chunks: list[Tensor], states: list[WanDecoderState]) -> list[Tensor]:
        """Decodes the next chunk ``float [T_i, z_dim, h, w]`` of each stream and advances its
        state; returns ``uint8 [F_i, H, W, 3]`` per stream on the VAE's device (``F_i = td·T_i``,
        less ``td − 1`` on a stream's first chunk)."""
        return [unit_to_frames(v.unsqueeze(0))[0] for v in self._decode_unit(chunks, states)]

    def _decode_unit(self, chunks: list[Tensor], states: list[WanDecoderState]) -> list[Tensor]:
        """:meth:`decode_streams` before quantisation: ``float [F_i, 3, H, W]`` in [-1, 1].

        Streams with the same chunk length and identically shaped caches (hence the same phase)
        form one batch: their cache entries are concatenated along the batch dim, the decoder
        runs once, and the new entries are split back (views of the batched tensors). States
        change only after every group has decoded, so an error leaves them all as they were.
        """
        if len(chunks) != len(states):
            raise ValueError(f"{len(chunks)} chunks for {len(states)} states")
        if len({id(s) for s in states}) != len(states):
            raise ValueError("a state appears twice; fork_stream it to decode two branches")
        groups: dict[tuple, list[int]] = {}
        for i, (chunk, state) in enumerate(zip(chunks, states, strict=True)):
            self._check_latents(chunk, 4, f"chunk {i}")
            if not isinstance(state, WanDecoderState) or len(state.cache) != self._decoder_slots:
                raise ValueError(f"state {i} is not a WanDecoderState of this codec")
            groups.setdefault(_group_key(chunk, state), []).append(i)
        videos: list[Tensor | None] = [None] * len(chunks)
        updates: list[tuple[WanDecoderState, list[CacheEntry], int]] = []
        slots = range(self._decoder_slots)
        with torch.inference_mode():
            for members in groups.values():
                latents = torch.stack([chunks[i].to(self.device) for i in members])
                cache = [_concat([states[i].cache[k] for i in members]) for k in slots]
                first = states[members[0]].latent_frames == 0
                video = self._decode_step(latents, cache, first=first)
                for row, i in enumerate(members):
                    videos[i] = video[row]
                    split = [e[row : row + 1] if isinstance(e, Tensor) else e for e in cache]
                    updates.append((states[i], split, chunks[i].shape[0]))
        for state, cache, decoded in updates:
            state.cache, state.latent_frames = cache, state.latent_frames + decoded
        return videos  # type: ignore[return-value]

    def _decode_step(self, latents: Tensor, cache: list[CacheEntry], *, first: bool) -> Tensor:
        """Normalised ``[B, T, C, h, w]`` latents → ``[B, F, 3, H, W]`` in [-1, 1], updating
        ``cache`` in place. On a first chunk, latent frame 0 goes through the decoder alone with
        ``first_chunk=True``: its temporal upsamplers mark their cache ``"Rep"`` instead of
        doubling frames, which is how it yields one video frame instead of ``td``."""
        z = (latents.float() * self._std + self._mean).to(self.dtype).transpose(1, 2)
        x = self.vae.post_quant_conv(z)  # 1×1×1: no temporal state
        pieces = []
        if first:
            pieces.append(
                self.vae.decoder(x[:, :, :1], feat_cache=cache, feat_idx=[0], first_chunk=True)
            )
            x = x[:, :, 1:]
        if x.shape[2]:
            pieces.append(self.vae.decoder(x, feat_cache=cache, feat_idx=[0]))
        video = torch.cat(pieces, dim=2)
        if self.patch_size > 1:
            video = unpatchify(video, patch_size=self.patch_size)
        return video.clamp(-1.0, 1.0).transpose(1, 2)

    def _check_latents(self, x: object, ndim: int, what: str) -> None:
        trailing = (self.channels, *self.latent_hw)
        if (
            not isinstance(x, Tensor)
            or not x.is_floating_point()
            or x.ndim != ndim
            or tuple(x.shape[ndim - 3 :]) != trailing
            or x.shape[ndim - 4] == 0
        ):
            dims = ", ".join(map(str, trailing))
            lead = "B, T" if ndim == 5 else "T"
            got = f"{x.dtype} {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{what}: expected floating [{lead}, {dims}] latents, got {got}")


def _group_key(chunk: Tensor, state: WanDecoderState) -> tuple:
    """Streams with equal keys can share one decoder call."""
    entries = tuple(
        (tuple(e.shape[1:]), e.dtype) if isinstance(e, Tensor) else e for e in state.cache
    )
    return (tuple(chunk.shape), state.latent_frames == 0, entries)


def _concat(entries: list[CacheEntry]) -> CacheEntry:
    if not isinstance(entries[0], Tensor):
        return entries[0]  # None or "Rep": equal across the group (part of the group key)
    return entries[0] if len(entries) == 1 else torch.cat(entries, dim=0)  # type: ignore[arg-type]
