"""Streaming throughput and latency of the runtime (design §6), written to benches/results/.

    python benches/bench_streaming.py [--quick] [--out FILE.json]

On CPU: the default world-model size (``breakout`` config; untrained weights — speed does not
depend on them) at 1, 2 and 4 steps per frame, 1 and 8 streams, c1-1.
On CUDA, additionally: ``wan2.1-1.3b`` shapes in bf16 (random weights; no VAE), c3-3 at 4, 2
and 1 steps, 1 stream, with model FLOP utilisation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from crcm.bench import format_row, machine, results_path, run_suite, run_wan_suite
from crcm.pipeline import Pipeline
from crcm.sampling import SamplerConfig

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames per setting")
    parser.add_argument("--out", type=Path, help="result file (default: benches/results/…)")
    args = parser.parse_args()
    frames = 24 if args.quick else 96
    info = machine()
    rows = []

    world = Pipeline.from_config(
        "breakout", sampler=SamplerConfig(sink_frames=1, window_frames=8), name="breakout"
    )
    rows += run_suite(world, steps=(1, 2, 4), streams=(1, 8), frames=frames)

    rows += run_wan_suite(frames=frames // 2)

    out = args.out or results_path("streaming", info)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": info, "rows": rows}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    for row in rows:
        print(format_row(row))


if __name__ == "__main__":
    main()
