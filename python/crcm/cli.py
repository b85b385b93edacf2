"""The ``crcm`` command line. User mistakes end in one clear line on stderr, not a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from crcm.errors import CrcmError


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _counts(text: str) -> tuple[int, ...]:
    counts = _int_list(text)
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return counts


def _steps(text: str) -> tuple[int, ...]:
    steps = _int_list(text)
    if not steps or min(steps) < 1 or max(steps) > 4:
        raise argparse.ArgumentTypeError(f"steps must be between 1 and 4, got {text!r}")
    return steps


def _contexts(text: str) -> tuple[str, ...]:
    from crcm.bench import CONTEXTS

    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names or any(n not in CONTEXTS for n in names):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(CONTEXTS)}, got {text!r}"
        )
    return names


def _cmd_demo(args: argparse.Namespace) -> int:
    from crcm.demo import run_demo

    report = run_demo(
        model=args.model,
        streams=args.streams,
        frames_per_stream=args.frames,
        steps=args.steps,
        seed=args.seed,
        progress=not args.quiet,
        check_starts=args.check_starts,
    )
    print(report.summary())
    if args.out is not None:
        import numpy as np

        arrays = {f"stream_{sid}": f for sid, f in report.frames_by_stream.items()}
        np.savez_compressed(args.out, **arrays)
        print(f"frames written to {args.out} (uint8 [frames, H, W, 3] per stream)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json
    import time

    import torch

    from crcm.bench import machine, run_suite, run_wan_suite
    from crcm.pipeline import Pipeline, load
    from crcm.sampling import SamplerConfig

    dtype = getattr(torch, args.dtype)
    if args.model == "tiny":
        pipe = Pipeline.from_config(
            "tiny", sampler=SamplerConfig(sink_frames=1, window_frames=8), name="tiny"
        )
        pipe.model.to(dtype)
    else:
        pipe = load(args.model, dtype=dtype)
    streams = args.streams or ((1, 8) if args.quick else (1, 8, 32))
    rows = run_suite(
        pipe,
        steps=args.steps,
        streams=streams,
        contexts=args.contexts,
        compiles=(False, True) if args.compile else (False,),
        frames=16 if args.quick else 64,
        repeats=1 if args.quick else 3,
    )
    rows += run_wan_suite(frames=8 if args.quick else 48)  # real shapes, when CUDA is present
    record = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"results written to {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from crcm.training.config import load_config
    from crcm.training.trainer import train

    cfg = load_config(args.config, list(args.overrides), stage=args.stage)
    out = train(cfg, progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only rank 0 reports
    print(f"{cfg.stage}: run folder {out}")
    if (out / "pipeline").is_dir():
        print(
            f"trained pipeline: {out / 'pipeline'} (crcm.load, or init=/teacher= of a next stage)"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from crcm import __version__

    parser = argparse.ArgumentParser(
        prog="crcm",
        description="Real-time autoregressive video diffusion: Causal-rCM distillation and a "
        "streaming runtime.",
    )
    parser.add_argument("--version", action="version", version=f"crcm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="play the shipped Breakout world model with an autopilot in several streams",
        description="Streams the shipped Breakout world model in several concurrent sessions of "
        "one runtime. Each stream's autopilot reads the paddle and ball from the generated "
        "frames and picks the next action; reports frames/s, action-to-frame latency and KV "
        "pages. Then plays LEFT held, RIGHT held and alternating from a few held-out emulator "
        "states in the model and the emulator and reports whether the paddle follows the keys "
        "(a short `crcm eval`).",
    )
    demo.add_argument("--model", default="breakout", help="model name or pipeline folder")
    demo.add_argument("--streams", type=_positive, default=4, help="concurrent streams (4)")
    demo.add_argument("--frames", type=_positive, default=120, help="frames per stream (120)")
    demo.add_argument(
        "--steps", type=_steps, default=(1, 2), help="sampling steps, one per stream in turn (1,2)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.add_argument(
        "--check-starts",
        type=int,
        default=4,
        help="held-out starts of the scripted-action check against the emulator (4; 0: skip)",
    )
    demo.add_argument("--out", type=Path, help="save the frames to this .npz file")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser(
        "bench",
        help="measure streaming frames/s and latency on this machine",
        description="Streams sessions of a model at 1, 2 and 4 steps per frame with 1, 8 and 32 "
        "concurrent streams and reports frames/s, first-frame latency, per-frame latency "
        "percentiles and the scheduler's cost per tick.",
    )
    bench.add_argument(
        "--model", default="breakout", help="model name or pipeline folder (breakout)"
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="fewer frames, 1 and 8 streams, one run per row (else 3, with the baseline "
        "measured between them)",
    )
    bench.add_argument("--steps", type=_steps, default=(1, 2, 4), help="steps per frame (1,2,4)")
    bench.add_argument("--streams", type=_counts, help="concurrent streams (1,8,32; quick 1,8)")
    bench.add_argument(
        "--compile",
        action="store_true",
        help="also measure every row with the runtime's forwards compiled (torch.compile)",
    )
    bench.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="precision of the model (float32; bfloat16 is ~1.3x faster on CPUs with bfloat16 "
        "dot-product instructions, and on GPUs)",
    )
    bench.add_argument(
        "--contexts",
        type=_contexts,
        default=("noisy", "clean"),
        help="cache modes to measure: noisy, clean (the cache update fused into the next "
        "frame's forward), clean-unfused (its own forward) (noisy,clean)",
    )
    bench.add_argument("--out", type=Path, help="write the results as JSON to this file")
    bench.set_defaults(func=_cmd_bench)

    from crcm.cli_data import add_collect_parser, add_eval_parser, add_eval_table_parser
    from crcm.cli_serve import add_play_parser, add_stream_parser

    add_play_parser(sub)
    add_stream_parser(sub)
    add_collect_parser(sub)
    add_eval_parser(sub)
    add_eval_table_parser(sub)

    from crcm.training.config import STAGES

    train = sub.add_parser(
        "train",
        help="train one stage of the Causal-rCM recipe (or a baseline's)",
        description="Runs one training stage from a TOML config plus key=value overrides, "
        "resuming from the run folder's last checkpoint. Stages: " + ", ".join(STAGES) + ".",
    )
    train.add_argument("stage", choices=STAGES, metavar="STAGE", help="the stage to train")
    train.add_argument("--config", type=Path, help="TOML config file")
    train.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. steps=200 data.frames=8"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting `train`'s KEY=VALUE overrides at the first option, so
    # `crcm train STAGE --config FILE steps=10` leaves them over: they are overrides too.
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (CrcmError, ValueError, OSError) as err:
        print(f"crcm {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"crcm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        # Not a refusal of the user's input but a failure inside crcm: still one line (the
        # traceback on request), and an exit code that tells the two apart.
        if os.environ.get("CRCM_TRACEBACK"):
            raise
        print(
            f"crcm {args.command}: internal error: {type(err).__name__}: {_one_line(err)} "
            "(set CRCM_TRACEBACK=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
