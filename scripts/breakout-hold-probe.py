"""What the browser test of `crcm play` asks, without a browser: hold → then ← from the opening.

    python scripts/breakout-hold-probe.py MODEL [--seeds 0,1,2,3] [--hold 45]

A session opens on the shipped model's opening frames (the game's first screens, as `crcm
play` starts), takes NOOP for 10 frames, RIGHT for ``--hold`` frames, then LEFT for as many
(45 frames is 3 seconds at `crcm play`'s 15 frames/s), through the streaming runtime at the
model's own sampler. It prints the paddle's x (native px, ``-`` where the detector finds no
single paddle) every third frame of each hold, and whether each seed ends as the browser test
asks: at the right wall after →, at the left wall after ←.
"""

from __future__ import annotations

import argparse

import numpy as np

import crcm
from crcm.eval.breakout import BreakoutDetector

NOOP, RIGHT, LEFT = 0, 2, 3
OPENING_NOOPS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="pipeline folder or shipped model name")
    parser.add_argument("--seeds", default="0,1,2,3", help="noise seeds (0,1,2,3)")
    parser.add_argument("--hold", type=int, default=45, help="frames per held key (45)")
    args = parser.parse_args()
    pipe = crcm.load(args.model)
    # A trained run's pipeline has no opening frames of its own: start it where the shipped
    # model starts, on the emulator's first screens.
    start = pipe.start or crcm.load("breakout").start
    det = BreakoutDetector(pipe.codec.frame_hw)
    plan = [NOOP] * OPENING_NOOPS + [RIGHT] * args.hold + [LEFT] * args.hold
    seeds = [int(s) for s in args.seeds.split(",")]
    passed, found = 0, []
    for seed in seeds:
        with crcm.Runtime(pipe, max_streams=1) as rt:
            session = rt.open(steps=1, seed=seed, buffer_frames=len(plan) + 64, **start)
            session.push_actions(plan)
            rt.run_until_idle()
            frames = session.read()[-len(plan) :]
        xs = [det.paddle_x(f) for f in frames]
        found += [x is not None for x in xs[OPENING_NOOPS:]]
        right = xs[OPENING_NOOPS : OPENING_NOOPS + args.hold]
        left = xs[OPENING_NOOPS + args.hold :]
        # The browser test's rule: the last 5 frames of each hold, where the paddle is found,
        # past 100 px after → and before 60 px after ←.
        end_right = [x for x in right[-5:] if x is not None]
        end_left = [x for x in left[-5:] if x is not None]
        ok = bool(end_right and end_left and min(end_right) > 100 and max(end_left) < 60)
        passed += ok
        show = " ".join("-" if x is None else f"{x:.0f}" for x in right[::3])
        show_left = " ".join("-" if x is None else f"{x:.0f}" for x in left[::3])
        print(f"seed {seed}: → {show} | ← {show_left} | {'pass' if ok else 'FAIL'}")
    print(
        f"{passed} of {len(seeds)} seeds end at the right wall after → and the left wall after ←; "
        f"the paddle found in {np.mean(found):.0%} of the held frames"
    )


if __name__ == "__main__":
    main()
