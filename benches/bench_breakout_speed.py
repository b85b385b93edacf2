"""Frames/s of Breakout world models in the evaluation's own rollout, one process at a time.

    python benches/bench_breakout_speed.py TEACHER STUDENT [--frames N] [--out PATH]

TEACHER and STUDENT are pipeline folders or shipped names (for the trained models of
scripts/train-breakout.sh: WORK/runs/breakout/teacher-tf/pipeline and the shipped ``breakout``).
The teacher samples with Euler 16 steps and CFG 3 (its evaluation sampler); the student with
its consistency sampler at 1, 2 and 4 steps. Every model generates the same ``N`` frames (one
stream, after 8 context frames of a held-out episode) through ``crcm.eval.harness``, the code
that produced the evaluation table, in the same process, so the ratios compare like with like.
Run it on a quiet machine. PATH defaults to benches/results/breakout-speed-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from crcm.bench import machine, results_path
from crcm.data.atari import AtariEnv, run_episode
from crcm.data.dataset import DEFAULT_POLICY_MIX, EVAL_SEED_BASE, episode_policy
from crcm.eval.harness import load_model

CONTEXT = 8


def frames_per_s(model, frames: np.ndarray, actions: np.ndarray, n: int) -> float:
    ctx, ctx_actions = frames[None, :CONTEXT], actions[None, :CONTEXT].astype(np.int64)
    future = actions[None, CONTEXT : CONTEXT + n].astype(np.int64)
    model.rollout(ctx, ctx_actions, future[:, :4])  # warm-up
    start = time.perf_counter()
    model.rollout(ctx, ctx_actions, future)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("teacher", help="teacher pipeline (Euler 16 + CFG 3)")
    parser.add_argument("student", help="student pipeline or shipped name (1, 2, 4 steps)")
    parser.add_argument("--frames", type=int, default=64, help="frames per model (64)")
    parser.add_argument("--shift", type=float, default=1.0, help="teacher's time_shift (1)")
    parser.add_argument("--out", type=Path, help="JSON result file (default: by machine name)")
    args = parser.parse_args()

    env = AtariEnv("breakout", frameskip=4, frame_hw=(64, 64))
    seed = EVAL_SEED_BASE
    policy = episode_policy("breakout", seed, DEFAULT_POLICY_MIX)
    episode = run_episode(env, policy, seed, max_steps=CONTEXT + args.frames)
    if len(episode.frames) < CONTEXT + args.frames:
        raise SystemExit(f"episode {seed} has {len(episode.frames)} frames; ask for fewer")
    models = [
        ("teacher, Euler 16 + CFG 3", args.teacher, dict(sampler="teacher", steps=16)),
        *((f"student, {n} step", args.student, dict(steps=n)) for n in (1, 2, 4)),
    ]
    rows = []
    for label, path, options in models:
        model = load_model(path, shift=args.shift, name=label, **options)
        with torch.inference_mode():
            fps = frames_per_s(model, episode.frames, episode.actions, args.frames)
        rows.append({"model": label, "pipeline": str(path), "frames_per_s": round(fps, 2)})
        print(f"{label:28s} {fps:8.2f} frames/s", flush=True)
    teacher_fps = rows[0]["frames_per_s"]
    for row in rows:
        row["speed_over_teacher"] = round(row["frames_per_s"] / teacher_fps, 1)
    info = machine()
    out = args.out or results_path("breakout-speed", info)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "frames": args.frames, "context_frames": CONTEXT, "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
