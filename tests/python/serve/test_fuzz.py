"""The play server against random and hostile clients (issue 18, classes 5 and 6).

Random and malformed messages and queries, DNS rebinding (``Host`` and ``Origin`` naming another
site), clients that stop reading and slow readers. After each: no traceback or error in the
server's log, a close code for every connection the server ended, every session's pages back,
and a fresh client is served.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from play_helpers import play_server, recv_json, wait_until, ws_url
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from crcm.serve.app import (
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_LATER,
    CLOSE_UNSUPPORTED,
)

# Close codes the server ends a refused connection with (1006, "no close frame", is not one).
REFUSED = {CLOSE_UNSUPPORTED, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_TRY_LATER}
LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.asgi", "asyncio", "crcm", "crcm.serve")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock_:
            self.records.append(record)

    def problems(self) -> list[str]:
        with self.lock_:
            return [
                f"{r.name} {r.levelname}: {r.getMessage()}"
                for r in self.records
                if not r.name.startswith("websockets.client")  # the tests' own clients
                and (r.exc_info or r.levelno >= logging.ERROR or "Traceback" in r.getMessage())
            ]


@contextlib.contextmanager
def _server_log():
    handler = _Records()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.fixture(scope="module")
def srv():
    with play_server(("tiny",), max_sessions=3, fps=30, seed=0, max_messages_per_s=100) as s:
        yield s


@pytest.fixture(autouse=True)
def clean_log():
    """No test may leave a traceback or an error in the server's log."""
    with _server_log() as log:
        yield log
    assert log.problems() == []


def _connect(srv, **kwargs):
    return connect(ws_url(srv), open_timeout=10, close_timeout=5, **kwargs)


def _close_code(ws, timeout: float = 20.0) -> int | None:
    """Reads until the server closes; the close code it sent (None: no close frame)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None
    raise AssertionError("the server did not close the connection")


def _served(srv, n: int = 2) -> None:
    """A fresh client gets a session and frames."""
    with _connect(srv) as ws:
        recv_json(ws, "session")
        got = 0
        deadline = time.monotonic() + 20
        while got < n:
            got += isinstance(ws.recv(timeout=max(0.01, deadline - time.monotonic())), bytes)


def _idle(srv, timeout: float = 15.0) -> None:
    def idle():
        stats = [m.runtime.stats() for m in srv.play.models.values()]
        return srv.play.active == 0 and all(
            s["streams"] == 0 and s["pages_used"] == 0 for s in stats
        )

    wait_until(idle, timeout=timeout, what="sessions to close and pages to return")


# -- random and malformed messages -------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["action", "pause", "reset", "config"]) | st.text(max_size=8)},
        optional={
            "action": JSON | st.sampled_from(["LEFT", "NOOP", 1, 3]),
            "seq": JSON | st.integers(0, 2**32),
            "paused": JSON,
            "model": JSON | st.just("tiny"),
            "steps": JSON | st.integers(0, 5),
        },
    ).map(lambda m: json.dumps(m, allow_nan=True)),
    JSON.map(lambda v: json.dumps(v, allow_nan=True)),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.just("x" * 3000),
    st.just("[" * 500 + "]" * 500),
)


SNOWMEN = "\u2603" * 50  # a refusal that quotes them is over a close reason's 123 bytes


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(MESSAGE, min_size=1, max_size=4))
@example([json.dumps({"type": "action", "action": SNOWMEN, "seq": 1})])
@example([json.dumps({"type": SNOWMEN})])
@example([json.dumps({"type": "config", "model": SNOWMEN})])
def test_random_messages_end_in_a_close_code(srv, messages):
    with _connect(srv) as ws:
        recv_json(ws, "session")
        with contextlib.suppress(ConnectionClosed):  # a message may already have closed it
            for message in messages:
                ws.send(message)
            ws.send('{"type": "teleport"}')  # a sure refusal after whatever came before
        code = _close_code(ws)
    assert code in REFUSED, f"closed with {code} after {messages!r}"
    _idle(srv)


QUERIES = [
    {"steps": "\u00b2"},  # a Unicode digit: str.isdigit() says yes, int() says no
    {"steps": "1" * 5000},
    {"steps": "-1"},
    {"steps": "0x2"},
    {"steps": ""},
    {"model": "%00"},
    {"model": "\u2603"},
    {"model": "tiny", "steps": "007"},
]


@pytest.mark.parametrize("query", QUERIES, ids=[repr(q)[:30] for q in QUERIES])
def test_malformed_queries_are_refused_with_a_close_code(srv, query):
    from urllib.parse import quote

    q = "&".join(f"{k}={quote(v)}" for k, v in query.items())
    with connect(f"ws://127.0.0.1:{srv.port}/ws?{q}", open_timeout=10, close_timeout=5) as ws:
        try:
            recv_json(ws, "session")  # served: "007" is 7 steps, over the limit, so not that
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code in REFUSED, closed
        else:
            raise AssertionError(f"query {query} was served")
    _idle(srv)
    _served(srv)


def _raw(srv, request: bytes) -> bytes:
    """Sends raw bytes; what the server answers before it closes (or 1 s passes)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(request)
        sock.settimeout(1.0)
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := sock.recv(65536):
                data += chunk
    return data


