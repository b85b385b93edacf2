"""A short load test on loopback: concurrent players against a ``crcm play`` process."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")
pytest.importorskip("psutil")

from crcm.serve.loadtest import ServerProcess, run_load

CLIENTS = 6
SECONDS = 2.5
RSS_GROWTH_MB = 150  # over the idle server's RSS, while serving (and freeing) sessions


def test_concurrent_players_no_errors_bounded_memory(capsys):
    args = ["--model", "tiny", "--max-sessions", str(CLIENTS), "--fps", "30", "--seed", "0"]
    with ServerProcess(args) as server:
        assert "UNTRAINED" in "".join(server.output)  # the CLI says so
        idle_mb = server.rss_bytes() / 2**20
        first = run_load(server, CLIENTS, SECONDS)
        server.wait_idle()  # every session closed, every page back in the pool
        again = run_load(server, CLIENTS, SECONDS)
        server.wait_idle()
        code = server.stop()
    for report in (first, again):
        summary = report.summary()
        with capsys.disabled():
            print(f"\nplay load test: {summary}")
        assert report.errors == []
        assert summary["frames_per_s_per_client"] >= 3, summary  # every player was served
        assert summary["input_to_frame_ms"] is not None
        assert max(report.rss_mb) < idle_mb + RSS_GROWTH_MB, summary
    assert max(again.rss_mb) < max(first.rss_mb) + 30  # no growth from one run to the next
    assert code == 0  # a clean shutdown on Ctrl+C
