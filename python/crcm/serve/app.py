"""The ``crcm play`` server: a FastAPI app whose websocket connections are model sessions.

One :class:`crcm.Runtime` per model, shared by every connection and running its step loop in a
background thread, so concurrent players are batched into the same forwards. Each websocket is
one :class:`crcm.Session`; three asyncio tasks serve it:

* the **receiver** reads the client's JSON messages (held action, pause, reset, model/steps);
* the **ticker** pushes the held action once per frame period (``fps``), and at once when the
  held action changes; it never lets more than ``max_inflight`` actions wait for their frame,
  so a slow model lowers the frame rate instead of growing the input-to-frame latency;
* the **sender** pops frames and sends them as binary messages (header + raw uint8 pixels).

A text-to-video model (a pipeline with a text encoder and no actions, e.g. ``crcm.load`` of a
Wan folder) takes a prompt instead of actions: its session opens with the first prompt (a
``prompt`` query parameter or message), generates continuously, paced by its frame buffer at
the model's frame rate (16 frames/s for a video VAE's output) with ``block`` backpressure, so
generation never runs more than two chunks ahead of the player; later prompts switch it
mid-stream at its next chunk (``Session.set_cond``, a KV re-cache). Prompts are encoded on
worker threads of their own, so that a slow text encoder never holds up a world model's
pushes; the ticker has nothing to push for such a stream.

Everything that touches the runtime (open, push, pop, close) runs in worker threads: the
runtime holds its lock for a whole batched forward, and the event loop must keep serving the
other players meanwhile. Every bound lives in :class:`ServeConfig`.

Hostile clients (docs/reliability.md): requests whose ``Host`` names neither the address the
server is bound to nor an allowed name are refused (DNS rebinding); every connection the server
ends gets a close code (a refused handshake an HTTP 403); a client that stops reading its frames
is closed once a send waits ``send_timeout`` s or a keepalive ping goes unanswered, and its
session's pages return; no malformed message or query reaches the log as a traceback.

Frames are raw ``uint8`` rather than PNG: world-model frames are small (64×64×3 = 12 KiB), the
server is on loopback or a LAN, and raw pixels cost no encoder time on a CPU that is busy
running the model, and no asynchronous image decode on the page (``putImageData`` draws them
at once) — both would add to the input-to-frame latency. They are also exact, which the tests
rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import numbers
import re
import secrets
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from crcm.errors import BufferClosedError, ConfigError, CrcmError, FrameTimeoutError

log = logging.getLogger("crcm.serve")

STATIC_DIR = Path(__file__).parent / "static"

# Binary frame message: this little-endian header, then height*width*channels uint8 pixels
# (row-major, HWC). header_bytes comes first so that the header can grow compatibly.
#   u16 header_bytes, u8 channels, u8 action, u16 height, u16 width,
#   u32 frame index, u32 input_seq (the last client "action" message this frame reflects;
#   for a text-to-video model the last "prompt" message), u32 latency_us (server side: the
#   action's push, or the prompt's arrival, to the frame's send)
FRAME_HEADER = struct.Struct("<HBBHHIII")

# Websocket close codes (RFC 6455 §7.4.1).
CLOSE_UNSUPPORTED = 1003  # binary message from the client
CLOSE_POLICY = 1008  # malformed or unknown message, bad origin, too many messages
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013  # server full
MAX_REASON_BYTES = 123  # a close frame's reason (RFC 6455 §5.5: 125-byte payload, 2 for the code)

# Host names a loopback server always answers to (besides the address it is bound to).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

# Config names served with random weights when no shipped model has the name (resolve_model):
# ``tiny`` tries the page and the runtime without a trained model.
UNTRAINED_CONFIGS: dict[str, tuple[str, ...]] = {"tiny": ()}

# Frame rate of a text-to-video model whose codec is a video VAE (Wan's videos are 16 fps).
VIDEO_VAE_FPS = 16.0


@dataclass(frozen=True)
class ServeConfig:
    """Bounds and defaults of a play server."""

    max_sessions: int = 8  # open websocket sessions over all models; more are refused (1013)
    fps: float = 30.0  # frames per second each player is driven at (at most)
    steps: int = 1  # default denoising steps per frame
    max_steps: int = 4
    max_message_bytes: int = 1024  # client messages are tiny JSON objects
    max_messages_per_s: int = 200  # a client sending more is closed (key repeat is ~30/s)
    max_inflight: int | None = None  # actions waiting for their frame (default: 2 chunks)
    seed: int | None = None  # every session's noise seed (reproducible play); None: random
    # A client that stops reading is closed when a keepalive ping goes unanswered for
    # ping_timeout s (pings every ping_interval s), or when one send waits send_timeout s (its
    # socket buffers are full): within ping_interval + ping_timeout = 15 s by default.
    ping_interval: float = 5.0
    ping_timeout: float = 10.0
    send_timeout: float = 10.0
    # Host names served besides the bound address and localhost (e.g. this machine's name
    # when it listens on a LAN); any other Host header is refused (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()
    # Text-to-video models: the longest prompt, in characters (code points). A server with
    # such a model accepts messages up to 6 bytes per prompt character (JSON's \uXXXX
    # escapes) + 256, whatever max_message_bytes says (PlayServer.max_message_bytes).
    max_prompt_chars: int = 2000
    # Run the models' forwards through torch.compile (Runtime(compile=True)); call
    # PlayServer.warm_up() before serving so that no player waits for the compilation.
    compile: bool = False

    def __post_init__(self) -> None:
        def integer(name: str, low: int, high: int) -> None:
            value = getattr(self, name)
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if not ok or not low <= int(value) < high:
                raise ConfigError(f"{name} must be an integer in [{low}, {high}), got {value!r}")

        def seconds(name: str, low: float, high: float) -> None:
            value = getattr(self, name)
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or not low <= value <= high:
                raise ConfigError(f"{name} must be a number in [{low}, {high}], got {value!r}")

        integer("max_sessions", 1, 2**16)
        seconds("fps", 0.1, 240)
        integer("max_steps", 1, 5)
        integer("steps", 1, 5)
        if self.steps > self.max_steps:
            raise ConfigError(f"steps must be in [1, {self.max_steps}], got {self.steps}")
        integer("max_message_bytes", 64, 2**20)
        integer("max_messages_per_s", 1, 2**20)
        if self.max_inflight is not None:
            integer("max_inflight", 1, 2**16)
        if self.seed is not None:
            ok = isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool)
            if not ok or not 0 <= int(self.seed) < 2**64:
                raise ConfigError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        seconds("ping_interval", 0.1, 3600)
        seconds("ping_timeout", 0.1, 3600)
        seconds("send_timeout", 0.1, 3600)
        integer("max_prompt_chars", 1, 10_001)
        if isinstance(self.allowed_hosts, str) or not all(
            isinstance(h, str) and h for h in self.allowed_hosts
        ):
            raise ConfigError(
                f"allowed_hosts must be a list of host names, got {self.allowed_hosts!r}"
            )


@dataclass
class ModelEntry:
    """A playable model: its pipeline, how to label it, and (once served) its runtime."""

    name: str
    pipeline: Any  # crcm.Pipeline (imported lazily: torch is heavy)
    untrained: bool = False
    runtime: Any = None
    fps: float | None = None  # frames/s of a text model's sessions (set by PlayServer)

    @property
    def takes_prompt(self) -> bool:
        """A text-to-video model: a text encoder and no actions. Its sessions open with a
        prompt and generate continuously."""
        pipe = self.pipeline
        return pipe.text_encoder is not None and not pipe.model.cfg.num_actions

    @property
    def kind(self) -> str:
        return "text" if self.takes_prompt else "world"

    def native_fps(self, fallback: float) -> float:
        """The frame rate a text model's video is made for: 16 for a video VAE's output (as
        Wan's), else ``fallback``."""
        return VIDEO_VAE_FPS if self.pipeline.codec.temporal_downsample > 1 else fallback

    @property
    def chunk_display_frames(self) -> int:
        """The most frames one chunk decodes to."""
        s = self.pipeline.sampler
        return max(s.chunk_frames_of(0), s.chunk_frames) * self.pipeline.codec.temporal_downsample

    @property
    def max_steps(self) -> int:
        """Steps per chunk its sampler has times for."""
        return len(self.pipeline.sampler.times)

    @property
    def action_names(self) -> list[str]:
        names = list(self.pipeline.action_names)
        return names or [f"action {i}" for i in range(self.pipeline.model.cfg.num_actions)]

    @property
    def idle_action(self) -> int:
        """The action sent while no key is held: the one named NOOP, else action 0."""
        lowered = [n.lower() for n in self.pipeline.action_names]
        return lowered.index("noop") if "noop" in lowered else 0

    def describe(self) -> dict[str, Any]:
        h, w, c = self.pipeline.frame_shape
        return {
            "name": self.name,
            "untrained": self.untrained,
            "label": f"{self.name} (UNTRAINED: random weights)" if self.untrained else self.name,
            "action_names": self.action_names,
            "idle_action": self.idle_action,
            "frame_shape": [h, w, c],
            "chunk_frames": self.pipeline.sampler.chunk_frames,
            "kind": self.kind,  # "world" (keys → actions) or "text" (a prompt)
            "fps": self.fps,  # a text model's pacing; None: the server's fps (world models)
        }


def resolve_model(name_or_path: str, **load_options: object) -> ModelEntry:
    """A pipeline folder, Wan folder or shipped model via :func:`crcm.load` (which takes
    ``load_options``); ``tiny`` (no shipped model) is an untrained pipeline of that config,
    labelled as such everywhere it is shown."""
    from crcm.pipeline import Pipeline, load, shipped_models

    folder = Path(name_or_path)
    is_folder = (folder / "crcm.json").is_file() or (folder / "model_index.json").is_file()
    if not is_folder and name_or_path not in shipped_models() and name_or_path in UNTRAINED_CONFIGS:
        pipe = Pipeline.from_config(
            name_or_path, action_names=UNTRAINED_CONFIGS[name_or_path], name=name_or_path
        )
        if load_options.get("dtype") is not None:
            pipe.model.to(load_options["dtype"])
        return ModelEntry(name_or_path, pipe, untrained=True)
    pipe = load(name_or_path, **{k: v for k, v in load_options.items() if v is not None})
    name = Path(name_or_path).name if is_folder else name_or_path
    return ModelEntry(name or pipe.name, pipe)


class PlayServer:
    """The models, their runtimes, the worker threads and the session count of one server."""

    def __init__(self, models: Sequence[ModelEntry], config: ServeConfig | None = None) -> None:
        from crcm.runtime import Runtime

        self.config = config or ServeConfig()
        if not models:
            raise ConfigError("no model to serve")
        self.models: dict[str, ModelEntry] = {}
        for entry in models:
            if entry.name in self.models:
                raise ConfigError(f"two models are named {entry.name!r}")
            pipe = entry.pipeline
            if not pipe.model.cfg.num_actions and not entry.takes_prompt:
                raise ConfigError(
                    f"{entry.name!r} takes neither actions nor a prompt: crcm play needs a world "
                    "model or a text-to-video model (use crcm stream to write a video model's "
                    "output)"
                )
            if entry.takes_prompt:
                entry.fps = min(entry.native_fps(self.config.fps), self.config.fps)
            if entry.runtime is None:
                sampler = pipe.sampler
                guided = sampler.kind == "euler" and sampler.cfg_scale != 1.0
                entry.runtime = Runtime(
                    pipe,
                    max_streams=self.config.max_sessions,
                    # A text model's guided (teacher) sampler needs the unconditional plane.
                    cfg=guided and entry.takes_prompt,
                    compile=self.config.compile,
                )
            self.models[entry.name] = entry
        self.default_model = next(iter(self.models))
        self.has_text = any(m.takes_prompt for m in self.models.values())
        # Prompts make messages longer: every prompt of max_prompt_chars fits, even escaped.
        self.max_message_bytes = self.config.max_message_bytes
        if self.has_text:
            self.max_message_bytes = max(
                self.max_message_bytes, 6 * self.config.max_prompt_chars + 256
            )
        self.active = 0  # open sessions; only the event loop thread changes it
        self.sessions_served = 0
        self._pop_pool: ThreadPoolExecutor | None = None
        self._ctl_pool: ThreadPoolExecutor | None = None
        self._text_pool: ThreadPoolExecutor | None = None

    def default_steps(self, model: str) -> int:
        """Steps per frame (chunk) of a new session of ``model`` when the client names none:
        the server's for a world model, the sampler's own for a text model (a distilled video
        model is made for its step count)."""
        entry = self.models[model]
        if not entry.takes_prompt:
            return self.config.steps
        own = entry.pipeline.sampler.steps_per_chunk[0]
        return max(1, min(own, entry.max_steps, self.config.max_steps))

    def warm_up(self) -> dict[str, float]:
        """Warms every world model's runtime up (:meth:`Runtime.warm_up`: its compilation, when
        compiled) with the server's default steps; seconds per model. Before :meth:`start`."""
        took = {}
        for name, entry in self.models.items():
            if entry.takes_prompt:
                continue  # a text model's first forward also encodes a prompt: left to play
            sampler = entry.pipeline.sampler.with_steps(self.default_steps(name))
            took[name] = entry.runtime.warm_up(sampler=sampler)
        return took

    def start(self) -> None:
        n = self.config.max_sessions
        # A pop blocks (up to a short timeout) in Rust with the GIL released: one worker per
        # session so that a waiting stream never delays another's frames.
        self._pop_pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="crcm-pop")
        # open/push/close wait for the runtime lock (held for one batched forward); they
        # serialise on it anyway, so a few workers are enough.
        self._ctl_pool = ThreadPoolExecutor(max_workers=min(n, 4), thread_name_prefix="crcm-ctl")
        if self.has_text:
            # Prompt encoding (a large text encoder: tens of ms on a GPU, seconds on a CPU)
            # has workers of its own: it never delays a world model's open/push/close.
            self._text_pool = ThreadPoolExecutor(
                max_workers=min(n, 2), thread_name_prefix="crcm-text"
            )
        for entry in self.models.values():
            entry.runtime.start()

    def stop(self) -> None:
        for entry in self.models.values():
            entry.runtime.close()  # closes every session: pending pops return at once
        for pool in (self._pop_pool, self._ctl_pool, self._text_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    async def ctl(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._ctl_pool, fn, *args)

    async def pop(self, session):
        return await asyncio.get_running_loop().run_in_executor(self._pop_pool, _pop, session)

    async def encode(self, entry: ModelEntry, prompt: str):
        """The prompt's text-encoder tokens ``[text_len, text_dim]`` (the encoder caches them)."""
        encoder = entry.pipeline.text_encoder
        return await asyncio.get_running_loop().run_in_executor(
            self._text_pool, lambda: encoder.encode([prompt])[0]
        )

    def info(self) -> dict[str, Any]:
        c = self.config
        return {
            "models": [m.describe() for m in self.models.values()],
            "default_model": self.default_model,
            "sessions": self.active,
            "sessions_served": self.sessions_served,
            "limits": {
                "max_sessions": c.max_sessions,
                "max_message_bytes": self.max_message_bytes,
                "max_prompt_chars": c.max_prompt_chars,
                "max_messages_per_s": c.max_messages_per_s,
                "max_steps": c.max_steps,
            },
            "fps": c.fps,
            "runtimes": {
                name: {**m.runtime.stats(), "running": m.runtime.running}
                for name, m in self.models.items()
            },
        }


_TIMEOUT = object()  # a pop that waited and got nothing (the session is alive)


def _pop(session):
    try:
        return session.pop(timeout=0.2)
    except FrameTimeoutError:
        return _TIMEOUT
    except BufferClosedError:
        return None


class BadMessage(Exception):
    """A client message that ends its session (close code, reason)."""

    kind = "bad_message"  # the "code" of the JSON error sent before the close

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ClientStalled(BadMessage):
    """The client does not take its frames: a send waited ``send_timeout`` seconds."""

    kind = "slow_client"


class SessionFailed(BadMessage):
    """The runtime ended the session (a forward or decode failed): the server's fault."""

    kind = "internal"


@dataclass
class _Stream:
    """The current session of a connection and what its frames answer."""

    session: Any
    entry: ModelEntry
    steps: int
    opened_at: float
    pushed: int = 0  # actions pushed so far (frame k answers action k)
    received: int = 0  # 1 + index of the last frame sent
    meta: dict[int, tuple[int, int, float]] = field(default_factory=dict)  # index → action…
    # A text model's prompts: (first frame made with it, its message's seq, when it arrived),
    # in order; frame k reflects the last one whose first frame is <= k. None: a world model.
    prompts: list[tuple[int, int, float]] | None = None

    def prompt_of(self, index: int) -> tuple[int, float]:
        """``(seq, arrival)`` of the prompt frame ``index`` was made with (frames come in
        order, so prompts superseded before it are forgotten)."""
        prompts = self.prompts
        while len(prompts) > 1 and prompts[1][0] <= index:
            prompts.pop(0)
        _, seq, arrived = prompts[0]
        return seq, arrived


def _switch_prompt(session, tokens) -> int:
    """Switches a text session's condition from its next chunk on (``Session.set_cond``: a KV
    re-cache); returns the index of the first frame made with it. Runs in a worker thread."""
    from crcm.codec import video_frame_span

    runtime = session.runtime
    # No plan runs while the runtime's lock is held: the chunk the new condition applies to is
    # the next one to start, which the scheduler's phase tells (a chunk being denoised or
    # cache-updated has started, an idle stream's next one has not).
    with runtime._lock:
        session.set_cond(tokens)
        stats = session.stats()
    chunk = int(stats["chunk"]) + (stats["phase"] in ("denoise", "cache_update"))
    sampler = session.sampler
    first = 0 if chunk == 0 else sampler.chunk_frames_of(0) + (chunk - 1) * sampler.chunk_frames
    return video_frame_span(runtime.pipeline.codec, first, 1)[0]


class Connection:
    """One websocket: a session, and the receiver / ticker / sender tasks around it."""

    def __init__(self, server: PlayServer, ws) -> None:
        self.server = server
        self.ws = ws
        self.config = server.config
        self.stream: _Stream | None = None
        # The model and steps chosen (set by open): a text model has no stream until its
        # first prompt.
        self.entry: ModelEntry | None = None
        self.steps = self.config.steps
        self.action = 0  # the held action
        self.seq = 0  # the client's seq of the message that set it
        self.prompt: str | None = None  # a text model's prompt (kept over resets)
        self.prompt_seq = 0  # the client's seq of the message that set it
        self.prompt_at = time.perf_counter()  # when it arrived
        self.paused = False
        self.wake = asyncio.Event()  # wakes the ticker early
        self.changed = False  # the held action, pause or session changed: push at once
        self.owed = False  # a tick found no room: push as soon as a frame arrives
        self.lock = asyncio.Lock()  # one open/push/close of this connection at a time
        self.send_lock = asyncio.Lock()
        self.recent: deque[float] = deque()  # arrival times of the last second's messages

    # -- session ---------------------------------------------------------------------------------

    async def open(self, model: str, steps: int) -> None:
        """(Re)opens the session: a reset is a close + open (the runtime has no reset)."""
        entry = self.server.models[model]
        if entry.takes_prompt:
            await self._open_text(entry, steps)
            return
        seed = self._seed()
        async with self.lock:
            await self._close_stream()
            self.entry, self.steps = entry, steps
            rt = entry.runtime
            session = await self.server.ctl(
                lambda: rt.open(
                    steps=steps,
                    seed=seed,
                    # Pacing is the ticker's (one push per period): a paced buffer would
                    # hold back the frame answering an early push made for a key press.
                    target_fps=None,
                    buffer_frames=4 * self._inflight(entry),
                    backpressure="drop_oldest",
                    # A world model with opening frames starts on the game's first screen.
                    **entry.pipeline.start,
                )
            )
            self.stream = _Stream(session, entry, steps, time.perf_counter())
            # The opening frames come first, answering no key: the player's first action is
            # the one after them.
            opening = entry.pipeline.start_frames
            self.stream.pushed = 0 if opening is None else len(opening)
            self.action, self.seq = entry.idle_action, 0
        await self.send_json({"type": "session", "model": entry.describe(), "steps": steps})
        self.changed = True
        self.wake.set()

    async def _open_text(self, entry: ModelEntry, steps: int) -> None:
        """A text model's (re)start: its stream opens with the prompt, or with the first one
        to come."""
        tokens = None
        if self.prompt is not None:  # encoded before the old stream closes: a shorter gap
            tokens = await self.server.encode(entry, self.prompt)
        async with self.lock:
            await self._close_stream()
            self.entry, self.steps = entry, steps
            message = {
                "type": "session",
                "model": entry.describe(),
                "steps": steps,
                "prompt": self.prompt,
                "prompt_seq": self.prompt_seq,
            }
            stream = None
            if tokens is not None:
                stream = await self._open_text_stream(entry, steps, tokens)
            try:  # the "session" message goes out before any frame of the stream
                await self.send_json(message)
            finally:
                self.stream = stream  # (a failed send ends the connection: close() closes it)
        self.wake.set()

    async def _open_text_stream(self, entry: ModelEntry, steps: int, tokens) -> _Stream:
        seed, rt = self._seed(), entry.runtime
        session = await self.server.ctl(
            lambda: rt.open(
                steps=steps,
                seed=seed,
                cond=tokens,  # the prompt, encoded on the text workers
                # Paced by its buffer at the model's frame rate; generation pauses while two
                # chunks wait in it ("block"), so it never runs far ahead of the player (and
                # a new prompt shows within about two chunks).
                target_fps=entry.fps,
                buffer_frames=2 * entry.chunk_display_frames,
                backpressure="block",
            )
        )
        prompts = [(0, self.prompt_seq, self.prompt_at)]
        return _Stream(session, entry, steps, time.perf_counter(), prompts=prompts)

    def _seed(self) -> int:
        return self.config.seed if self.config.seed is not None else secrets.randbits(62)

    def _inflight(self, entry: ModelEntry) -> int:
        if self.config.max_inflight is not None:
            return max(self.config.max_inflight, entry.pipeline.sampler.chunk_frames)
        return 2 * entry.pipeline.sampler.chunk_frames

    async def _close_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            await self.server.ctl(stream.session.close)  # its KV pages return to the pool

    async def close(self) -> None:
        async with self.lock:
            await self._close_stream()

    # -- tasks -----------------------------------------------------------------------------------

    async def run(self, model: str, steps: int) -> None:
        await self.open(model, steps)
        tasks = [
            asyncio.create_task(self.receiver(), name="receiver"),
            asyncio.create_task(self.ticker(), name="ticker"),
            asyncio.create_task(self.sender(), name="sender"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()

    async def receiver(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            await self.handle(message)

    async def handle(self, message: dict[str, Any]) -> None:
        now = time.monotonic()
        self.recent.append(now)
        while self.recent and self.recent[0] < now - 1.0:
            self.recent.popleft()
        if len(self.recent) > self.config.max_messages_per_s:
            raise BadMessage(CLOSE_POLICY, f"more than {self.config.max_messages_per_s} msg/s")
        text = message.get("text")
        if text is None:
            raise BadMessage(CLOSE_UNSUPPORTED, "send JSON text messages, not binary")
        # Checked here, with a proper close, rather than by the server's websocket layer:
        # uvicorn's ws_max_size is only a hard bound far above this (see uvicorn_server).
        limit = self.server.max_message_bytes
        if len(text) > limit or len(text.encode("utf-8", "replace")) > limit:
            raise BadMessage(CLOSE_TOO_BIG, f"message over {limit} bytes")
        try:
            msg = json.loads(text)
        except json.JSONDecodeError:
            raise BadMessage(CLOSE_POLICY, "message is not JSON") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise BadMessage(CLOSE_POLICY, 'message must be a JSON object with a "type"')
        kind = msg["type"]
        if kind == "action":
            await self.on_action(msg)
        elif kind == "prompt":
            await self.on_prompt(msg)
        elif kind == "pause":
            paused = msg.get("paused")
            if not isinstance(paused, bool):
                raise BadMessage(CLOSE_POLICY, '"pause" needs "paused": true or false')
            self.paused = paused
            self.changed = True
            self.wake.set()
        elif kind == "reset":
            await self.open(*self._current())
        elif kind == "config":
            model, steps = self._current()
            chosen = msg.get("model", model)
            if "steps" in msg:
                steps = msg["steps"]
            elif (
                isinstance(chosen, str)
                and chosen in self.server.models
                and self.server.models[chosen].kind != self.server.models[model].kind
            ):
                steps = self.server.default_steps(chosen)  # a world model's steps don't carry
            self.check_choice(chosen, steps)
            await self.open(chosen, steps)
        else:
            raise BadMessage(CLOSE_POLICY, f"unknown message type {kind[:40]!r}")

    @staticmethod
    def _check_seq(seq: object) -> None:
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**32:
            raise BadMessage(CLOSE_POLICY, '"seq" must be an integer in [0, 2**32)')

    async def on_action(self, msg: dict[str, Any]) -> None:
        entry = self.entry
        if entry is not None and entry.takes_prompt:
            raise BadMessage(
                CLOSE_POLICY, "this is a text-to-video model: send a prompt, not actions"
            )
        action, seq = msg.get("action"), msg.get("seq", 0)
        self._check_seq(seq)
        try:
            if isinstance(action, str) and not entry.pipeline.action_names:
                action = entry.action_names.index(action)  # "action 2" on a nameless one
            action = entry.pipeline.action_id(action)
        except (ConfigError, ValueError) as err:
            raise BadMessage(CLOSE_POLICY, str(err)[:120]) from None
        if (action, seq) != (self.action, self.seq):
            self.action, self.seq = action, seq
            self.changed = True
            self.wake.set()

    async def on_prompt(self, msg: dict[str, Any]) -> None:
        """A text model's prompt: the first one starts its stream, a later one switches it
        from its next chunk on. Acknowledged with the index of the first frame made with it."""
        entry = self.entry
        if entry is None or not entry.takes_prompt:
            raise BadMessage(CLOSE_POLICY, "this is a world model: send actions, not a prompt")
        text, seq = msg.get("text"), msg.get("seq", 0)
        self._check_seq(seq)
        self.check_prompt(text)
        arrived = time.perf_counter()
        tokens = await self.server.encode(entry, text)
        async with self.lock:
            self.prompt, self.prompt_seq, self.prompt_at = text, seq, arrived
            ack = {"type": "prompt", "text": text, "seq": seq}
            stream = self.stream
            if stream is None:  # the first prompt starts the stream
                stream = await self._open_text_stream(entry, self.steps, tokens)
                try:  # the acknowledgement goes out before the stream's first frame
                    await self.send_json({**ack, "from_frame": 0})
                finally:
                    self.stream = stream
                return
            first = await self.server.ctl(_switch_prompt, stream.session, tokens)
            async with self.send_lock:  # no frame from `first` on goes out before this
                stream.prompts.append((first, seq, arrived))
                await self._send(self.ws.send_text(json.dumps({**ack, "from_frame": first})))

    def check_prompt(self, text: object) -> None:
        limit = self.config.max_prompt_chars
        if not isinstance(text, str) or len(text) > limit:
            raise BadMessage(CLOSE_POLICY, f'"text" must be a string of at most {limit} characters')
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800")
            raise BadMessage(CLOSE_POLICY, 'the prompt "text" is not valid Unicode') from None

    def _current(self) -> tuple[str, int]:
        if self.entry is None:  # before the first open
            return self.server.default_model, self.config.steps
        return self.entry.name, self.steps

    def check_choice(self, model: object, steps: object) -> None:
        if not isinstance(model, str) or model not in self.server.models:
            raise BadMessage(CLOSE_POLICY, f"unknown model; known: {list(self.server.models)}")
        max_steps = self.config.max_steps
        entry = self.server.models[model]
        if entry.takes_prompt:
            max_steps = min(max_steps, entry.max_steps)
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= max_steps:
            raise BadMessage(CLOSE_POLICY, f'"steps" must be an integer in [1, {max_steps}]')

    async def ticker(self) -> None:
        period = 1.0 / self.config.fps
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            entry = self.entry
            if entry is not None and entry.takes_prompt:
                # Nothing to push: a text model's frames come on their own.
                await self._woken_or_timeout(1.0)
                self.wake.clear()
                due = loop.time()
                continue
            await self._woken_or_timeout(max(0.0, due - loop.time()))
            self.wake.clear()
            now = loop.time()
            if not (self.changed or self.owed or now >= due):
                continue
            if self.paused:
                self.changed = self.owed = False
                due = now + period
            elif await self.push():
                # A changed input goes out at once, and the next tick is a full period later
                # (no burst after a stall, and a key press never waits for the frame clock).
                self.changed = self.owed = False
                due = now + period
            else:
                # The model is behind: push when its next frame makes room (the sender wakes
                # us) rather than queueing actions, which would only grow the latency.
                self.owed = True
                due = now + period

    async def _woken_or_timeout(self, timeout: float) -> None:
        """Waits for ``self.wake`` or ``timeout`` seconds. Not ``asyncio.wait_for``: on Python
        3.11 it returns normally when a cancellation arrives just as the event is set, and a
        flood of messages sets it constantly, so the ticker would outlive its session's close
        (and the close would never reach the client)."""
        woken = asyncio.ensure_future(self.wake.wait())
        try:
            await asyncio.wait({woken}, timeout=timeout)
        finally:
            woken.cancel()

    async def push(self) -> bool:
        async with self.lock:
            stream = self.stream
            if (
                stream is None
                or stream.prompts is not None  # a text model's stream (after a config switch)
                or stream.pushed - stream.received >= self._inflight(stream.entry)
            ):
                return False
            action, seq = self.action, self.seq
            await self.server.ctl(stream.session.push_actions, [action])
            stream.meta[stream.pushed] = (action, seq, time.perf_counter())
            stream.pushed += 1
            return True

    async def sender(self) -> None:
        while True:
            stream = self.stream
            if stream is None:
                await asyncio.sleep(0.01)
                continue
            if self.paused and stream.prompts is not None:
                # A paused text stream: its frames wait in its buffer, whose backpressure
                # pauses its generation.
                await asyncio.sleep(0.02)
                continue
            item = await self.server.pop(stream.session)
            if item is _TIMEOUT or self.stream is not stream:
                continue  # nothing yet, or a frame of a session that was reset: drop it
            if item is None:  # closed by a reset, or by the server shutting down
                if not stream.entry.runtime.running:
                    raise BadMessage(CLOSE_INTERNAL, "the runtime stopped")
                if self.stream is stream and stream.session.closed:
                    # Not by this connection (it lets go of a stream before closing it): the
                    # runtime ended it, a forward of its failed (the runtime logged why).
                    log.error("a session ended by the runtime: %r", stream.session.error)
                    raise SessionFailed(CLOSE_INTERNAL, "the model failed on this session")
                await asyncio.sleep(0.01)
                continue
            frame, index, _ = item
            if stream.prompts is not None:  # a text model: the prompt's seq, in send_frame
                stream.received = max(stream.received, index + 1)
                await self.send_frame(stream, frame, index, 0, None, 0.0)
                continue
            # Indices below `index` were dropped (drop_oldest) or already sent: forget them.
            for k in [k for k in stream.meta if k < index]:
                del stream.meta[k]
            action, seq, pushed_at = stream.meta.pop(index, (self.action, 0, time.perf_counter()))
            stream.received = max(stream.received, index + 1)
            if self.owed:
                self.wake.set()  # room for the action the ticker could not push
            await self.send_frame(
                stream, frame, index, action, seq, time.perf_counter() - pushed_at
            )

    async def send_frame(
        self, stream, frame: np.ndarray, index, action, seq: int | None, latency_s
    ) -> None:
        """Sends one frame; ``seq`` None: a text model's, which reflects the prompt its frame
        was made with (looked up under the send lock, after which no prompt acknowledgement
        can still be on its way for it), and whose latency counts from that prompt's
        arrival."""
        h, w, c = frame.shape
        async with self.send_lock:
            # Checked under the lock: a reset's "session" message may have gone out while this
            # frame waited, and the page must never see an old session's frame after it.
            if self.stream is not stream:
                return
            if seq is None:
                seq, arrived = stream.prompt_of(index)
                latency_s = time.perf_counter() - arrived
            header = FRAME_HEADER.pack(
                FRAME_HEADER.size,
                c,
                action,
                h,
                w,
                index & 0xFFFFFFFF,
                seq,
                min(int(latency_s * 1e6), 0xFFFFFFFF),
            )
            await self._send(self.ws.send_bytes(header + np.ascontiguousarray(frame).tobytes()))

    async def send_json(self, obj: dict[str, Any]) -> None:
        async with self.send_lock:
            await self._send(self.ws.send_text(json.dumps(obj)))

    async def _send(self, sending) -> None:
        """A send that must finish within ``send_timeout``: one that waits longer means the
        client stopped reading (its socket buffers are full), and ends the session."""
        if not await _within(sending, self.config.send_timeout):
            raise ClientStalled(
                CLOSE_POLICY, f"the client took no frame for {self.config.send_timeout:g} s"
            )


def decode_frame(data: bytes) -> tuple[dict[str, int], np.ndarray]:
    """A binary frame message back to ``(header fields, uint8 [H, W, C])`` (tests, clients)."""
    size, c, action, h, w, index, seq, latency_us = FRAME_HEADER.unpack_from(data)
    pixels = np.frombuffer(data, np.uint8, count=h * w * c, offset=size).reshape(h, w, c)
    fields = {"index": index, "action": action, "input_seq": seq, "latency_us": latency_us}
    return fields, pixels


def create_app(server: PlayServer) -> Any:
    """The FastAPI app: ``GET /`` (the page), ``/static/*``, ``GET /api/info``, ``WS /ws``.

    The app's lifespan starts the server's runtimes and stops them (closing every session).
    """
    from fastapi import FastAPI, WebSocket
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.websockets import WebSocketDisconnect

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            server.stop()

    # No OpenAPI schema or docs pages: the app is a page and a websocket, not an API.
    app = FastAPI(
        title="crcm play", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.server = server
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/info")
    async def info() -> JSONResponse:
        return JSONResponse(server.info())

    async def play(ws: WebSocket) -> None:
        # Browsers let any page open a websocket to 127.0.0.1: only this server's own page
        # (same host:port) may, while non-browser clients (no Origin header) are accepted.
        # (The Host header itself was checked by HostCheck.)
        origin = ws.headers.get("origin")
        if (
            origin is not None
            and urlsplit(origin).netloc.lower() != ws.headers.get("host", "").lower()
        ):
            with contextlib.suppress(Exception):
                await ws.close(code=CLOSE_POLICY, reason="cross-origin connection refused")
            return
        try:
            await ws.accept()
        except Exception as err:  # the client went away during the handshake
            log.debug("websocket handshake ended: %r", err)
            return
        timeout = server.config.send_timeout
        if server.active >= server.config.max_sessions:
            await _refuse(
                ws, CLOSE_TRY_LATER, "busy", "the server is full; try again later", timeout
            )
            return
        server.active += 1
        server.sessions_served += 1
        conn = Connection(server, ws)
        try:
            model = ws.query_params.get("model", server.default_model)
            steps_text = ws.query_params.get("steps")
            if steps_text is None:
                steps = server.default_steps(model) if model in server.models else 1
            else:
                # ASCII digits only (str.isdigit() also takes "²", which int() refuses), few.
                steps = int(steps_text) if re.fullmatch(r"[0-9]{1,3}", steps_text) else -1
            conn.check_choice(model, steps)
            prompt = ws.query_params.get("prompt")  # a text model's first prompt (optional)
            if prompt is not None:
                if not server.models[model].takes_prompt:
                    raise BadMessage(CLOSE_POLICY, "a world model takes actions, not a prompt")
                conn.check_prompt(prompt)
                conn.prompt = prompt
            await conn._send(ws.send_text(json.dumps({"type": "hello", **server.info()})))
            await conn.run(model, steps)
        except ClientStalled as err:
            # Its pages return first; the close frame may never get through a full socket,
            # so it is tried only briefly (and the error message not at all).
            log.info("closing a client that stopped reading: %s", err.reason)
            with contextlib.suppress(Exception):
                await conn.close()
            await _refuse(ws, err.code, err.kind, err.reason, min(1.0, timeout), explain=False)
        except BadMessage as err:
            await _refuse(ws, err.code, err.kind, err.reason, timeout)
        except CrcmError as err:  # e.g. PagesExhaustedError from open
            await _refuse(ws, CLOSE_TRY_LATER, "runtime", str(err), timeout)
        except (WebSocketDisconnect, OSError, RuntimeError) as err:
            log.debug("websocket ended: %r", err)  # the client went away mid-send
        except Exception as err:
            # A failure inside the server, never a client's input: one line in the log (no
            # traceback), a close code for the client, and the session's pages back.
            log.error("a session ended by an internal error: %s: %s", type(err).__name__, err)
            await _refuse(ws, CLOSE_INTERNAL, "internal", "internal server error", timeout)
        finally:
            try:  # its pages return before its seat does (when the server is shutting down,
                # stop() closes every session)
                with contextlib.suppress(Exception):
                    await conn.close()
            finally:
                server.active -= 1

    # A plain Starlette route: the handler reads its own query parameters, and FastAPI's
    # parameter injection (which would need the annotation resolvable at module level) is moot.
    app.router.add_websocket_route("/ws", play)
    return HostCheck(app, server.config.allowed_hosts)


class HostCheck:
    """ASGI middleware: refuses requests whose ``Host`` header names neither the address the
    connection came in on (the bound address) nor localhost nor an allowed name.

    A page on another site whose DNS name is made to resolve to 127.0.0.1 (DNS rebinding) is
    same-origin with its own name, so the ``Origin`` check alone would let it in; its requests
    still carry ``Host: <its name>``, which is refused here: HTTP gets 400, a websocket
    handshake 403 (before any session is opened).
    """

    def __init__(self, app: Any, allowed: Sequence[str] = ()) -> None:
        self.app = app
        self.allowed = {h.lower().strip("[]") for h in (*LOOPBACK_NAMES, *allowed)}

    def __getattr__(self, name: str) -> Any:  # app.state, app.router, ... of the wrapped app
        return getattr(self.app, name)

    def host_ok(self, scope: dict[str, Any]) -> bool:
        host = next((v for k, v in scope.get("headers", ()) if k == b"host"), None)
        if host is None:
            return False
        try:
            parts = urlsplit("//" + host.decode("latin-1"))
            name, _ = parts.hostname, parts.port  # .port raises ValueError when malformed
        except ValueError:
            return False
        if not name:
            return False
        bound = (scope.get("server") or (None,))[0]
        if bound is not None and _same_address(name, str(bound)):
            return True
        return name.lower() in self.allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or self.host_ok(scope):
            await self.app(scope, receive, send)
            return
        log.info("refused a request for another host (DNS rebinding?)")
        if scope["type"] == "http":
            body = b"invalid Host header: this server answers to its own address and localhost"
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        else:
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": CLOSE_POLICY})  # HTTP 403


def _same_address(name: str, bound: str) -> bool:
    try:
        return ipaddress.ip_address(name.strip("[]")) == ipaddress.ip_address(bound)
    except ValueError:
        return name.lower() == bound.lower()


def _close_reason(message: str) -> str:
    """``message`` cut to a close frame's 123 bytes of UTF-8 (a longer reason would make the
    close itself fail, dropping the connection without a close code)."""
    data = message.encode("utf-8", "replace")[: MAX_REASON_BYTES - 3]
    return data.decode("utf-8", "ignore")


async def _within(coro, timeout: float) -> bool:
    """Awaits ``coro`` for at most ``timeout`` s; False (and ``coro`` cancelled) if it took
    longer; its exception, if it raised one. Not ``asyncio.wait_for``: on Python 3.11 that
    returns normally when a cancellation arrives just as ``coro`` finishes, and a task looping
    on it (the sender) would outlive its session's close."""
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        if not task.done():
            task.cancel()
        # It may end with an error (the client went away meanwhile), also just as this
        # coroutine is cancelled, when nobody reads its result: retrieve it, or asyncio logs
        # "Task exception was never retrieved".
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
    if not done:
        return False
    task.result()
    return True


async def _refuse(
    ws, code: int, kind: str, message: str, timeout: float = 10.0, explain: bool = True
) -> None:
    """Tells the client why (a JSON error, with ``explain``), then closes with ``code``; the
    client may be gone, or not reading (each step is bounded by ``timeout``)."""
    if explain:
        error = json.dumps({"type": "error", "code": kind, "message": message[:500]})
        with contextlib.suppress(Exception):
            await _within(ws.send_text(error), timeout)
    with contextlib.suppress(Exception):
        await _within(ws.close(code=code, reason=_close_reason(message)), timeout)


def bind_socket(host: str, port: int) -> socket.socket:
    """Binds before the server starts, so that port 0 resolves to a known free port and the
    printed URL accepts connections at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # connections made before uvicorn is up wait in the backlog
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def uvicorn_server(app: Any, config: ServeConfig, log_level: str = "warning") -> Any:
    import uvicorn

    return uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=log_level,
            # The app refuses messages over max_message_bytes with 1009 and a closing
            # handshake. The websocket layer's own limit, which fails the connection at once
            # (a client still sending may then miss the close frame), only bounds memory.
            ws_max_size=max(64 * config.max_message_bytes, 2**16),
            # A vanished client, or one that stopped reading, is noticed and its pages freed.
            ws_ping_interval=config.ping_interval,
            ws_ping_timeout=config.ping_timeout,
            timeout_graceful_shutdown=3,
        )
    )


class ServerThread:
    """Runs the app with uvicorn in a background thread (tests, benchmarks)::

    with ServerThread(create_app(server), server.config) as srv:
        url = srv.url
    """

    def __init__(self, app: Any, config: ServeConfig, host: str = "127.0.0.1", port: int = 0):
        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn_server(app, config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the play server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()
