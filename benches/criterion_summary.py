#!/usr/bin/env python3
"""Summarise Criterion results (``target/criterion/**/new/*.json``) into one small JSON file.

Usage (after ``cargo bench -p crcm-core --bench runtime``)::

    python3 benches/criterion_summary.py [--criterion-dir target/criterion] [--out FILE]

Writes the machine (CPU model, cores), rustc version, date, and for every bench its median
time with Criterion's 95% interval and the median throughput. Python 3 stdlib only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    # Standard library only (not crcm.bench.machine): this describes Rust benches and runs
    # where the Python package may not be installed.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rustc_version() -> str:
    try:
        return subprocess.run(
            ["rustc", "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def human_time(ns: float) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def throughput(kind_and_amount: dict | None, median_ns: float) -> dict | None:
    """Criterion stores ``{"Elements": n}`` or ``{"Bytes": n}`` per iteration."""
    if not kind_and_amount:
        return None
    [(kind, amount)] = kind_and_amount.items()
    per_s = amount / (median_ns * 1e-9)
    if kind.startswith("Bytes"):
        human, unit = f"{per_s / 2**30:.3g} GiB/s", "bytes/s"
    else:
        human, unit = f"{per_s / 1e6:.3g} Melem/s", "elements/s"
    return {"unit": unit, "per_iter": amount, "value": per_s, "human": human}


def collect(root: Path) -> list[dict]:
    rows = []
    for estimates in sorted(root.glob("**/new/estimates.json")):
        meta_path = estimates.with_name("benchmark.json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        median = json.loads(estimates.read_text())["median"]
        ns = median["point_estimate"]
        ci = median["confidence_interval"]
        rows.append(
            {
                "id": meta.get("full_id") or str(estimates.parent.parent.relative_to(root)),
                "median_ns": round(ns, 3),
                "median_ci95_ns": [round(ci["lower_bound"], 3), round(ci["upper_bound"], 3)],
                "median": human_time(ns),
                "throughput": throughput(meta.get("throughput"), ns),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--criterion-dir", default="target/criterion", type=Path)
    ap.add_argument("--out", type=Path, help="write here (default: stdout)")
    ap.add_argument(
        "--command",
        default="cargo bench -p crcm-core --bench runtime -- --warm-up-time 1 --measurement-time 3",
        help="the command that produced the results (recorded as is)",
    )
    ap.add_argument("--note", action="append", default=[], help="a line for the notes field")
    args = ap.parse_args()

    benches = collect(args.criterion_dir)
    if not benches:
        raise SystemExit(f"no Criterion results under {args.criterion_dir}")
    summary = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "os": f"{platform.system()} {platform.release()}",
        },
        "rustc": rustc_version(),
        "date": datetime.date.today().isoformat(),
        "command": args.command,
        "benches": benches,
    }
    if args.note:
        summary["notes"] = args.note
    text = json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