def _get(path: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


UPGRADE = ("Upgrade: websocket", "Connection: Upgrade")
RAW_REQUESTS = {
    "ws without key": _get("/ws", *UPGRADE, "Sec-WebSocket-Version: 13"),
    "ws bad version": _get("/ws", *UPGRADE, "Sec-WebSocket-Key: x", "Sec-WebSocket-Version: 99"),
    "ws bad key": _get("/ws", *UPGRADE, "Sec-WebSocket-Key: !!", "Sec-WebSocket-Version: 13"),
    "plain GET of /ws": _get("/ws"),
    "POST /api/info": _get("/api/info", "Content-Length: 3", method="POST") + b"abc",
    "path traversal": _get("/static/../../crcm.json"),
    "encoded traversal": _get("/static/%2e%2e/%2e%2e/pipeline.py"),
    "huge header": _get("/", "X-Big: " + "a" * 100_000),
    "not HTTP": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),
    "garbage line": b"GARBAGE\r\n\r\n",
}


def test_no_request_is_a_server_error(srv):
    """Paths the app does not serve (``/openapi.json`` was a 500) and malformed HTTP."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    for path in ("/openapi.json", "/docs", "/redoc", "/nope", "/static/../crcm.json"):
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        assert resp.status < 500, (path, resp.status)
    conn.close()
    for name, request in RAW_REQUESTS.items():
        answer = _raw(srv, request)
        status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.1 ") else b""
        assert not status.startswith(b"5"), (name, answer[:200])
        if "traversal" in name:
            assert b"format" not in answer and b"import" not in answer  # nothing outside static/
    _idle(srv)
    _served(srv, 1)


# -- DNS rebinding: the Host header ------------------------------------------------------------


def _http_status(srv, path: str, host: str | None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.putrequest("GET", path, skip_host=True)
    if host is not None:
        conn.putheader("Host", host)
    conn.endheaders()
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status


@pytest.mark.parametrize("host", ["evil.example", "rebind.attacker.test", "127.0.0.1.evil.test"])
def test_dns_rebinding_is_refused(srv, host):
    port, served = srv.port, srv.play.sessions_served
    for path in ("/", "/api/info", "/static/play.js"):
        assert _http_status(srv, path, f"{host}:{port}") in (400, 403), path
    # A page of the attacker's site, its name now resolving to 127.0.0.1: the browser sends
    # Host and Origin both naming that site.
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with pytest.raises(InvalidStatus) as info:
        connect(
            f"ws://{host}:{port}/ws", sock=sock, origin=f"http://{host}:{port}", open_timeout=10
        ).close()
    assert info.value.response.status_code == 403
    assert srv.play.sessions_served == served  # no session was opened
    assert _http_status(srv, "/api/info", None) == 400  # no Host at all
    _idle(srv)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST"])
def test_the_bound_address_and_localhost_are_served(srv, host):
    port = srv.port
    assert _http_status(srv, "/api/info", f"{host}:{port}") == 200
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with connect(
        f"ws://{host}:{port}/ws", sock=sock, origin=f"http://{host}:{port}", open_timeout=10
    ) as ws:
        recv_json(ws, "session")
    _idle(srv)


# -- clients that stop reading -----------------------------------------------------------------


def _large_frame_server(**config):
    """A server of the tiny model with 256x256 frames (64 KiB each): a client that stops
    reading fills the socket buffers within a second, so the server's send blocks."""
    from crcm.models import get_config
    from crcm.pipeline import Pipeline
    from crcm.serve.app import ModelEntry, PlayServer, ServeConfig, ServerThread, create_app

    cfg = get_config("tiny").replace(in_channels=1024, out_channels=1024)
    pipe = Pipeline.from_config(cfg, action_names=("NOOP", "FIRE", "RIGHT", "LEFT"), name="big")
    server = PlayServer([ModelEntry("big", pipe)], ServeConfig(**config))
    srv = ServerThread(create_app(server), server.config)
    srv.play = server
    return srv


def test_clients_that_stop_reading_are_closed_and_their_pages_return():
    """Clients that connect, send an action and never read again: each is closed within the
    ping and send timeouts (a blocked send included), its pages return, and the server
    serves a fresh client."""
    config = dict(max_sessions=3, fps=60, seed=0)
    timeouts = dict(ping_interval=1.0, ping_timeout=1.5, send_timeout=1.5)
    with _large_frame_server(**config, **timeouts) as srv, contextlib.ExitStack() as stack:
        stuck = []
        for _ in range(3):
            # max_queue=1: the client library stops reading the socket (and answering pings)
            # once one message waits, like a program that never calls recv().
            ws = stack.enter_context(
                connect(ws_url(srv), open_timeout=10, close_timeout=0.1, max_queue=1)
            )
            ws.send(json.dumps({"type": "action", "action": "LEFT", "seq": 1}))
            stuck.append(ws)
        wait_until(lambda: srv.play.active == 3, what="three sessions")
        t0 = time.monotonic()
        _idle(srv, timeout=15.0)
        assert time.monotonic() - t0 < 15.0
        _served(srv)
        for ws in stuck:
            ws.socket.close()
        # A slow reader (a frame now and then) is served or closed, never stuck, and costs
        # the other players nothing.
        with connect(ws_url(srv), open_timeout=10, close_timeout=0.5) as slow:
            for _ in range(5):
                with contextlib.suppress(TimeoutError, ConnectionClosed):
                    slow.recv(timeout=0.01)
                time.sleep(0.2)
            _served(srv)
        _idle(srv)
