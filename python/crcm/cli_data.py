"""``crcm collect``, ``crcm eval`` and ``crcm eval-table``: Atari data collection, evaluation
against the emulator, and comparison of evaluation reports.

``crcm.cli`` wires these in with ``add_collect_parser(sub)``, ``add_eval_parser(sub)`` and
``add_eval_table_parser(sub)``; user mistakes raise ``CrcmError``/``ValueError``, which
``crcm.cli.main`` prints as one line (exit 2).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

__all__ = ["add_collect_parser", "add_eval_parser", "add_eval_table_parser"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 8:
        raise argparse.ArgumentTypeError(f"expected a size like 64 or 96x96 (>= 8), got {text!r}")
    return parts[0], parts[1]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def _policy_mix(text: str) -> tuple[tuple[str, float], ...]:
    """``tracker:0.5,keys:0.5`` → ``(("tracker", 0.5), ("keys", 0.5))`` (names are checked by
    the collection, against the registered policies)."""
    mix = []
    for item in text.split(","):
        name, _, weight = item.partition(":")
        try:
            value = float(weight)
        except ValueError:
            value = 0.0  # refused below, as a weight of 0 is
        if not name.strip() or not 0 < value < math.inf:  # NaN fails the comparison too
            raise argparse.ArgumentTypeError(
                f"expected NAME:WEIGHT,... with positive weights, got {text!r}"
            )
        mix.append((name.strip(), value))
    return tuple(mix)


def _cmd_collect(args: argparse.Namespace) -> int:
    from crcm.data.dataset import AtariDataset, CollectConfig, collect

    games = tuple(g.strip() for g in args.game.split(",") if g.strip())
    eval_episodes = args.eval_episodes
    if eval_episodes is None:
        eval_episodes = max(1, args.episodes // 10)
    cfg = CollectConfig(
        games=games,
        train_episodes=args.episodes,
        eval_episodes=eval_episodes,
        frameskip=args.frameskip,
        frame_hw=args.size,
        max_steps=args.max_steps,
        seed=args.seed,
        episodes_per_shard=args.shard_episodes,
        **({} if args.policies is None else {"policy_mix": args.policies}),
    )
    folder = collect(args.out, cfg, progress=not args.quiet)
    ds = AtariDataset(folder, verify=False)
    print(
        f"{folder}: {len(ds)} episodes ({len(ds.episodes_of('train'))} train, "
        f"{len(ds.episodes_of('eval'))} eval), {ds.num_frames} frames of "
        f"{ds.frame_hw[0]}x{ds.frame_hw[1]} at frameskip {ds.frameskip}"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    import torch

    from crcm.eval.harness import CopyLastFrame, EvalConfig, evaluate, load_model
    from crcm.eval.targets import describe

    model = load_model(
        args.model,
        steps=args.steps,
        sampler=args.sampler,
        shift=args.shift,
        name=args.name,
        dtype=getattr(torch, args.dtype),
        still_threshold=None if args.still_grey is None else args.still_grey / 127.5,
    )
    frame_hw = args.size
    if frame_hw is None:
        shape = getattr(getattr(model, "pipeline", None), "frame_shape", (64, 64))
        frame_hw = (int(shape[0]), int(shape[1]))
    models = [model] if isinstance(model, CopyLastFrame) else [model, CopyLastFrame()]
    cfg = EvalConfig(
        episodes=args.episodes,
        starts_per_episode=args.starts,
        context_frames=args.context,
        horizons=args.horizons,
        control_horizon=args.control_horizon,
        frameskip=args.frameskip,
        frame_hw=frame_hw,
        max_steps=args.max_steps,
        long_rollout=args.long_rollout,
        seed=args.seed,
    )
    report = evaluate(models, cfg, progress=not args.quiet)
    report["model"] = model.name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, res in report["models"].items():
        cells = []
        for hz, stats in res["horizons"].items():
            dyn = stats.get("psnr_dynamic")
            cells.append(
                f"h{hz} PSNR {stats['psnr']:.1f} dyn {'-' if dyn is None else f'{dyn:.1f}'}"
            )
        print(f"{name}: " + ", ".join(cells))
        for line in describe(res):
            print(f"  {line}")
    print(f"{report['windows']} windows; results written to {args.out}")
    return 0


def _cmd_eval_table(args: argparse.Namespace) -> int:
    from crcm.eval.report import load_reports, markdown_table, svg_plot

    table = load_reports(args.reports)
    text = markdown_table(table)
    print(text, end="")
    for path, content in ((args.markdown, text), (args.plot, None)):
        if path is None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(svg_plot(table) if content is None else content)
        print(f"written to {path}")
    return 0


def add_collect_parser(sub) -> argparse.ArgumentParser:
    """Adds ``crcm collect`` to the ``crcm`` subparsers."""
    p = sub.add_parser(
        "collect",
        help="collect Atari episodes into a dataset folder (resumable)",
        description="Plays Atari games in the ale-py emulator with scripted and random policies "
        "and writes frames, actions, rewards and episode ends as memory-mappable shards with a "
        "manifest. Evaluation episodes use seeds disjoint from training ones. Run the same "
        "command again to resume an interrupted collection.",
    )
    p.add_argument("--game", default="breakout", help="ALE game id(s), comma-separated (breakout)")
    p.add_argument("--episodes", type=_positive, default=100, help="training episodes (100)")
    p.add_argument(
        "--eval-episodes", type=int, help="held-out evaluation episodes (episodes/10, at least 1)"
    )
    p.add_argument("--out", type=Path, required=True, help="dataset folder")
    p.add_argument("--frameskip", type=_positive, default=4, help="emulator frames per step (4)")
    p.add_argument("--size", type=_size, default=(64, 64), help="frame size, e.g. 64 or 96x96")
    p.add_argument("--max-steps", type=_positive, default=2000, help="steps per episode cap")
    p.add_argument("--seed", type=int, default=0, help="first training seed (0)")
    p.add_argument("--shard-episodes", type=_positive, default=16, help="episodes per shard")
    p.add_argument(
        "--policies",
        type=_policy_mix,
        help="policy mix, NAME:WEIGHT,... (tracker:0.75,random:0.25); policies: "
        "tracker (follows the ball), random (a random action each step), keys (an action held "
        "1-48 steps, as a person at the keyboard)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_collect)
    return p


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """Adds ``crcm eval`` to the ``crcm`` subparsers."""
    p = sub.add_parser(
        "eval",
        help="measure a world model against the Breakout emulator",
        description="From k ground-truth context frames of held-out episodes and their real "
        "actions, generates the next frames and compares them with the emulator's at several "
        "horizons: PSNR/SSIM (whole frame and dynamic region) and paddle/ball/brick accuracy; "
        "plays LEFT held, RIGHT held and LEFT/RIGHT alternating from the same starts in the "
        "emulator and the model (paddle error, action sensitivity, direction agreement beside "
        "a shuffled-action control, paddle/ball found as one object, the teacher-forced context "
        "check) and reports the world-model targets met or failed, always beside the "
        "copy-last-frame baseline.",
    )
    p.add_argument(
        "--model", required=True, help="pipeline folder, shipped model name, or copy-last-frame"
    )
    p.add_argument("--episodes", type=_positive, default=8, help="held-out episodes (8)")
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--starts", type=_positive, default=2, help="windows per episode (2)")
    p.add_argument("--context", type=_positive, default=8, help="context frames k (8)")
    p.add_argument("--horizons", type=_ints, default=(1, 8, 32, 128), help="(1,8,32,128)")
    p.add_argument(
        "--control-horizon",
        type=_positive,
        default=32,
        help="steps of the scripted LEFT/RIGHT/alternating rollouts (32)",
    )
    p.add_argument("--steps", type=_positive, help="sampling steps (the pipeline's default)")
    p.add_argument(
        "--sampler",
        choices=("consistency", "teacher"),
        help="sampler preset instead of the pipeline's (teacher: Euler with CFG 3)",
    )
    p.add_argument(
        "--shift",
        type=float,
        default=5.0,  # crcm.sampling.DEFAULT_SHIFT, without torch
        help="Euler grid shift of --sampler teacher (5)",
    )
    p.add_argument("--name", help="the model's label in the report (the pipeline's name)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="precision the model runs in (float32)",
    )
    p.add_argument(
        "--still-grey",
        type=float,
        help="hold generated pixels that changed by fewer grey levels than this at the frame "
        "before (the sampler's still_threshold; default: the pipeline's, 0 = off)",
    )
    p.add_argument(
        "--long-rollout", type=int, default=1000, help="frames of the drift rollout (1000; 0: none)"
    )
    p.add_argument("--frameskip", type=_positive, default=4, help="must match training (4)")
    p.add_argument("--size", type=_size, help="frame size (the model's)")
    p.add_argument("--max-steps", type=_positive, default=2000, help="steps per episode cap")
    p.add_argument("--seed", type=int, default=0, help="offset into the evaluation seeds (0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)
    return p


def add_eval_table_parser(sub) -> argparse.ArgumentParser:
    """Adds ``crcm eval-table`` to the ``crcm`` subparsers."""
    p = sub.add_parser(
        "eval-table",
        help="compare the models of several `crcm eval` reports in one table and plot",
        description="Merges `crcm eval` JSON reports made on the same held-out windows (one "
        "model each, plus the copy-last-frame baseline they all hold) and prints one Markdown "
        "table with a row per model: dynamic-region and whole-frame PSNR and drift, then a "
        "second with the scripted-action and object metrics (paddle error, action sensitivity, "
        "direction agreement and its shuffled control, paddle/ball found, ball error, the "
        "context check) marked against the world-model targets. Optionally writes the tables "
        "and an SVG plot of metrics against the horizon.",
    )
    p.add_argument("reports", nargs="+", type=Path, metavar="REPORT.json", help="crcm eval output")
    p.add_argument("--markdown", type=Path, metavar="OUT.md", help="also write the table here")
    p.add_argument(
        "--plot", type=Path, metavar="OUT.svg", help="write an SVG plot of metrics by horizon"
    )
    p.set_defaults(func=_cmd_eval_table)
    return p
