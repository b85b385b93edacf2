"""Named configurations of the crcm diffusion transformer (design §2).

``DiTConfig`` holds every hyper-parameter the network needs; ``get_config(name)`` returns a named
one. Sizes are in *model space*: what the codec produces (pixels for the pixel codec, latents for a
VAE), never display frames.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

__all__ = ["CONFIGS", "DiTConfig", "get_config"]

CondKind = Literal["none", "text", "class"]
Prediction = Literal["v", "x0", "x0-change"]


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of ``CausalDiT``.

    Conditioning (``cond``):
      - ``"none"``: no per-video condition and no cross-attention layers (world models whose only
        condition is the per-frame action).
      - ``"text"``: ``cond`` is ``[B, text_len, text_dim]`` text-encoder tokens (Wan: umT5,
        zero-padded to 512), projected by Wan's text MLP. The null condition is a learned
        ``[text_len, text_dim]`` tensor (PixArt's caption dropout), zero at initialisation.
      - ``"class"``: ``cond`` is ``[B]`` integer ids in ``[0, num_classes)``, embedded into
        ``class_tokens`` tokens; id ``num_classes`` is the null class.
    Actions (``num_actions > 0``): per-frame ids in ``[0, num_actions)``; id ``num_actions`` is the
    null action.
    """

    in_channels: int
    out_channels: int
    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    frame_hw: tuple[int, int]  # model-space frame size this config is built for (H, W)
    patch: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw)
    freq_dim: int = 256  # width of the sinusoidal time embedding
    cond: CondKind = "none"
    text_dim: int = 0
    text_len: int = 0
    num_classes: int = 0
    class_tokens: int = 0
    num_actions: int = 0
    # World models: the clean frames just before each frame, concatenated on channels with the
    # noisy frame at the patch embedding (DIAMOND's and GameNGen's frame conditioning). The KV
    # context still carries the longer past; this gives the network the last frames aligned
    # pixel for pixel, so "the same as before, moved by the action" is cheap to learn.
    prev_frames: int = 0
    # Actions also as one-hot planes on the patch embedding's input channels (beside the frame
    # and its previous frames): every patch sees the action directly, not only through the
    # blocks' modulation.
    action_planes: bool = False
    # What the output head predicts. "v" (Wan's): the velocity itself. "x0": the clean frame,
    # returned as the velocity v = (x_s − x0̂)/max(s, X0_MIN_S). In pixel space with large
    # patches (Breakout's 8×8×3 = 192 values a token), a v-head must reproduce the input's
    # noise value for value at high noise, which a small network does poorly (its 1-step
    # samples stay speckled); an x0-head only has to draw the frame ("Back to Basics: Let
    # Denoising Generative Models Denoise", Li & He 2025). "x0-change" (needs prev_frames): the
    # head predicts the change from the last previous frame, x0̂ = prev[-1] + output, so that a
    # fresh model (zero head) already copies the last frame and training spends itself on what
    # moves. Either way forward() returns v.
    prediction: Prediction = "v"
    # x0-heads: a small convolutional head at full resolution that corrects the clean-frame
    # estimate (its width in channels; 0 = none). The patch head draws each 8×8 patch through
    # one linear read-out, which places an object smaller than a patch that moves a few pixels
    # a frame (Breakout's ball) poorly; convolutions over the estimate, the noisy frame, the
    # previous frames and the action planes share their weights across the frame, as DIAMOND's
    # U-Net does. Its output layer starts at zero: adding it leaves a trained model unchanged.
    pixel_head: int = 0
    cross_attn_norm: bool = True  # Wan's affine LayerNorm before cross-attention
    eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        def need(ok: bool, why: str) -> None:
            if not ok:
                raise ValueError(f"invalid DiTConfig: {why}")

        positive = ("in_channels", "out_channels", "dim", "num_layers", "num_heads", "ffn_dim")
        for name in positive:
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(len(self.patch) == 3 and all(p > 0 for p in self.patch), f"patch={self.patch}")
        need(len(self.frame_hw) == 2, f"frame_hw={self.frame_hw} must be (H, W)")
        need(
            self.frame_hw[0] % self.patch[1] == 0 and self.frame_hw[1] % self.patch[2] == 0,
            f"frame_hw={self.frame_hw} is not divisible by the spatial patch {self.patch[1:]}",
        )
        need(self.dim % self.num_heads == 0, f"dim={self.dim} not divisible by heads")
        # Wan's 3D RoPE gives 2·(head_dim//6) dims each to height and width, the rest to time;
        # every part must hold whole (cos, sin) pairs.
        need(
            self.head_dim % 2 == 0 and self.head_dim >= 6,
            f"head_dim={self.head_dim} must be even and ≥ 6 for the 3D RoPE split",
        )
        need(self.freq_dim > 0 and self.freq_dim % 2 == 0, f"freq_dim={self.freq_dim} not even")
        need(self.cond in ("none", "text", "class"), f"cond={self.cond!r}")
        need(self.num_actions >= 0, f"num_actions={self.num_actions}")
        need(self.prev_frames >= 0, f"prev_frames={self.prev_frames}")
        need(
            not self.action_planes or (self.num_actions > 0 and self.patch[0] == 1),
            "action_planes needs num_actions > 0 and a temporal patch of 1",
        )
        need(
            self.prediction in ("v", "x0", "x0-change"),
            f'prediction must be "v", "x0" or "x0-change", got {self.prediction!r}',
        )
        need(
            self.prediction != "x0-change" or self.prev_frames > 0,
            'prediction="x0-change" needs prev_frames > 0 (the frame the change is from)',
        )
        need(self.pixel_head >= 0, f"pixel_head={self.pixel_head} must be ≥ 0")
        need(
            self.pixel_head == 0 or self.prediction != "v",
            'pixel_head corrects a clean-frame estimate: it needs prediction "x0" or "x0-change"',
        )
        need(
            self.pixel_head == 0 or self.patch[0] == 1,
            "pixel_head needs a temporal patch of 1 (it works frame by frame)",
        )
        need(
            self.prev_frames == 0 or self.patch[0] == 1,
            "prev_frames needs a temporal patch of 1 (one model frame per input frame)",
        )
        if self.cond == "text":
            need(self.text_dim > 0 and self.text_len > 0, "cond='text' needs text_dim, text_len")
        if self.cond == "class":
            need(
                self.num_classes > 0 and self.class_tokens > 0,
                "cond='class' needs num_classes and class_tokens",
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_in_channels(self) -> int:
        """Channels the patch embedding reads: the noisy frame, its ``prev_frames`` and, with
        ``action_planes``, one plane per action id (the null action included)."""
        planes = self.num_actions + 1 if self.action_planes else 0
        return self.in_channels * (1 + self.prev_frames) + planes

    @property
    def pixel_head_inputs(self) -> int:
        """Channels the pixel head reads: the clean-frame estimate, the noisy frame, a plane
        holding ``s``, the previous frames and, with actions, one plane per action id."""
        planes = self.num_actions + 1 if self.num_actions else 0
        return self.in_channels * (2 + self.prev_frames) + 1 + planes

    @property
    def tokens_per_frame(self) -> int:
        """Tokens per model frame at ``frame_hw`` (what masks and KV pages are sized by)."""
        return (self.frame_hw[0] // self.patch[1]) * (self.frame_hw[1] // self.patch[2])

    def replace(self, **changes: object) -> DiTConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count of ``CausalDiT(self)``, from the layer shapes (no instantiation)."""
        d, f = self.dim, self.ffn_dim
        patch_volume = self.patch[0] * self.patch[1] * self.patch[2]

        def linear(n_in: int, n_out: int) -> int:
            return n_in * n_out + n_out

        n = self.patch_in_channels * patch_volume * d + d  # patch_embedding (Conv3d)
        n += linear(self.freq_dim, d) + linear(d, d)  # time_embedding
        n += linear(d, 6 * d)  # time_projection
        if self.cond == "text":
            n += linear(self.text_dim, d) + linear(d, d) + self.text_len * self.text_dim
        elif self.cond == "class":
            n += (self.num_classes + 1) * self.class_tokens * d
        if self.num_actions:
            n += (self.num_actions + 1) * d
        attention = 4 * linear(d, d) + 2 * d  # q, k, v, o and the two RMSNorm weights
        block = attention + linear(d, f) + linear(f, d) + 6 * d  # + ffn + modulation
        if self.cond != "none":
            block += attention + (2 * d if self.cross_attn_norm else 0)
        n += self.num_layers * block
        n += linear(d, self.out_channels * patch_volume) + 2 * d  # head
        if self.pixel_head:  # 5×5, 5×5, 5×5 and 3×3 convolutions (models.dit.PixelHead)
            w = self.pixel_head
            n += self.pixel_head_inputs * w * 25 + w + 2 * (w * w * 25 + w)
            n += w * self.out_channels * 9 + self.out_channels
        return n


CONFIGS: dict[str, DiTConfig] = {
    # Tests: every feature on, a few thousand parameters, 8×8 frames → 16 tokens per frame.
    "tiny": DiTConfig(
        in_channels=4,
        out_channels=4,
        dim=24,
        num_layers=2,
        num_heads=2,
        ffn_dim=48,
        frame_hw=(8, 8),
        patch=(1, 2, 2),
        freq_dim=16,
        cond="class",
        num_classes=3,
        class_tokens=2,
        num_actions=4,
    ),
    # The shipped Breakout world model: 64×64 RGB frames through PixelCodec() (no codec
    # patching); the DiT's 8×8 patches give 64 tokens per frame. Conditioned on the 4 Breakout
    # actions (NOOP, FIRE, RIGHT, LEFT) only, as one-hot input planes and through the time
    # embedding. 4.76 M parameters (the planes add 0.18 M to the patch embedding). Sized for the
    # CPU: one frame's forward over a KV context of 8 earlier frames takes ≈11 ms (median; 10.5
    # ms best) on a 2-core CPU with torch 2.15 — 6 layers took ≈13 ms and 5.4 M parameters.
    "breakout": DiTConfig(
        in_channels=3,
        out_channels=3,
        dim=256,
        num_layers=5,
        num_heads=4,
        ffn_dim=1024,
        frame_hw=(64, 64),
        patch=(1, 8, 8),
        cond="none",
        num_actions=4,
        prev_frames=2,
        action_planes=True,
        prediction="x0-change",
    ),
    # Wan2.1-T2V-1.3B shapes (random weights unless loaded): 480×832 video through the Wan VAE
    # (8× spatial) → 60×104 latents → 30×52 = 1560 tokens per latent frame.
    "wan2.1-1.3b": DiTConfig(
        in_channels=16,
        out_channels=16,
        dim=1536,
        num_layers=30,
        num_heads=12,
        ffn_dim=8960,
        frame_hw=(60, 104),
        patch=(1, 2, 2),
        freq_dim=256,
        cond="text",
        text_dim=4096,
        text_len=512,
    ),
}


def get_config(name: str) -> DiTConfig:
    """The named configuration (``tiny``, ``breakout``, ``wan2.1-1.3b``)."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown DiT config {name!r}; known: {', '.join(CONFIGS)}") from None
