"""Shared set-up of the play-server tests (imported by them; pytest puts this folder on
sys.path): small world models whose frames follow the actions, and a real uvicorn server on a
free loopback port."""

from __future__ import annotations

import contextlib
import json
import time

import torch
from websockets.exceptions import ConnectionClosed

from crcm.pipeline import Pipeline
from crcm.serve.app import ModelEntry, PlayServer, ServeConfig, ServerThread, create_app

ACTIONS = ("NOOP", "FIRE", "RIGHT", "LEFT")


def responsive_pipeline(name: str = "tiny", seed: int = 0) -> Pipeline:
    """The tiny config with its zero-initialised action table and output head randomised.

    An untrained model's zero head ignores the actions (every frame is the decoded noise); with
    these two layers random, a frame changes when its action does, which is what the tests of
    "pressing a key changes the frames" need — no training required.
    """
    pipe = Pipeline.from_config("tiny", action_names=ACTIONS, name=name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model = pipe.model
        for param, std in ((model.action_embedding.weight, 1.0), (model.head.head.weight, 0.3)):
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return pipe


@contextlib.contextmanager
def play_server(models=("tiny",), **config):
    """A started server (runtimes running) on 127.0.0.1:<free port>; stopped on exit."""
    entries = [ModelEntry(name, responsive_pipeline(name)) for name in models]
    server = PlayServer(entries, ServeConfig(**config))
    with ServerThread(create_app(server), server.config) as srv:
        srv.play = server
        yield srv


def capture_served(monkeypatch) -> list[PlayServer]:
    """Makes ``crcm play`` return instead of serving; the list gets each server it built."""
    import crcm.serve.app

    served: list[PlayServer] = []

    class NoServer:
        def run(self, sockets):
            for sock in sockets:
                sock.close()

    def fake_uvicorn_server(app, config, log_level="warning"):
        served.append(app.state.server)
        return NoServer()

    monkeypatch.setattr(crcm.serve.app, "uvicorn_server", fake_uvicorn_server)
    return served


def ws_url(srv, **query) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"ws://127.0.0.1:{srv.port}/ws" + (f"?{q}" if q else "")


def recv_json(ws, kind: str, timeout: float = 10.0) -> dict:
    """The next JSON message of type ``kind``, skipping frames."""
    deadline = time.monotonic() + timeout
    while True:
        msg = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(msg, str):
            obj = json.loads(msg)
            if obj["type"] == kind:
                return obj


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def closed_with(ws, timeout: float = 30.0) -> tuple[int | None, dict | None]:
    """Reads until the server closes: (close code, the error message it sent before)."""
    error = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(msg, str) and json.loads(msg)["type"] == "error":
                error = json.loads(msg)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None, error
    raise AssertionError("the server did not close the connection")


def wait_idle(srv) -> None:
    """Every session is gone and its pages are back in the pool."""

    def idle():
        stats = [m.runtime.stats() for m in srv.play.models.values()]
        return srv.play.active == 0 and all(
            s["streams"] == 0 and s["pages_used"] == 0 for s in stats
        )

    wait_until(idle, what="sessions to close and pages to return")
