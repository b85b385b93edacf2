"""A load generator for ``crcm play``: N websocket players against a server process.

Used by ``tests/python/serve/test_load.py`` (a few seconds) and ``benches/bench_play.py``
(longer, results in ``benches/results/``). Loopback only: the server is started here, as a
``crcm play`` subprocess on 127.0.0.1, and its resident memory is sampled while it serves.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from crcm.serve.app import decode_frame


class ServerProcess:
    """``python -m crcm.cli play --port 0 …`` as a context manager; ``url`` once up."""

    def __init__(self, args: Sequence[str], startup_timeout: float = 120.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "crcm.cli", "play", "--host", "127.0.0.1"]
        self.proc = subprocess.Popen(
            [*cmd, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.output: list[str] = []
        self.url = self._wait_for_url(startup_timeout)
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))

    def _wait_for_url(self, timeout: float) -> str:
        found: list[str] = []
        ready = threading.Event()

        def read() -> None:  # a thread: readline() has no timeout
            for line in self.proc.stdout:
                self.output.append(line)
                if line.startswith("crcm play: http"):
                    found.append(line.split()[-1])
                if found and "Ctrl+C stops" in line:  # the banner's last line: it is all read
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or not found:
            self.stop()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"crcm play did not start: {''.join(self.output)}{err}")
        return found[0]

    def info(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}api/info", timeout=10) as resp:
            return json.loads(resp.read())

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """Waits until every session is closed and every KV page is back; returns /api/info."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            runtimes = info["runtimes"].values()
            if info["sessions"] == 0 and all(r["pages_used"] == 0 for r in runtimes):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"sessions still open after {timeout} s: {info}")
            time.sleep(0.05)

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self, timeout: float = 20.0) -> int:
        """Ctrl+C (a graceful shutdown), then a kill if it hangs; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class LoadReport:
    clients: int
    seconds: float
    frames: int = 0
    errors: list[str] = field(default_factory=list)
    server_latency_ms: list[float] = field(default_factory=list)  # action push → frame send
    input_latency_ms: list[float] = field(default_factory=list)  # client: key → its frame
    interval_ms: list[float] = field(default_factory=list)  # between a client's frames
    rss_mb: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        def pct(xs: list[float]) -> dict[str, float] | None:
            if not xs:
                return None
            p = np.percentile(xs, [50, 90, 99])
            return {k: round(float(v), 2) for k, v in zip(("p50", "p90", "p99"), p, strict=True)}

        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "frames": self.frames,
            "frames_per_s_per_client": round(self.frames / self.seconds / self.clients, 2),
            "errors": self.errors[:10],
            "server_latency_ms": pct(self.server_latency_ms),
            "input_to_frame_ms": pct(self.input_latency_ms),
            "frame_interval_ms": pct(self.interval_ms),
            "rss_mb_start": round(self.rss_mb[0], 1) if self.rss_mb else None,
            "rss_mb_peak": round(max(self.rss_mb), 1) if self.rss_mb else None,
        }


async def _player(url: str, seconds: float, seed: int, report: LoadReport) -> None:
    """Connects, changes its held action every 50–300 ms, and reads frames for ``seconds``."""
    from websockets.asyncio.client import connect

    rng = random.Random(seed)
    sent: dict[int, float] = {}
    answered = 0
    seq = 0
    try:
        async with connect(url, open_timeout=30, close_timeout=5, max_size=2**22) as ws:
            names = None
            while names is None:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if msg["type"] == "session":
                    names = msg["model"]["action_names"]
                elif msg["type"] == "error":
                    raise RuntimeError(f"{msg['code']}: {msg['message']}")
            end = time.perf_counter() + seconds
            next_input = time.perf_counter()
            last = None
            while (now := time.perf_counter()) < end:
                if now >= next_input:
                    seq += 1
                    sent[seq] = now
                    await ws.send(
                        json.dumps(
                            {"type": "action", "action": rng.randrange(len(names)), "seq": seq}
                        )
                    )
                    next_input = now + rng.uniform(0.05, 0.3)
                try:
                    data = await asyncio.wait_for(ws.recv(), min(5.0, max(0.01, end - now)))
                except asyncio.TimeoutError:
                    if time.perf_counter() < end:
                        raise RuntimeError("no frame for 5 s") from None
                    break
                if isinstance(data, str):
                    msg = json.loads(data)
                    if msg["type"] == "error":
                        raise RuntimeError(f"{msg['code']}: {msg['message']}")
                    continue
                fields, _ = decode_frame(data)
                t = time.perf_counter()
                report.frames += 1
                report.server_latency_ms.append(fields["latency_us"] / 1000)
                if last is not None:
                    report.interval_ms.append((t - last) * 1000)
                last = t
                if fields["input_seq"] > answered and fields["input_seq"] in sent:
                    report.input_latency_ms.append((t - sent[fields["input_seq"]]) * 1000)
                answered = max(answered, fields["input_seq"])
    except Exception as err:  # every failure is an error of the run, reported, not raised
        report.errors.append(f"client {seed}: {type(err).__name__}: {err}")


def run_load(
    server: ServerProcess, clients: int, seconds: float, model: str | None = None
) -> LoadReport:
    """``clients`` concurrent players for ``seconds``; samples the server's RSS every 0.1 s."""
    report = LoadReport(clients, seconds)
    url = f"ws://127.0.0.1:{server.port}/ws" + (f"?model={model}" if model else "")

    async def main() -> None:
        async def sample() -> None:
            while True:
                report.rss_mb.append(server.rss_bytes() / 2**20)
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        try:
            await asyncio.wait_for(
                asyncio.gather(*(_player(url, seconds, i, report) for i in range(clients))),
                seconds + 60,
            )
        finally:
            sampler.cancel()

    asyncio.run(main())
    if server.proc.poll() is not None:
        report.errors.append(f"the server exited with {server.proc.returncode}")
    return report
