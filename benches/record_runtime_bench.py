"""Run benches/test_bench_runtime.py with pytest-benchmark and record the result.

    python benches/record_runtime_bench.py [--out PATH]

Writes ``benches/results/runtime-ffi-<short-machine>.json``: the machine (CPU model, cores),
Python and numpy versions, the date, median and mean µs of each benchmark, and whether the
target "full tick incl. FFI ≤ 20 µs at 64 streams" (median) was met.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from crcm.bench import machine, results_path

ROOT = Path(__file__).resolve().parent.parent
BENCH_FILE = ROOT / "benches" / "test_bench_runtime.py"
TARGET_US = 20.0
TARGET_BENCH = "test_tick_read_complete[64]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="result file (default: benches/results/...)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", str(BENCH_FILE), "-q", "-p", "no:cacheprovider",
               "--benchmark-enable", f"--benchmark-json={raw}"]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, check=True)
        report = json.loads(raw.read_text())

    info = machine()
    benches = []
    for b in report["benchmarks"]:
        st = b["stats"]
        benches.append({
            "name": b["name"],
            "group": b["group"],
            "median_us": round(st["median"] * 1e6, 3),
            "mean_us": round(st["mean"] * 1e6, 3),
            "min_us": round(st["min"] * 1e6, 3),
            "rounds": st["rounds"],
            **b.get("extra_info", {}),
        })  # fmt: skip
    tick64 = next(b for b in benches if b["name"] == TARGET_BENCH)
    result = {
        "machine": info,
        "numpy": np.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python -m pytest benches/test_bench_runtime.py --benchmark-enable",
        "benches": benches,
        "target": {
            "what": "full tick incl. FFI (tick, read every plan array, complete) at 64 streams",
            "bench": TARGET_BENCH,
            "limit_us": TARGET_US,
            "median_us": tick64["median_us"],
            "met": tick64["median_us"] <= TARGET_US,
        },
    }
    out = args.out or results_path("runtime-ffi", info)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    verdict = "met" if result["target"]["met"] else "NOT met"
    print(f"{out}: 64-stream tick median {tick64['median_us']:.1f} µs, target {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
