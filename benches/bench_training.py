"""Throughput of one training step per stage (design §6), written to benches/results/.

    python benches/bench_training.py [--quick] [--sizes tiny,breakout] [--out FILE.json]

For every stage and model size (``tiny``; ``breakout``, the default world-model size), one
optimisation step of the real trainer (``crcm.training.trainer``) on untrained weights — speed
does not depend on them — after one warm-up step: seconds per step (median), samples/s and peak
memory. Each (size, stage) runs in a fresh process so that its peak memory is its own: peak RSS
on CPU (``ru_maxrss``, so it includes the Python interpreter and torch, ~0.3-0.5 GB), peak
allocated CUDA memory on GPU. Single process; on CUDA with the default bf16 precision.
Quick mode: 1 timed step, 1 fake-score update per DMD step (the paper uses 5), batch 2.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FRAMES = {"tiny": 4, "breakout": 4}


def _one(size: str, stage: str, quick: bool, device: str) -> dict[str, object]:
    """Times one stage in this process (the child side)."""
    from crcm.pipeline import Pipeline
    from crcm.training import distributed as dist_utils
    from crcm.training.config import DISTILLATION, load_config
    from crcm.training.trainer import _Stage

    batch = 2 if quick else 4
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher"
        Pipeline.from_config(size, seed=0, name=size).save(teacher)
        overrides = [
            f'out="{Path(tmp) / "run"}"',
            f'model="{size}"',
            f"batch_size={batch}",
            f"data.frames={FRAMES[size]}",
            f"fake_score_updates={1 if quick else 5}",
            f'device="{device}"',
        ]
        if stage in DISTILLATION:
            overrides += [f'init="{teacher}"', f'teacher="{teacher}"']
            if stage == "joint-rcm":  # the DMD term's real score: the same weights stand in
                overrides.append(f'dmd_teacher="{teacher}"')
        cfg = load_config(None, overrides, stage=stage)
        env = dist_utils.setup(cfg.device)
        st = _Stage(cfg, env)
        cuda = env.device.type == "cuda"
        times = []
        for step in range(1 + (1 if quick else 3)):  # the first step warms up
            data = st.data.batch(step, cfg.batch_size).to(env.device)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            st.step(step, st.micro_batches(step, data))
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times[1:])
        peak = (
            torch.cuda.max_memory_allocated() / 2**20
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        )
        return {
            "size": size,
            "stage": stage,
            "device": str(env.device),
            "precision": st.precision,
            "batch_size": batch,
            "frames": FRAMES[size],
            "fake_score_updates": cfg.fake_score_updates if stage in ("sf-dmd", "df-dmd") else 0,
            "seconds_per_step": round(seconds, 4),
            "samples_per_s": round(batch / seconds, 3),
            "peak_memory_mib": round(peak, 1),
            "peak_memory_kind": "cuda_allocated" if cuda else "process_rss",
        }


def main() -> None:
    from crcm.bench import machine, results_path
    from crcm.training.config import STAGES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 timed step, batch 2")
    parser.add_argument("--sizes", default="tiny,breakout", help="comma-separated model sizes")
    parser.add_argument("--out", type=Path, help="result file (default: benches/results/…)")
    parser.add_argument(
        "--one", nargs=3, metavar=("SIZE", "STAGE", "DEVICE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.one:  # child process: one measurement, as JSON on the last line
        size, stage, device = args.one
        print(json.dumps(_one(size, stage, args.quick, device)))
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    print(f"{'device':6} {'size':9} {'stage':13} {'s/step':>9} {'samples/s':>10} {'peak MiB':>9}")
    for device in devices:
        for size in args.sizes.split(","):
            for stage in STAGES:
                cmd = [sys.executable, __file__, "--one", size, stage, device]
                cmd += ["--quick"] if args.quick else []
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
                if done.returncode != 0:
                    raise SystemExit(f"{size} {stage} on {device} failed:\n{done.stderr[-3000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{device:6} {size:9} {stage:13} {row['seconds_per_step']:9.4f} "
                    f"{row['samples_per_s']:10.3f} {row['peak_memory_mib']:9.1f}",
                    flush=True,
                )
    info = machine()
    record = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "machine": info, "rows": rows}
    out = args.out or results_path("training", info)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
