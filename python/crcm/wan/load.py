"""A local diffusers Wan2.1 text-to-video folder (and a causal student checkpoint) as one
:class:`crcm.Pipeline`: the streaming VAE is its codec, umT5 its text encoder, the transformer
(or the student that replaces its weights) its model.

Example (not run here: it needs the real folder)::

    pipe = crcm.load("Wan2.1-T2V-1.3B-Diffusers", checkpoint="self_forcing_dmd.pt")
    with crcm.Runtime(pipe, max_streams=1) as rt:
        session = rt.open(prompt="a corgi surfing a wave at sunset", max_frames=81)
        frames = list(session.frames())
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from crcm.errors import ConfigError
from crcm.sampling import SamplerConfig, get_preset

__all__ = ["DEFAULT_FRAME_HW", "DEFAULT_SINK_FRAMES", "DEFAULT_WINDOW_FRAMES", "load_wan_pipeline"]

DEFAULT_FRAME_HW = (480, 832)  # Wan2.1-T2V-1.3B's native size (height, width)
# Wan2.1 was trained on 81-frame clips: 21 latent frames. A stream keeps the first chunk as an
# attention sink plus a window, so that sink + window + the chunk in progress is that length,
# and memory stays flat however long the video runs.
DEFAULT_SINK_FRAMES = 3
DEFAULT_WINDOW_FRAMES = 15


def load_wan_pipeline(
    folder: str | os.PathLike[str],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_key: str | None = None,
    frame_hw: tuple[int, int] | None = None,
    sampler: SamplerConfig | str | None = None,
    text_len: int = 512,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """The pipeline of a diffusers Wan2.1-T2V folder.

    Args:
        checkpoint: a causal student (Self-Forcing, Causal Forcing, Causal-rCM releases):
            safetensors, or a ``.pt`` dict read with ``torch.load(weights_only=True)`` only;
            its weights replace the folder's transformer.
        checkpoint_key: which model of a multi-model ``.pt`` (default ``generator_ema``, then
            ``generator``).
        frame_hw: video size (height, width), multiples of 16 (default 480×832).
        sampler: a :class:`SamplerConfig` or a preset name (default: ``self-forcing``); the sink
            and window default to 3 + 15 latent frames.
    """
    from crcm.pipeline import Pipeline
    from crcm.wan.folder import check_wan_folder, load_transformer
    from crcm.wan.text import WAN_NEGATIVE_PROMPT, WanTextEncoder
    from crcm.wan.vae import WanVAECodec

    folder = Path(folder)
    check_wan_folder(folder)
    frame_hw = tuple(frame_hw or DEFAULT_FRAME_HW)
    if len(frame_hw) != 2 or any(not isinstance(n, int) or n <= 0 or n % 16 for n in frame_hw):
        raise ConfigError(f"the video size must be two positive multiples of 16, got {frame_hw}")
    codec = WanVAECodec.from_folder(folder / "vae", frame_hw, device=device, dtype=dtype)
    text = WanTextEncoder.from_folder(folder, device=device, dtype=dtype, text_len=text_len)
    model = load_transformer(
        folder,
        frame_hw=codec.latent_hw,
        checkpoint=checkpoint,
        checkpoint_key=checkpoint_key,
        text_len=text_len,
        device=device,
        dtype=dtype,
    )
    if sampler is None or isinstance(sampler, str):
        sampler = replace(
            get_preset(sampler or "self-forcing"),
            sink_frames=DEFAULT_SINK_FRAMES,
            window_frames=DEFAULT_WINDOW_FRAMES,
        )
    name = folder.name if checkpoint is None else f"{folder.name}+{Path(checkpoint).stem}"
    return Pipeline(
        model=model.eval(),
        codec=codec,
        sampler=sampler,
        name=name,
        text_encoder=text,
        negative_prompt=WAN_NEGATIVE_PROMPT,
    )
