"""An adversarial term for a world model's frames: a small patch critic that tells a true next
frame from a generated one, given the frames before it.

Why: a regression onto a frame whose small object the model cannot place exactly (Breakout's
ball, about one pixel at 64×64) is minimised by a faint smear of it, and a stream that
continues from its smeared frames smears further until the object is gone. A critic sees that
a smear is not what the game's frames look like, so its term asks for the object whole, where
the frames before it say it goes (pix2pix-style, beside the regression that keeps the frame
right; docs/breakout-model.md).

Hinge losses (Lim & Ye 2017), over the patches where the frame moved only: a game frame is
mostly still, and its still patches, alike in true and generated frames, would drown the few
that tell them apart in the mean. No spectral normalisation: what tells the frames apart is a
few pixels, and a critic held to a Lipschitz constant of 1 per layer barely moves on them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Adversary", "FrameCritic", "critic_loss", "generator_loss", "moving_patches"]


class FrameCritic(nn.Module):
    """Patch logits ``[B, 1, H/4, W/4]`` for frames ``[B, C, H, W]`` after ``prev``
    (``[B, K·C, H, W]``, the frames before each, oldest first): high for true frames.

    Four convolutions, two of stride 2: each logit sees about 22 × 22 pixels, enough for a
    small object and where it was a frame or two before."""

    def __init__(self, channels: int, prev_channels: int, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + prev_channels, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, padding=1),
        )

    def forward(self, frame_B_C_H_W: Tensor, prev_B_KC_H_W: Tensor) -> Tensor:
        return self.net(torch.cat([prev_B_KC_H_W, frame_B_C_H_W], dim=1))


def moving_patches(frame: Tensor, prev: Tensor, like: Tensor, threshold: float = 0.05) -> Tensor:
    """``[B, 1, h, w]`` weights of the critic's patches (``like``'s size): 1 where ``frame``
    differs from the last frame of ``prev`` by more than ``threshold``, 0 elsewhere."""
    C = frame.shape[1]
    moved = ((frame - prev[:, -C:]).abs().amax(1, keepdim=True) > threshold).to(frame.dtype)
    return nn.functional.adaptive_max_pool2d(moved, like.shape[-2:])


def _patch_weights(real: Tensor, fake: Tensor, prev: Tensor, like: Tensor) -> Tensor:
    """The patches where the true or the generated frame moved."""
    with torch.no_grad():
        return torch.maximum(moving_patches(real, prev, like), moving_patches(fake, prev, like))


def _mean_over(weights: Tensor, values: Tensor) -> Tensor:
    return (weights * values).sum() / weights.sum().clamp_min(1.0)


def critic_loss(critic: FrameCritic, real: Tensor, fake: Tensor, prev: Tensor) -> Tensor:
    """The critic's hinge loss ``E relu(1 − D(real)) + E relu(1 + D(fake))`` over the moving
    patches (2 at chance, 0 once every moving patch is told apart with a margin)."""
    fake = fake.detach()
    d_real, d_fake = critic(real, prev), critic(fake, prev)
    weights = _patch_weights(real, fake, prev, d_real)
    return _mean_over(weights, torch.relu(1 - d_real)) + _mean_over(weights, torch.relu(1 + d_fake))


def generator_loss(critic: FrameCritic, fake: Tensor, prev: Tensor, real: Tensor) -> Tensor:
    """The generator's hinge term ``−E D(fake)`` over the same patches. Its gradient reaches
    ``fake`` only: the critic's weights are not trained by it."""
    flags = [p.requires_grad for p in critic.parameters()]
    critic.requires_grad_(False)
    try:
        d_fake = critic(fake, prev)
        return -_mean_over(_patch_weights(real, fake, prev, d_fake), d_fake)
    finally:
        for p, flag in zip(critic.parameters(), flags, strict=True):
            p.requires_grad_(flag)


class Adversary:
    """A critic, its optimizer and the weight of its term in a generator's loss.

    :meth:`generator_term` adds ``weight · generator_loss`` to a loss and keeps the frames it
    judged; :meth:`update` then trains the critic on them (``updates`` steps), so the critic
    learns from exactly the frames the generator was judged on, at no extra forward."""

    def __init__(
        self,
        critic: FrameCritic,
        optimizer: torch.optim.Optimizer,
        *,
        weight: float,
        updates: int = 1,
    ) -> None:
        if weight < 0 or updates < 1:
            raise ValueError(f"need weight >= 0 and updates >= 1, got {weight}, {updates}")
        self.critic, self.optimizer = critic, optimizer
        self.weight, self.updates = weight, updates
        self._seen: list[tuple[Tensor, Tensor, Tensor]] = []

    def generator_term(self, fake: Tensor, real: Tensor, prev: Tensor) -> Tensor:
        """``weight · generator_loss`` of the frames ``fake`` (``[N, C, H, W]``, with gradient)
        beside the true ``real`` after ``prev``; the three are kept for :meth:`update`."""
        self._seen.append((real.detach(), fake.detach(), prev.detach()))
        return self.weight * generator_loss(self.critic, fake, prev, real)

    def update(self) -> float | None:
        """Trains the critic on the frames judged since the last update (then forgets them);
        returns its mean hinge loss, or None when nothing was judged."""
        if not self._seen:
            return None
        # In the critic's own precision: the frames may come from a bf16 forward.
        dtype = next(self.critic.parameters()).dtype
        real, fake, prev = (torch.cat(p).to(dtype) for p in zip(*self._seen, strict=True))
        self._seen.clear()
        total = 0.0
        for _ in range(self.updates):
            with torch.autocast(real.device.type, enabled=False):
                loss = critic_loss(self.critic, real, fake, prev)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach())
        return total / self.updates
