"""Can a small patch critic tell a Breakout model's 1-step frames from the true ones?

    python scripts/breakout-critic-probe.py MODEL DATA [--updates 2000] [--lr 1e-3]

MODEL is a pipeline folder or shipped name, DATA a `crcm collect` folder (its clips, e.g.
`data/breakout-keys`). For 48 training and 12 held-out batches of 8 four-frame clips, the model
predicts every frame from pure noise given its true past (1 step, as it streams at h1); a
critic of four convolutions then learns, with hinge losses on the patches where the frame moved,
to score the true frame above the model's, given the two frames before. Printed every 500
updates: the training and held-out hinge losses (2 = chance) and the share of held-out moving
patches where true and generated frames differ and the critic ranks the true one higher.

Why: an adversarial term is one way to make a 1-step head draw the ball whole instead of a
faint mean of where it may be (docs/breakout-model.md, "What is left"). With one critic update
per training step the critic stayed at chance for 110 steps; this measures how many updates it
needs before it can serve as such a term (on the shipped model: 99 % ranked right after 2,000).
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import crcm
from crcm.training.config import DataConfig
from crcm.training.data import make_source
from crcm.training.objectives import own_predictions

TRAIN_BATCHES, HELD_OUT_BATCHES, BATCH, HELD_OUT_FROM = 48, 12, 8, 1000


class PatchCritic(nn.Module):
    """Logits ``[B, 1, H/4, W/4]`` for frames ``[B, C, H, W]`` after ``prev`` (``[B, K·C, H,
    W]``): four convolutions, two of stride 2; each logit sees about 22 × 22 pixels."""

    def __init__(self, channels: int, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, padding=1),
        )

    def forward(self, frame: Tensor, prev: Tensor) -> Tensor:
        return self.net(torch.cat([prev, frame], dim=1))


def moving_patches(frame: Tensor, prev: Tensor, size: tuple[int, int]) -> Tensor:
    """1 on the critic's patches where ``frame`` differs from the last previous frame: a game
    frame is mostly still, and its still patches would drown the rest in the mean."""
    C = frame.shape[1]
    moved = ((frame - prev[:, -C:]).abs().amax(1, keepdim=True) > 0.05).float()
    return nn.functional.adaptive_max_pool2d(moved, size)


def hinge(critic: PatchCritic, real: Tensor, fake: Tensor, prev: Tensor) -> Tensor:
    d_real, d_fake = critic(real, prev), critic(fake, prev)
    size = d_real.shape[-2:]
    w = torch.maximum(moving_patches(real, prev, size), moving_patches(fake, prev, size))
    mean = lambda x: (w * x).sum() / w.sum().clamp_min(1.0)  # noqa: E731
    return mean(torch.relu(1 - d_real)) + mean(torch.relu(1 + d_fake))


@torch.no_grad()
def frames(pipe, source, steps) -> tuple[Tensor, Tensor, Tensor]:
    """True frames, the model's 1-step predictions of them and the frames before each."""
    model = pipe.model
    real, fake, prev = [], [], []
    for step in steps:
        b = source.batch(step, BATCH)
        x0 = b.x0_B_T_C_H_W
        own = own_predictions(model, x0, 1, b.cond, b.actions_B_T, b.history_B_K_C_H_W, None)
        real.append(x0.flatten(0, 1))
        fake.append(own.flatten(0, 1))
        prev.append(model.previous_frames(x0, b.history_B_K_C_H_W).flatten(0, 1))
    return torch.cat(real), torch.cat(fake), torch.cat(prev)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="pipeline folder or shipped model name")
    parser.add_argument("data", help="a `crcm collect` folder")
    parser.add_argument("--updates", type=int, default=2000, help="critic updates (2000)")
    parser.add_argument("--lr", type=float, default=1e-3, help="critic learning rate (1e-3)")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = crcm.load(args.model)
    pipe.model.float().eval()
    if not pipe.model.cfg.prev_frames:
        raise SystemExit("the probe needs a world model with prev_frames (Breakout's)")
    data = DataConfig(kind="atari", path=args.data, frames=4)
    source = make_source(data, pipe.codec, pipe.model.cfg)
    real, fake, prev = frames(pipe, source, range(TRAIN_BATCHES))
    held = frames(pipe, source, range(HELD_OUT_FROM, HELD_OUT_FROM + HELD_OUT_BATCHES))
    print(f"{len(real)} training and {len(held[0])} held-out frames")
    critic = PatchCritic(real.shape[1] + prev.shape[1])
    opt = torch.optim.AdamW(critic.parameters(), lr=args.lr, betas=(0.5, 0.999), weight_decay=0)
    for update in range(args.updates + 1):
        pick = torch.randint(0, len(real), (64,))
        loss = hinge(critic, real[pick], fake[pick], prev[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if update % 500 == 0:
            with torch.no_grad():
                h_real, h_fake, h_prev = held
                d_real, d_fake = critic(h_real, h_prev), critic(h_fake, h_prev)
                size = d_real.shape[-2:]
                moved = torch.maximum(
                    moving_patches(h_real, h_prev, size), moving_patches(h_fake, h_prev, size)
                )
                gap = (h_real - h_fake).abs().amax(1, keepdim=True)
                differ = (moved > 0) & (nn.functional.adaptive_max_pool2d(gap, size) > 0.1)
                right = float(((d_real > d_fake) & differ).sum() / differ.sum().clamp_min(1))
                held_loss = float(hinge(critic, *held))
            print(
                f"update {update}: hinge {loss.item():.3f}, held out {held_loss:.3f}, true frame "
                f"ranked higher in {100 * right:.0f} % of {int(differ.sum())} differing patches"
            )


if __name__ == "__main__":
    main()
