"""Where does a Breakout model's ball go over a stream? Frame by frame, from true context.

    python scripts/breakout-ball-fading.py MODEL [--steps 1] [--still-grey 16]

From 8 held-out episodes, every start (frame 30 and every 37th after it) where the emulator's
ball is in view for the 8 frames after it: the model streams those 8 frames through the
runtime from the 8 true frames before them, under the episode's own actions. Printed per
horizon h1–h8 (medians over the starts):

- ball found: the share of starts in which the detector finds the ball as one object
  (``crcm eval``'s ball-found number averages these over h ≤ 8, on its own starts);
- mass: the model's red (R − G) within 4 pixels of the true ball, over the true frame's;
- peak: the model's reddest pixel there, as a share of full red (the true ball's own peak is
  below 1 wherever it straddles pixels).

A ball that is drawn whole keeps mass and peak near the truth's; one that is smeared keeps
its mass as its peak falls; one that fades loses both (docs/breakout-model.md, "What is
left": the shipped head's peak falls from 0.51 at h1 to 0.14 at h5).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

import crcm
from crcm.data.atari import AtariEnv, run_episode
from crcm.data.dataset import DEFAULT_POLICY_MIX, EVAL_SEED_BASE, episode_policy
from crcm.eval.breakout import RED_SPAN, BreakoutDetector
from crcm.eval.harness import PipelineModel

CONTEXT, HORIZON, EPISODES, FIRST, EVERY, RADIUS = 8, 8, 8, 30, 37, 4


def starts(frame_hw: tuple[int, int], detector: BreakoutDetector):
    """``(context, context_actions, actions, truth)`` arrays of every start where the ball
    stays in view."""
    env = AtariEnv("breakout", frameskip=4, frame_hw=frame_hw)
    picked: list[tuple[np.ndarray, ...]] = []
    for e in range(EPISODES):
        seed = EVAL_SEED_BASE + e
        policy = episode_policy("breakout", seed, DEFAULT_POLICY_MIX)
        episode = run_episode(env, policy, seed, max_steps=400)
        frames, actions = np.asarray(episode.frames), np.asarray(episode.actions)
        for t in range(FIRST, len(frames) - HORIZON - 1, EVERY):
            if all(detector.ball_xy(frames[t + h]) is not None for h in range(HORIZON + 1)):
                picked.append(
                    (
                        frames[t - CONTEXT + 1 : t + 1],
                        actions[t - CONTEXT + 1 : t + 1],
                        actions[t + 1 : t + 1 + HORIZON],
                        frames[t + 1 : t + 1 + HORIZON],
                    )
                )
    if not picked:
        raise SystemExit("no start keeps the ball in view: nothing to measure")
    return tuple(np.stack(parts) for parts in zip(*picked, strict=True))


def redness(frame: np.ndarray) -> np.ndarray:
    """Red coverage per pixel, as the detector reads it: 1 where the ball's colour fills it."""
    f = frame.astype(np.float64)
    return np.clip((f[..., 0] - f[..., 1]) / RED_SPAN, 0.0, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="pipeline folder or shipped model name")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps per frame (1)")
    parser.add_argument(
        "--still-grey",
        type=float,
        default=None,
        help="the sampler's still threshold in grey levels (default: the pipeline's)",
    )
    args = parser.parse_args()
    pipe = crcm.load(args.model)
    if pipe.model.cfg.num_actions == 0:
        raise SystemExit(f"{args.model} takes no actions: this measures a Breakout world model")
    h, w = pipe.frame_shape[:2]
    detector = BreakoutDetector((h, w))
    context, context_actions, actions, truth = starts((h, w), detector)
    sampler = pipe.sampler
    if args.still_grey is not None:
        sampler = replace(sampler, still_threshold=args.still_grey / 127.5)
    model = PipelineModel(pipe, sampler=sampler, steps=args.steps)
    out = model.rollout(context, context_actions, actions, seed=0)
    found = np.zeros((len(out), HORIZON))
    mass, peak = np.zeros_like(found), np.zeros_like(found)
    for b in range(len(out)):
        for t in range(HORIZON):
            found[b, t] = detector.ball_xy(out[b, t]) is not None
            x, y = detector.ball_xy(truth[b, t])  # native px
            cy, cx = int(y * detector.sy), int(x * detector.sx)
            near = (
                slice(max(cy - RADIUS, 0), cy + RADIUS + 1),
                slice(max(cx - RADIUS, 0), cx + RADIUS + 1),
            )
            model_red, true_red = redness(out[b, t])[near], redness(truth[b, t])[near]
            mass[b, t] = model_red.sum() / max(true_red.sum(), 1e-6)
            peak[b, t] = model_red.max()
    print(f"{args.model}: {len(out)} starts with the ball in view for {HORIZON} frames")
    print("horizon          " + " ".join(f"{f'h{t + 1}':>5}" for t in range(HORIZON)))
    for name, values in (
        ("ball found", found.mean(0)),
        ("mass (median)", np.median(mass, 0)),
        ("peak (median)", np.median(peak, 0)),
    ):
        print(f"{name:<17}" + " ".join(f"{v:5.2f}" for v in values))
    print(f"ball found at h <= {HORIZON}: {100 * found.mean():.0f} %")


if __name__ == "__main__":
    main()
