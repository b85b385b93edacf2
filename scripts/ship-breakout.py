"""Copies a trained Breakout pipeline into the package as the shipped ``breakout`` model.

    python scripts/ship-breakout.py breakout-work/runs/breakout/causal-rcm/sf-dmd/pipeline

The EMA weights are stored in float16 (half the bytes; ``crcm.load`` returns float32), and the
shipped sampler is the recipe's 1-step consistency sampler with the run's KV window and a still
threshold of 16 grey levels (docs/breakout-model.md). The pipeline's opening frames (where play
and demo sessions begin) are the emulator's first screens after a reset: the reset frame, then
FIRE (the ball is served) and NOOPs.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import crcm
from crcm.data.atari import NO_ACTION, AtariEnv
from crcm.pipeline import SHIPPED_DIR

OPENING_ACTIONS = (NO_ACTION, 1, 0, 0)  # reset, FIRE, NOOP, NOOP (Breakout's minimal ids)
# Generated pixels that change by fewer grey levels than this keep the frame before's value
# (SamplerConfig.still_threshold): 8, 16 and 24 were measured; 16 and 24 scored alike.
STILL_GREY = 16.0


def opening_frames(frame_hw: tuple[int, int]) -> np.ndarray:
    """The first screens of a Breakout game at the model's resolution and frameskip 4."""
    env = AtariEnv("breakout", frameskip=4, frame_hw=frame_hw)
    frames = [env.reset()]
    frames += [env.step(a)[0] for a in OPENING_ACTIONS[1:]]
    return np.stack(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipeline", type=Path, help="the trained pipeline folder")
    parser.add_argument("--steps", type=int, default=1, help="default sampling steps (1)")
    parser.add_argument(
        "--still-grey",
        type=float,
        default=STILL_GREY,
        help=f"the sampler's still threshold in grey levels ({STILL_GREY:g}; 0: off)",
    )
    args = parser.parse_args()
    pipe = crcm.load(args.pipeline)
    pipe.name = "breakout"
    pipe.sampler = replace(
        pipe.sampler.with_steps(args.steps), still_threshold=args.still_grey / 127.5
    )
    pipe.start_frames = opening_frames(pipe.codec.frame_hw)
    pipe.start_actions = OPENING_ACTIONS
    pipe.model.to(torch.float16)
    out = pipe.save(SHIPPED_DIR / "breakout")
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"shipped {args.pipeline} as {out} ({size:.1f} MB)")
    # What users get back: float32 weights equal to the float16 ones.
    back = crcm.load("breakout")
    ref = pipe.model.state_dict()
    assert all(torch.equal(v, ref[k].float()) for k, v in back.model.state_dict().items())
    print(f"crcm.load('breakout'): {sum(p.numel() for p in back.model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
