"""``crcm play`` with a text-to-video model: the tiny random Wan folder served next to a world
model, prompted over the websocket (a real uvicorn server on loopback, as in test_app.py)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

from play_helpers import (
    capture_served,
    closed_with,
    recv_json,
    responsive_pipeline,
    wait_idle,
    ws_url,
)
from websockets.sync.client import connect

from crcm.serve.app import (
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    ModelEntry,
    PlayServer,
    ServeConfig,
    ServerThread,
    create_app,
    decode_frame,
    resolve_model,
)

HW = (32, 48)
MAX_PROMPT = 2000


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from crcm.wan.tiny import make_tiny_wan_folder

    return make_tiny_wan_folder(tmp_path_factory.mktemp("wan") / "wan", seed=0)


@pytest.fixture(scope="module")
def srv(wan_folder):
    """A server of the text model ``wan`` and the world model ``tiny``."""
    text = resolve_model(str(wan_folder), frame_hw=HW, checkpoint=None)
    assert text.takes_prompt and text.name == "wan"
    world = ModelEntry("tiny", responsive_pipeline("tiny"))
    server = PlayServer([text, world], ServeConfig(max_sessions=3, fps=60, seed=0))
    with ServerThread(create_app(server), server.config) as thread:
        thread.play = server
        yield thread


def _connect(srv, **query):
    q = "&".join(f"{k}={quote(str(v))}" for k, v in query.items())
    url = ws_url(srv) + (f"?{q}" if q else "")
    return connect(url, open_timeout=10, close_timeout=5, max_size=2**22)


def _next(ws, timeout: float = 20.0):
    """The next message: ``("frame", (fields, pixels))`` or ``(type, JSON object)``."""
    msg = ws.recv(timeout=timeout)
    if isinstance(msg, bytes):
        return "frame", decode_frame(msg)
    obj = json.loads(msg)
    return obj["type"], obj


def _frames(ws, n: int, timeout: float = 20.0) -> list[tuple[dict, object]]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        kind, item = _next(ws, max(0.01, deadline - time.monotonic()))
        if kind == "frame":
            out.append(item)
    return out


def _prompt(text, seq: int = 0) -> str:
    return json.dumps({"type": "prompt", "text": text, "seq": seq})


def test_hello_tells_the_page_the_model_kind(srv):
    with _connect(srv, model="wan", prompt="a cat") as ws:
        hello = recv_json(ws, "hello")
        models = {m["name"]: m for m in hello["models"]}
        assert models["wan"]["kind"] == "text" and models["wan"]["fps"] == 16
        assert models["wan"]["frame_shape"] == [*HW, 3] and models["wan"]["action_names"] == []
        assert models["tiny"]["kind"] == "world" and models["tiny"]["fps"] is None
        assert hello["limits"]["max_prompt_chars"] == MAX_PROMPT
        # Room for every prompt of MAX_PROMPT characters, even JSON-escaped.
        assert hello["limits"]["max_message_bytes"] >= 6 * MAX_PROMPT
    wait_idle(srv)


def test_a_prompt_given_at_open_streams_paced_frames(srv):
    with _connect(srv, model="wan", prompt="a red fox runs through snow") as ws:
        session = recv_json(ws, "session")
        assert session["model"]["kind"] == "text"
        assert session["prompt"] == "a red fox runs through snow" and session["prompt_seq"] == 0
        assert session["steps"] == 4  # the sampler's own steps, not the world models' default
        first = _frames(ws, 1)
        start = time.monotonic()
        frames = first + _frames(ws, 16)
        elapsed = time.monotonic() - start
    assert [f["index"] for f, _ in frames] == list(range(17))  # continuous: no gaps
    for fields, pixels in frames:
        assert pixels.shape == (*HW, 3) and pixels.dtype.name == "uint8"
        assert fields["action"] == 0 and fields["input_seq"] == 0
    # Paced at 16 frames/s by the session's frame buffer, however fast the model is.
    assert elapsed >= 0.8 * 16 / 16, f"16 frames in {elapsed:.2f} s: not paced at 16 fps"
    assert frames[1][1].std() > 0  # a video, not a blank canvas
    wait_idle(srv)


def test_the_first_prompt_starts_the_stream_and_later_ones_switch_it(srv):
    with _connect(srv, model="wan") as ws:
        session = recv_json(ws, "session")
        assert session["prompt"] is None
        with pytest.raises(TimeoutError):  # nothing is generated before a prompt
            ws.recv(timeout=0.5)
        stats = srv.play.models["wan"].runtime.stats()
        assert stats["streams"] == 0  # no pages held while waiting

        ws.send(_prompt("a boat on a lake", seq=1))
        kind, ack = _next(ws)
        assert (kind, ack["seq"], ack["from_frame"]) == ("prompt", 1, 0)
        assert ack["text"] == "a boat on a lake"
        got = {f["index"]: f for f, _ in _frames(ws, 3)}
        assert all(f["input_seq"] == 1 for f in got.values())

        ws.send(_prompt("a dog runs on the beach", seq=2))
        switch_from = None
        deadline = time.monotonic() + 30
        while switch_from is None or max(got) < switch_from + 2:
            kind, item = _next(ws, max(0.01, deadline - time.monotonic()))
            if kind == "prompt":
                assert item["seq"] == 2 and item["text"] == "a dog runs on the beach"
                switch_from = item["from_frame"]
            elif kind == "frame":
                got[item[0]["index"]] = item[0]
            else:
                raise AssertionError(f"unexpected message {item}")
    # The frames already made (or being made) keep the old prompt; from the chunk the switch
    # took effect at on, every frame says so; and the frames kept coming without a gap.
    assert switch_from > 3
    assert sorted(got) == list(range(max(got) + 1))
    for index, fields in got.items():
        assert fields["input_seq"] == (2 if index >= switch_from else 1), index
    assert got[switch_from]["latency_us"] > 0
    wait_idle(srv)


def test_reset_keeps_the_prompt_and_config_switches_kinds(srv):
    with _connect(srv, model="tiny") as ws:
        assert recv_json(ws, "session")["model"]["kind"] == "world"
        _frames(ws, 2)
        ws.send(json.dumps({"type": "config", "model": "wan"}))
        session = recv_json(ws, "session")
        assert (session["model"]["name"], session["steps"], session["prompt"]) == ("wan", 4, None)
        ws.send(_prompt("a lighthouse at night", seq=5))
        assert recv_json(ws, "prompt")["from_frame"] == 0
        assert _frames(ws, 1)[0][0]["input_seq"] == 5
        ws.send(json.dumps({"type": "reset"}))
        session = recv_json(ws, "session")
        assert (session["prompt"], session["prompt_seq"]) == ("a lighthouse at night", 5)
        fields, pixels = _frames(ws, 1)[0]
        assert (fields["index"], fields["input_seq"], pixels.shape) == (0, 5, (*HW, 3))
        ws.send(json.dumps({"type": "config", "model": "tiny"}))
        assert recv_json(ws, "session")["steps"] == 1  # the world models' default again
        ws.send(json.dumps({"type": "action", "action": "LEFT", "seq": 1}))
        deadline = time.monotonic() + 20
        while True:  # keys work again
            fields, pixels = _frames(ws, 1, timeout=max(0.01, deadline - time.monotonic()))[0]
            assert pixels.shape == (16, 16, 1)
            if fields["action"] == 3:
                break
    wait_idle(srv)


BAD_PROMPTS = {
    "number": '{"type": "prompt", "text": 123}',
    "null": '{"type": "prompt", "text": null}',
    "list": '{"type": "prompt", "text": ["a cat"]}',
    "missing": '{"type": "prompt"}',
    "overlong": _prompt("x" * (MAX_PROMPT + 1)),
    "lone surrogate": '{"type": "prompt", "text": "a \\ud800 cat"}',
    "bad seq": '{"type": "prompt", "text": "a cat", "seq": -1}',
    "bool seq": '{"type": "prompt", "text": "a cat", "seq": true}',
    "an action": '{"type": "action", "action": 0, "seq": 1}',
    "steps over the sampler's": '{"type": "config", "model": "wan", "steps": 5}',
}


@pytest.mark.parametrize("name", list(BAD_PROMPTS))
def test_bad_prompts_close_that_session_only(srv, name):
    with _connect(srv, model="wan", prompt="a cat") as good, _connect(srv, model="wan") as bad:
        recv_json(bad, "session")
        bad.send(BAD_PROMPTS[name])
        code, error = closed_with(bad)
        assert code == CLOSE_POLICY
        assert error is not None and error["code"] == "bad_message" and error["message"]
        _frames(good, 2)  # the other player goes on
    wait_idle(srv)


def test_a_prompt_of_the_longest_length_is_taken(srv):
    text = "\u2603" * MAX_PROMPT  # 3 bytes of UTF-8 each: over the world models' 1024 bytes
    with _connect(srv, model="wan") as ws:
        recv_json(ws, "session")
        ws.send(_prompt(text, seq=1))  # json.dumps escapes it: 6 bytes a character
        assert recv_json(ws, "prompt")["text"] == text
        _frames(ws, 1)
        ws.send(json.dumps({"type": "prompt", "text": "a cat", "pad": "x" * 20_000}))
        assert closed_with(ws)[0] == CLOSE_TOO_BIG
    wait_idle(srv)


@pytest.mark.parametrize(
    "query",
    [{"model": "wan", "prompt": "x" * (MAX_PROMPT + 1)}, {"model": "tiny", "prompt": "a cat"}],
    ids=["overlong", "world model"],
)
def test_bad_prompt_queries_are_refused(srv, query):
    with _connect(srv, **query) as ws:
        assert closed_with(ws)[0] == CLOSE_POLICY
    wait_idle(srv)


def test_a_world_model_refuses_prompts(srv):
    with _connect(srv, model="tiny") as ws:
        recv_json(ws, "session")
        _frames(ws, 1)
        ws.send(_prompt("a cat", seq=1))
        code, error = closed_with(ws)
    assert code == CLOSE_POLICY and error["code"] == "bad_message"
    assert "world model" in error["message"]
    wait_idle(srv)


def test_the_page_has_a_prompt_box(srv):
    def get(path):
        with urllib.request.urlopen(f"{srv.url}{path}", timeout=10) as resp:
            return resp.read().decode()

    html = get("")
    assert '<form id="prompt-form"' in html and '<label for="prompt"' in html
    assert 'id="prompt"' in html and f'maxlength="{MAX_PROMPT}"' in html
    assert 'id="prompt-submit"' in html and "Generate" in html
    assert "http://" not in html and "https://" not in html  # no external resources
    js = get("static/play.js")
    assert 'type: "prompt"' in js and 'kind === "text"' in js


def test_cli_play_serves_a_wan_folder(wan_folder, tmp_path, monkeypatch, capsys):
    from crcm.cli import main

    world = responsive_pipeline("world").save(tmp_path / "world")  # a pipeline folder

    served = capture_served(monkeypatch)
    argv = ["play", "--model", str(wan_folder), "--height", "32", "--width", "48", "--port", "0"]
    argv += ["--no-compile"]  # compiling: test_app.py's test_play_compiles_...
    # --height/--width go to the Wan folder only, not to the world model served beside it.
    assert main([*argv, "--model", str(world), "--max-sessions", "1"]) == 0
    out = capsys.readouterr().out
    assert "model wan: text-to-video, 32x48x3 at 16 fps, 4 steps per chunk" in out
    assert "model world: 16x16x1, actions NOOP, FIRE, RIGHT, LEFT" in out
    [server] = served
    assert server.models["wan"].pipeline.frame_shape == (*HW, 3)
    assert server.models["world"].kind == "world"
    assert main(["play", "--model", str(wan_folder), "--height", "32", "--port", "0"]) == 2
    assert "--height and --width together" in capsys.readouterr().err
    missing = str(wan_folder / "nope.safetensors")
    assert main([*argv, "--checkpoint", missing]) == 2
    capsys.readouterr()


def test_the_page_prompts_a_text_model(srv):
    """The page in headless Chromium (skipped without it): the prompt box replaces the key
    legend, Enter starts the video, the button switches it, and typing is not playing."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("needs Chromium and its driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    browser = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=driver_path)
    )
    browser.set_page_load_timeout(30)

    def wait(expr: str, what: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := browser.execute_script(f"return window.crcmPlay && {expr};"):
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    try:
        browser.get(srv.url)  # the first model, "wan", is the default
        wait("window.crcmPlay.model && window.crcmPlay.model.kind === 'text'", "the session")
        box = browser.find_element(By.ID, "prompt")
        assert box.is_displayed() and box.get_attribute("maxlength") == str(MAX_PROMPT)
        label = browser.find_element(By.CSS_SELECTOR, "label[for=prompt]")
        assert label.is_displayed() and label.text == "Prompt"
        assert not browser.find_element(By.ID, "legend").is_displayed()
        button = browser.find_element(By.ID, "prompt-submit")
        assert button.text == "Generate"
        time.sleep(0.3)
        assert browser.execute_script("return window.crcmPlay.received") == 0  # no prompt yet

        box.send_keys("a cat plays with a ball")  # "p" and "r" are typed, not pause/reset
        box.send_keys(Keys.ENTER)
        wait("window.crcmPlay.received >= 5", "frames of the first prompt")
        assert browser.execute_script("return window.crcmPlay.paused") is False
        assert browser.execute_script("return window.crcmPlay.sessions") == 1
        assert button.text == "Switch"
        now = browser.find_element(By.ID, "prompt-now")
        assert now.text == "a cat plays with a ball"

        box.clear()
        box.send_keys("a dog runs on the beach")
        button.click()
        wait("window.crcmPlay.frames.some((f) => f.seq === 2)", "frames of the new prompt")
        wait("window.crcmPlay.promptSeq === 2", "the page to show the new prompt")
        assert now.text == "a dog runs on the beach"
        assert browser.execute_script("return window.crcmPlay.error") is None
        frames = browser.execute_script("return window.crcmPlay.frames")
        indices = [f["index"] for f in frames]
        assert indices == list(range(indices[0], indices[0] + len(indices)))  # no gap
        wait("document.getElementById('latency').textContent.endsWith('ms')", "the meters")
    finally:
        browser.quit()
    wait_idle(srv)
