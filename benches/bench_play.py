"""Load of ``crcm play``: concurrent websocket players on loopback, written to benches/results/.

    PYTHONPATH=python python benches/bench_play.py [--seconds 15] [--out FILE.json]

Starts ``crcm play`` as a subprocess on 127.0.0.1 with the ``breakout`` model (untrained until
the shipped one lands; speed does not depend on the weights) at 30 frames/s per player, then
runs 1, 4 and 8 players that change their held action every 50–300 ms. Records frames/s per
player, input-to-frame latency (client: action sent → first frame answering it), server latency
(action pushed → frame sent), frame intervals and the server's resident memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from crcm.bench import machine, results_path
from crcm.serve.loadtest import ServerProcess, run_load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="breakout", help="model served (breakout)")
    parser.add_argument("--players", default="1,4,8", help="concurrent players per run (1,4,8)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each run (15)")
    parser.add_argument("--fps", type=float, default=30.0, help="frames/s per player (30)")
    parser.add_argument("--out", type=Path, help="result file (default: benches/results/…)")
    args = parser.parse_args()
    players = [int(n) for n in args.players.split(",")]
    server_args = ["--model", args.model, "--max-sessions", str(max(players))]
    server_args += ["--fps", str(args.fps), "--seed", "0"]
    rows = []
    with ServerProcess(server_args) as server:
        idle_mb = server.rss_bytes() / 2**20
        for n in players:
            report = run_load(server, n, args.seconds)
            server.wait_idle()  # every session closed and its pages freed between runs
            row = report.summary()
            rows.append(row)
            print(json.dumps(row))
        code = server.stop()
    info = machine()
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": info,
        "command": "PYTHONPATH=python python benches/bench_play.py",
        "model": f"{args.model} (untrained weights: speed does not depend on them)",
        "fps_target": args.fps,
        "server_rss_mb_idle": round(idle_mb, 1),
        "server_exit_code": code,
        "runs": rows,
    }
    out = args.out or results_path("play", info)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
