"""Does a Breakout model move the ball? One denoiser forward per held-out frame, at several
noise levels.

    python scripts/breakout-ball-probe.py MODEL [--times 1,0.5,0.1]

For every frame of 4 held-out episodes in which the ball moves by at least 2 native px, the
model gets the frame's two true previous frames and its action, and the frame itself noised
to RF time ``s``: one forward of that frame alone (the previous frames on its input
channels, no KV context; the streamed 1-step frame, `crcm eval`'s ball error at h1, agrees
with it). Its clean-frame estimate ``x0̂ = x_s − s·v`` is compared with the truth on the
playfield pixels that changed (above the paddle rows: the ball, and a brick it knocks out).
Printed per ``s``: their mean squared error (model units) beside copying the last frame, and
in how many frames the detector finds the ball within 4 native px of the emulator's.

A model that has learnt the ball's motion beats copy-last-frame at ``s = 1`` (its 1-step
frame); one that denoises at all follows the ball at ``s = 0.1``, where the noisy frame shows
it plainly. The shipped model does neither: it is barely below copy-last-frame at ``s = 1``
and keeps the old ball at ``s = 0.1`` (docs/breakout-model.md, "The ball").
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import crcm
from crcm.data.atari import AtariEnv, run_episode
from crcm.data.dataset import DEFAULT_POLICY_MIX, EVAL_SEED_BASE, episode_policy
from crcm.eval.breakout import BreakoutDetector

EPISODES, MAX_STEPS, EVERY = 4, 400, 7
PADDLE_ROWS = 54  # model rows from here down hold the paddle (64×64 frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="pipeline folder or shipped model name")
    parser.add_argument("--times", default="1,0.5,0.1", help="RF times s to probe (1,0.5,0.1)")
    args = parser.parse_args()
    times = [float(s) for s in args.times.split(",")]
    pipe = crcm.load(args.model)
    model, codec = pipe.model.float().eval(), pipe.codec
    if model.cfg.prev_frames != 2 or not model.cfg.num_actions:
        raise SystemExit("the probe needs an action model with prev_frames = 2 (Breakout's)")
    env = AtariEnv("breakout", frameskip=4, frame_hw=(64, 64))
    det = BreakoutDetector((64, 64))
    target, prev, action = [], [], []
    for e in range(EPISODES):
        seed = EVAL_SEED_BASE + e
        policy = episode_policy("breakout", seed, DEFAULT_POLICY_MIX)
        ep = run_episode(env, policy, seed, max_steps=MAX_STEPS)
        frames, actions = np.asarray(ep.frames), np.asarray(ep.actions)
        for t in range(20, len(frames) - 1, EVERY):
            before, after = det.ball_xy(frames[t]), det.ball_xy(frames[t + 1])
            if before is None or after is None or np.hypot(*np.subtract(before, after)) < 2:
                continue
            target.append(frames[t + 1])
            prev.append((frames[t - 1], frames[t]))
            action.append(actions[t + 1])
    x0 = codec.encode(np.asarray(target)[:, None])
    # Each frame's two previous frames, oldest first, on its channels.
    prev_B_1 = torch.cat([codec.encode(np.asarray(p)[:, None]) for p in zip(*prev, strict=True)], 2)
    actions = torch.tensor(np.asarray(action))[:, None].long()
    last = prev_B_1[:, :, -3:]
    playfield = (x0 - last).abs().amax(2, keepdim=True) > 1e-3
    playfield[..., PADDLE_ROWS:, :] = False
    n = playfield.sum() * 3

    def mse(a: torch.Tensor) -> float:
        return float(((a - x0).square() * playfield).sum() / n)

    truth = [det.ball_xy(f) for f in codec.decode(x0)[:, 0].numpy()]
    print(f"{len(x0)} held-out frames with a moving ball; copy-last-frame error {mse(last):.4f}")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in times:
            noise = torch.randn(x0.shape, generator=gen)
            x_s = (1 - s) * x0 + s * noise
            s_B_1 = torch.full((len(x0), 1), s)
            est = x_s - s * model(x_s, s_B_1, actions_B_T=actions, prev_B_T_C_H_W=prev_B_1)
            near = [
                b is not None and t is not None and np.hypot(*np.subtract(b, t)) <= 4
                for b, t in zip(
                    (det.ball_xy(f) for f in codec.decode(est)[:, 0].numpy()), truth, strict=True
                )
            ]
            print(
                f"s = {s:g}: playfield error {mse(est):.4f}, ball within 4 px {np.mean(near):.0%}"
            )


if __name__ == "__main__":
    main()
