"""The play server's websocket protocol against a real uvicorn server on loopback."""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

from play_helpers import (
    capture_served,
    closed_with,
    play_server,
    recv_json,
    responsive_pipeline,
    wait_idle,
    wait_until,
    ws_url,
)
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

import crcm.serve.app
from crcm.errors import ConfigError
from crcm.serve.app import (
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_LATER,
    CLOSE_UNSUPPORTED,
    FRAME_HEADER,
    ModelEntry,
    PlayServer,
    decode_frame,
    resolve_model,
)

MAX_SESSIONS = 3
MAX_RATE = 60


@pytest.fixture(scope="module")
def srv():
    with play_server(
        ("tiny", "tiny-b"), max_sessions=MAX_SESSIONS, fps=60, seed=0, max_messages_per_s=MAX_RATE
    ) as server:
        yield server


def _connect(srv, **query):
    return connect(ws_url(srv, **query), open_timeout=10, close_timeout=5)


def _frames(ws, n: int, timeout: float = 20.0) -> list[tuple[dict, object]]:
    """The next ``n`` frames (header fields, pixels), skipping JSON messages."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        msg = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(msg, bytes):
            out.append(decode_frame(msg))
    return out


def test_hello_session_and_frames(srv):
    with _connect(srv) as ws:
        hello = recv_json(ws, "hello")
        assert [m["name"] for m in hello["models"]] == ["tiny", "tiny-b"]
        assert hello["limits"]["max_sessions"] == MAX_SESSIONS
        session = recv_json(ws, "session")
        assert session["model"]["action_names"] == ["NOOP", "FIRE", "RIGHT", "LEFT"]
        assert session["model"]["untrained"] is False and session["steps"] == 1
        frames = _frames(ws, 6)
    indices = [f["index"] for f, _ in frames]
    assert indices == sorted(indices) and len(set(indices)) == 6
    for fields, pixels in frames:
        assert pixels.shape == (16, 16, 1) and pixels.dtype.name == "uint8"
        assert fields["action"] == 0 and fields["input_seq"] == 0  # NOOP while no key is held
    wait_idle(srv)


def _play(srv, press_at: int | None, n: int = 12) -> dict[int, tuple[dict, bytes]]:
    """Frames 0..n-1 of a fresh session (same seed), pressing LEFT once `press_at` arrived."""
    got: dict[int, tuple[dict, bytes]] = {}
    with _connect(srv) as ws:
        recv_json(ws, "session")
        while len(got) < n:
            [(fields, pixels)] = _frames(ws, 1)
            got[fields["index"]] = (fields, pixels.tobytes())
            if press_at is not None and fields["index"] == press_at:
                ws.send(json.dumps({"type": "action", "action": "LEFT", "seq": 1}))
    wait_idle(srv)
    return got


def test_pressing_a_key_changes_the_frames(srv):
    plain = _play(srv, None)
    pressed = _play(srv, press_at=2)
    first = min(i for i, (f, _) in pressed.items() if f["action"] == 3)
    assert pressed[first][0]["input_seq"] == 1
    assert all(pressed[i][0]["action"] == 3 for i in pressed if i >= first)
    # Same seed, same actions: the same frames; from the first LEFT on, different ones.
    for i in range(first):
        assert pressed[i][1] == plain[i][1], f"frame {i} before the key press differs"
    assert pressed[first][1] != plain[first][1], "the key press did not change the frame"


def test_pause_stops_frames_and_reset_restarts(srv):
    with _connect(srv) as ws:
        recv_json(ws, "session")
        _frames(ws, 3)
        ws.send(json.dumps({"type": "pause", "paused": True}))
        # Only the actions already pushed (at most 2 frame-wise) still become frames; at 60
        # frames/s an ignored pause would send dozens in the 1.5 s of quiet waited for here.
        late = 0
        with contextlib.suppress(TimeoutError):
            while True:
                late += isinstance(ws.recv(timeout=1.5), bytes)
        assert late <= 2
        ws.send(json.dumps({"type": "pause", "paused": False}))
        assert _frames(ws, 2)[-1][0]["index"] >= 3
        ws.send(json.dumps({"type": "reset"}))
        recv_json(ws, "session")
        assert _frames(ws, 1)[0][0]["index"] == 0  # a new session
    wait_idle(srv)


def test_config_switches_model_and_steps(srv):
    with _connect(srv, model="tiny-b") as ws:
        assert recv_json(ws, "session")["model"]["name"] == "tiny-b"
        _frames(ws, 2)
        ws.send(json.dumps({"type": "config", "model": "tiny", "steps": 3}))
        session = recv_json(ws, "session")
        assert (session["model"]["name"], session["steps"]) == ("tiny", 3)
        assert _frames(ws, 2)[0][0]["index"] == 0
    wait_idle(srv)


BAD_MESSAGES = {
    "not json": ("{nope", CLOSE_POLICY),
    "not an object": ("[1, 2]", CLOSE_POLICY),
    "no type": ('{"action": 1}', CLOSE_POLICY),
    "unknown type": ('{"type": "teleport"}', CLOSE_POLICY),
    "unknown action": ('{"type": "action", "action": "JUMP", "seq": 1}', CLOSE_POLICY),
    "action out of range": ('{"type": "action", "action": 9, "seq": 1}', CLOSE_POLICY),
    "bool action": ('{"type": "action", "action": true, "seq": 1}', CLOSE_POLICY),
    "bad seq": ('{"type": "action", "action": 1, "seq": -1}', CLOSE_POLICY),
    "bad pause": ('{"type": "pause", "paused": "yes"}', CLOSE_POLICY),
    "unknown model": ('{"type": "config", "model": "nope"}', CLOSE_POLICY),
    "bad steps": ('{"type": "config", "steps": 9}', CLOSE_POLICY),
    "binary": (b"\x00\x01", CLOSE_UNSUPPORTED),
}


@pytest.mark.parametrize("name", list(BAD_MESSAGES))
def test_bad_message_closes_that_session_only(srv, name):
    message, code = BAD_MESSAGES[name]
    with _connect(srv) as good, _connect(srv) as bad:
        recv_json(bad, "session")
        bad.send(message)
        closed_code, error = closed_with(bad)
        assert closed_code == code
        assert error is not None and error["code"] == "bad_message" and error["message"]
        _frames(good, 2)  # the other player goes on
    wait_idle(srv)


def test_bad_query_is_refused(srv):
    with _connect(srv, steps=7) as ws:
        assert closed_with(ws)[0] == CLOSE_POLICY
    wait_idle(srv)


def test_oversized_message_is_refused(srv):
    with _connect(srv) as ws:
        recv_json(ws, "session")
        ws.send(json.dumps({"type": "action", "action": 1, "seq": 1, "pad": "x" * 5000}))
        assert closed_with(ws)[0] == CLOSE_TOO_BIG
    wait_idle(srv)


def test_message_flood_is_refused():
    # A server of its own with a low limit: the limit counts messages as the server handles
    # them, so a test must not depend on how fast a loaded machine handles a flood.
    limit = 5
    with play_server(("tiny",), max_sessions=1, fps=60, seed=0, max_messages_per_s=limit) as srv:
        with _connect(srv) as ws:
            recv_json(ws, "session")
            with contextlib.suppress(ConnectionClosed):  # the server may close mid-flood
                for seq in range(40 * limit):
                    ws.send(json.dumps({"type": "action", "action": seq % 4, "seq": seq}))
            code, error = closed_with(ws)
            assert code == CLOSE_POLICY and "msg/s" in error["message"]
        wait_idle(srv)


def test_session_limit(srv):
    with contextlib.ExitStack() as stack:
        players = [stack.enter_context(_connect(srv)) for _ in range(MAX_SESSIONS)]
        for ws in players:
            recv_json(ws, "session")
        with _connect(srv) as extra:
            code, error = closed_with(extra)
            assert code == CLOSE_TRY_LATER and error["code"] == "busy"
        players[0].close()
        wait_until(lambda: srv.play.active < MAX_SESSIONS, what="a free seat")
        with _connect(srv) as late:
            recv_json(late, "session")
            _frames(late, 1)
    wait_idle(srv)


def test_abrupt_disconnect_frees_pages(srv):
    with _connect(srv) as ws:
        recv_json(ws, "session")
        _frames(ws, 3)
        stats = srv.play.models["tiny"].runtime.stats()
        assert stats["streams"] == 1 and stats["pages_used"] > 0
        ws.socket.close()  # no closing handshake: the TCP connection just goes away
        wait_idle(srv)
    with _connect(srv) as ws2:  # and the server is still up
        _frames(ws2, 1)
    wait_idle(srv)


def test_cross_origin_websocket_is_refused(srv):
    with pytest.raises(InvalidStatus):
        connect(ws_url(srv), origin="http://evil.example", open_timeout=10).close()
    with connect(
        ws_url(srv), origin=f"http://127.0.0.1:{srv.port}", open_timeout=10, close_timeout=5
    ) as ws:
        recv_json(ws, "session")
    wait_idle(srv)


def test_page_static_and_info(srv):
    def get(path):
        with urllib.request.urlopen(f"{srv.url}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()

    status, html = get("")
    assert status == 200 and "<canvas" in html and "/static/play.js" in html
    status, js = get("static/play.js")
    assert status == 200 and "new WebSocket" in js
    status, text = get("api/info")
    info = json.loads(text)
    assert info["limits"]["max_message_bytes"] == 1024
    assert all(r["running"] for r in info["runtimes"].values())


# The binary frame header as docs/play.md documents it: (offset, type, field). Little-endian.
HEADER_LAYOUT = [
    (0, "u16", "header size"),
    (2, "u8", "channels"),
    (3, "u8", "action"),
    (4, "u16", "height"),
    (6, "u16", "width"),
    (8, "u32", "index"),
    (12, "u32", "seq"),
    (16, "u32", "latency"),
]
_BYTES = {"u8": 1, "u16": 2, "u32": 4}


def test_frame_header_layout(srv):
    """A real frame message from the server, read byte by byte at the offsets docs/play.md
    documents (little-endian, pixels right after a 20-byte header); play.js reads the same
    offsets with the same widths."""
    root = Path(__file__).resolve().parents[3]
    doc = (root / "docs" / "play.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (u8|u16|u32) \| (.+) \|$", doc, flags=re.MULTILINE)
    assert [(int(o), t) for o, t, _ in rows] == [(o, t) for o, t, _ in HEADER_LAYOUT]
    js = (Path(crcm.serve.app.__file__).parent / "static" / "play.js").read_text()
    reads = re.findall(r"view\.getUint(8|16|32)\((\d+)(, true)?\)", js)
    assert [(int(o), f"u{bits}") for bits, o, _ in reads] == [(o, t) for o, t, _ in HEADER_LAYOUT]
    assert all(little for bits, _, little in reads if bits != "8")  # little-endian

    seq = 0x01020304  # a u32 whose four bytes differ: a wrong width or byte order shows
    with _connect(srv) as ws:
        recv_json(ws, "session")
        _frames(ws, 2)  # a few frames in: the index is not 0 any more
        ws.send(json.dumps({"type": "action", "action": "LEFT", "seq": seq}))
        deadline = time.monotonic() + 20
        while True:
            msg = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(msg, bytes) and msg[3] == 3:  # generated with LEFT
                break
    field = {
        name.split()[0]: int.from_bytes(msg[o : o + _BYTES[t]], "little")
        for o, t, name in HEADER_LAYOUT
    }
    assert field["header"] == 20 == FRAME_HEADER.size
    assert (field["channels"], field["height"], field["width"]) == (1, 16, 16)
    assert field["action"] == 3 and field["seq"] == seq and field["index"] >= 2
    assert 0 < field["latency"] < 60_000_000
    assert len(msg) == 20 + 16 * 16 * 1  # the pixels follow the header, nothing else
    fields, pixels = decode_frame(msg)
    assert pixels.tobytes() == msg[20:]
    assert (fields["index"], fields["input_seq"]) == (field["index"], field["seq"])
    wait_idle(srv)


def test_untrained_fallback_is_labelled():
    entry = resolve_model("tiny")
    assert entry.untrained and "UNTRAINED" in entry.describe()["label"]
    assert entry.action_names == ["action 0", "action 1", "action 2", "action 3"]
    with pytest.raises(ConfigError, match="neither a pipeline folder"):
        resolve_model("no-such-model")


def test_video_models_are_refused():
    import dataclasses

    from crcm.models import get_config
    from crcm.pipeline import Pipeline

    video = Pipeline.from_config(dataclasses.replace(get_config("tiny"), num_actions=0))
    with pytest.raises(ConfigError, match="crcm stream"):
        PlayServer([ModelEntry("video", video)])
    pipe = responsive_pipeline()
    with pytest.raises(ConfigError, match="two models"):
        PlayServer([ModelEntry("a", pipe), ModelEntry("a", pipe)])


def test_play_compiles_and_warms_up_before_serving(monkeypatch, capsys):
    from crcm.cli import main

    served = capture_served(monkeypatch)
    argv = ["play", "--model", "tiny", "--port", "0", "--max-sessions", "2"]
    assert main([*argv, "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert (
        "compiling the models" in out and "tiny: ready in" in out and "(compiled, float32)" in out
    )
    [server] = served
    runtime = server.models["tiny"].runtime
    assert runtime.executor.compiled and not runtime.sessions
    assert main([*argv, "--no-compile", "--dtype", "bfloat16"]) == 0
    assert "compiling" not in capsys.readouterr().out
    model = served[1].models["tiny"]
    assert not model.runtime.executor.compiled
    assert next(model.pipeline.model.parameters()).dtype == torch.bfloat16
    torch._dynamo.reset()
