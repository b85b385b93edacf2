"""Draws docs/breakout-rollouts.png: a Breakout model beside the emulator under held keys.

    python scripts/breakout-strip.py MODEL docs/breakout-rollouts.png

From one held-out state (8 true frames of context, through the streaming runtime), rows from
the top: the emulator with RIGHT held, the model with RIGHT held, the emulator with LEFT held,
the model with LEFT held; 8 frames each, at the model's own sampler (1 step per frame for a
shipped model). Frames are scaled 3× with nearest-neighbour sampling.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

import crcm
from crcm.data.atari import AtariEnv, run_episode
from crcm.data.dataset import DEFAULT_POLICY_MIX, EVAL_SEED_BASE, episode_policy
from crcm.eval.harness import PipelineModel

RIGHT, LEFT = 2, 3
CONTEXT, FRAMES, START = 8, 8, 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="pipeline folder or shipped model name")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--seed", type=int, default=0, help="held-out episode index (0)")
    args = parser.parse_args()
    model = PipelineModel(crcm.load(args.model))
    env = AtariEnv("breakout", frameskip=4, frame_hw=(64, 64))
    seed = EVAL_SEED_BASE + args.seed
    ep = run_episode(
        env,
        episode_policy("breakout", seed, DEFAULT_POLICY_MIX),
        seed,
        max_steps=START + 1,
        snapshot_at={START},
    )
    ctx = np.asarray(ep.frames[START - CONTEXT + 1 : START + 1])[None]
    ctx_actions = np.asarray(ep.actions[START - CONTEXT + 1 : START + 1])[None].astype(np.int64)
    rows = []
    for action in (RIGHT, LEFT):
        env.restore_state(ep.states[START])
        emulator = np.stack([env.step(action)[0] for _ in range(FRAMES)])
        generated = model.rollout(ctx, ctx_actions, np.full((1, FRAMES), action), seed=0)[0]
        rows += [np.concatenate(list(emulator), 1), np.concatenate(list(generated), 1)]
    img = np.concatenate(rows, 0)
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
