"""The Python API of the streaming runtime: a :class:`Runtime` serving many :class:`Session`s.

>>> import crcm
>>> pipe = crcm.Pipeline.from_config("tiny")
>>> rt = crcm.Runtime(pipe, max_streams=4)
>>> s = rt.open(steps=2, seed=0)
>>> s.push_actions([0, 1, 2])
>>> rt.run_until_idle()
3
>>> [frame.shape for frame in s.read()]
[(16, 16, 1), (16, 16, 1), (16, 16, 1)]

A runtime owns one Rust scheduler (stream state machines + KV page pool), the torch page
tensors, and the executor. ``step()`` runs one plan — one batched forward for every stream
that is ready — synchronously; ``start()`` runs that loop in a background thread for servers.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import numbers
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch

from crcm import _native
from crcm.codec import StreamingCodec, model_frames_for, video_frame_span
from crcm.errors import ConfigError, CrcmError, InvalidStateError
from crcm.pipeline import Pipeline
from crcm.runtime.executor import Executor, StreamState
from crcm.runtime.kv_cache import PagedKVCache
from crcm.sampling import SamplerConfig, get_preset

PAGE_TILE = 16  # pages are padded to the attention kernel's tile
logger = logging.getLogger(__name__)

# Bounds of the native runtime, checked here so that a refusal names the argument.
MAX_PAGES = 2**24  # crcm-core's PagePool limit
MAX_BUFFER_FRAMES = 2**20  # crcm-core's FrameBuffer MAX_CAPACITY
MAX_PENDING_ACTIONS = 2**24  # crcm-core's Scheduler MAX_PENDING_ACTIONS (per stream)
MIN_FPS, MAX_FPS = 1e-6, 1e6  # crcm-core's FrameBuffer pacing bounds
BACKPRESSURES = ("block", "drop_oldest")
ADMISSIONS = ("refuse", "queue")


def _is_int(value: object) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _int_arg(name: str, value: object, low: int, high: int, high_text: str | None = None) -> int:
    """``value`` as an int in ``[low, high)``, or a ConfigError naming the argument."""
    if not _is_int(value) or not low <= int(value) < high:
        raise ConfigError(
            f"{name} must be an integer in [{low}, {high_text or high}), got {value!r}"
        )
    return int(value)


def _seed_arg(name: str, seed: object) -> int | None:
    """A noise seed in ``[0, 2**64)``: torch would wrap -1 to 2**64 - 1 (the same frames)."""
    return None if seed is None else _int_arg(name, seed, 0, 2**64, "2**64")


def _seconds_arg(name: str, value: object) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or float(value) < 0
    ):
        raise ConfigError(
            f"{name} must be None (no limit) or a finite number of seconds >= 0, got {value!r}"
        )
    return float(value)


class Session:
    """One stream: push actions (world models), read frames, close. Thread-safe."""

    def __init__(
        self,
        runtime: Runtime,
        stream_id: int,
        sampler: SamplerConfig,
        needs_actions: bool,
        *,
        buffer_frames: int,
        backpressure: str,
        target_fps: float | None,
    ) -> None:
        h, w, c = runtime.pipeline.frame_shape
        self.buffer = _native.FrameBuffer(
            h, w, c, capacity=buffer_frames, target_fps=target_fps, backpressure=backpressure
        )
        self.runtime = runtime
        self.id = stream_id
        self.sampler = sampler
        self.needs_actions = needs_actions
        self.buffer_frames = buffer_frames
        self.backpressure = backpressure
        self.target_fps = target_fps
        self.error: Exception | None = None  # why the runtime ended this session, if it did
        self._display_limit: int | None = None  # max_frames, in display frames
        self._closed = False

    def _buffer_is_full(self) -> bool:
        """Whether one more chunk could overflow a blocking buffer (the stream must pause)."""
        if self.backpressure != "block":
            return False
        chunk = self.runtime._chunk_display_frames(self.sampler)
        return len(self.buffer) + chunk > self.buffer_frames

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidStateError(f"session {self.id} is closed")

    def push_actions(self, actions: Sequence[int | str]) -> None:
        """Queues one action (id or name) per future frame, in order. All or nothing: a
        sequence with one bad action queues none of them."""
        self._check_open()
        if not self.needs_actions:
            raise ConfigError(f"session {self.id} was opened without actions")
        if isinstance(actions, (str, bytes, numbers.Number)) or not hasattr(actions, "__iter__"):
            raise ConfigError(
                "push_actions takes a sequence of actions, e.g. [0] or ['left'], got "
                f"{type(actions).__name__}"
            )
        ids = []
        for a in actions:  # bounded: an endless iterator is refused, not followed forever
            ids.append(self.runtime.pipeline.action_id(a))
            if len(ids) > MAX_PENDING_ACTIONS:
                raise ConfigError(f"push_actions takes at most {MAX_PENDING_ACTIONS} actions")
        self.runtime._push_actions(self.id, ids)

    def read(self, max_frames: int | None = None) -> list[np.ndarray]:
        """Frames generated so far (``uint8 [H, W, C]``), oldest first, without waiting."""
        if max_frames is not None:
            max_frames = _int_arg("max_frames", max_frames, 0, 2**63, "2**63")
        frames = []
        while max_frames is None or len(frames) < max_frames:
            item = self.buffer.try_pop()
            if item is None:
                break
            frames.append(item[0])
        return frames

    def pop(self, timeout: float | None = None) -> tuple[np.ndarray, int, float] | None:
        """The next ``(frame, index, timestamp)``, waiting up to ``timeout`` s (paced by the
        buffer's target FPS; None: as long as it takes); None once the session is closed and
        drained. Ctrl+C interrupts the wait (``KeyboardInterrupt``)."""
        return self.buffer.pop(_seconds_arg("timeout", timeout))

    def frames(self) -> Iterator[np.ndarray]:
        """Every frame in order, driving the runtime when it is not running in the background.
        Ends when the stream is finished (``max_frames``) or out of actions."""
        while True:
            yield from self.read()
            if self._closed:
                return
            if self.runtime.running:
                item = self.buffer.pop(timeout=1.0)
                if item is not None:
                    yield item[0]
                continue
            if self.runtime.step() == 0:  # nothing left to run: drain and stop
                yield from self.read()
                return

    def stats(self) -> dict[str, object]:
        self._check_open()
        return {**self.runtime.scheduler.stream_stats(self.id), **self.buffer.stats()}

    def set_prompt(self, prompt: str) -> None:
        """Switches a text model's prompt from the next chunk on, without a restart: the K/V
        of the frames in the cache are recomputed under the new prompt first (LongLive's
        re-cache), so the video changes smoothly. Needs a pipeline with a text encoder."""
        self._check_open()
        self.runtime._switch_cond(self, self.runtime._encode_prompt(prompt))

    def set_cond(self, cond: int | torch.Tensor) -> None:
        """Like :meth:`set_prompt` with a condition as ``Runtime.open(cond=...)`` takes it."""
        self._check_open()
        self.runtime._switch_cond(self, cond)

    def fork(self, *, seed: int | None = None) -> Session:
        """A new session continuing from this one's context (shared KV pages)."""
        self._check_open()
        return self.runtime._fork(self, _seed_arg("seed", seed))

    def close(self) -> None:
        """Ends the session; its KV pages return to the pool. Idempotent."""
        if not self._closed:
            self._closed = True
            self.runtime._close(self)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Runtime:
    """Serves many streams of one pipeline with batched forwards over a paged KV cache.

    Args:
        pipeline: the model, codec and default sampler.
        max_streams: streams that can be open at once with the default context size; more are
            refused with ``PagesExhaustedError`` (or queued with ``admission="queue"``).
        context_frames: the longest sink + window + chunk any session will use (defaults to
            the pipeline sampler's); sizes the page pool.
        cfg: allocate the unconditional KV plane for guided (teacher) sampling.
        attention_backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"``,
            ``"triton"``.
        compile: run the batched forwards through ``torch.compile``
            (:func:`crcm.runtime.executor.compile_forward`): faster per frame, at the cost of
            seconds of compilation at the first forwards; the model must not change afterwards.
        fuse_cache_update: with a clean-context sampler (``cache_update=True``), run a chunk's
            time-0 cache-update pass inside the next chunk's first forward when the stream is
            alone in its plan and that chunk can start at once (its actions are in): one
            batched forward per chunk at one step instead of two, with the same frames. A
            stream that waits for its next action runs the pass while it waits, so a key press
            still costs one forward.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        max_streams: int = 8,
        context_frames: int | None = None,
        cfg: bool = False,
        device: torch.device | str | None = None,
        attention_backend: str = "auto",
        max_batch_tokens: int | None = None,
        compile: bool = False,
        fuse_cache_update: bool = True,
    ) -> None:
        max_streams = _int_arg("max_streams", max_streams, 1, MAX_PAGES + 1)
        if context_frames is not None:
            context_frames = _int_arg("context_frames", context_frames, 1, MAX_PAGES + 1)
        if max_batch_tokens is not None:
            max_batch_tokens = _int_arg("max_batch_tokens", max_batch_tokens, 1, 2**31, "2**31")
        model = pipeline.model
        self.device = torch.device(device) if device is not None else _param_device(model)
        model.to(self.device).eval()
        self.pipeline = pipeline
        self.max_streams = max_streams
        c, h, w = pipeline.latent_chw
        tokens_per_frame = model.tokens_per_frame(h, w)
        page_tokens = -(-tokens_per_frame // PAGE_TILE) * PAGE_TILE
        if context_frames is None:
            s = pipeline.sampler
            if s.window_frames is None:
                raise ConfigError("the default sampler has no window; pass context_frames")
            context_frames = s.sink_frames + s.window_frames + s.largest_chunk_frames
        num_pages = max_streams * context_frames  # one page per frame (padded to the tile)
        if num_pages > MAX_PAGES:
            raise ConfigError(
                f"max_streams × context_frames = {max_streams} × {context_frames} = {num_pages} "
                f"KV pages, over the limit of {MAX_PAGES}"
            )
        self.scheduler = _native.Scheduler(
            num_pages=num_pages,
            page_tokens=page_tokens,
            tokens_per_frame=tokens_per_frame,
            max_batch_tokens=max_batch_tokens
            or min(max_streams * context_frames * tokens_per_frame, 2**31 - 1),
            max_batch_items=max_streams,
        )
        cfg_d = model.cfg
        self.cache = PagedKVCache(
            num_layers=cfg_d.num_layers,
            num_pages=num_pages,
            page_tokens=page_tokens,
            tokens_per_frame=tokens_per_frame,
            num_heads=cfg_d.num_heads,
            head_dim=cfg_d.head_dim,
            planes=2 if cfg else 1,
            device=self.device,
            dtype=next(model.parameters()).dtype,
        )
        self.executor = Executor(
            model,
            pipeline.codec,
            self.cache,
            (c, h, w),
            attention_backend,
            page_table=self.scheduler.page_table,
            compile=compile,
        )
        if fuse_cache_update:
            self.executor.next_chunk_ready = self._next_chunk_ready
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()  # one plan at a time; guards sessions and the executor
        self._wake = threading.Event()  # set when there may be new work for the loop
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- sessions -------------------------------------------------------------------------------

    def open(
        self,
        *,
        sampler: SamplerConfig | str | None = None,
        steps: int | Sequence[int] | None = None,
        cond: int | torch.Tensor | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        seed: int | None = None,
        actions: bool | None = None,
        max_frames: int | None = None,
        target_fps: float | None = None,
        buffer_frames: int = 64,
        backpressure: str = "block",
        admission: str = "refuse",
        context: np.ndarray | None = None,
        context_actions: Sequence[int | str] | None = None,
    ) -> Session:
        """Opens a session.

        Args:
            sampler: a :class:`SamplerConfig`, a preset name (``consistency``, ``teacher``,
                ``self-forcing``) or None for the pipeline's default.
            steps: steps per chunk (an int, or a per-chunk schedule such as ``(4, 2)``).
            cond: per-video condition — a class id, text tokens ``[text_len, text_dim]``, or
                None for the null condition.
            prompt: for a pipeline with a text encoder (``crcm.load`` of a Wan folder): the
                text, encoded (and cached) for you; instead of ``cond``. Default: ``""``.
            negative_prompt: the unconditional branch of guided (CFG) sampling; default: the
                pipeline's negative prompt.
            seed: noise seed of this stream (random when None).
            actions: whether frames wait for pushed actions (default: the model takes actions).
            max_frames: stop after this many (display) frames.
            target_fps: pacing of the frame buffer and the scheduler's deadlines.
            buffer_frames / backpressure: the frame buffer's capacity and what happens when it
                is full: ``"block"`` pauses this stream's generation, ``"drop_oldest"`` drops.
            context: ground-truth frames to start from, ``uint8 [K, H, W, C]`` (``K`` a multiple
                of the chunk size): the stream takes them as its first ``K`` frames instead of
                generating them — their K/V fill its cache as if it had made them, and they are
                the first frames it emits — then continues from them.
            context_actions: for a world model, the action before each context frame (``K``
                of them; ``-1`` or ``"none"``: no action); pushed ahead of any later action.
        """
        # All or nothing: every argument is checked before the scheduler admits the stream,
        # and whatever fails after that is undone, so a refused open leaves no stream, page,
        # session or executor state behind.
        sampler = self._sampler(sampler, steps)
        model = self.pipeline.model
        if actions is not None and not isinstance(actions, (bool, np.bool_)):
            raise ConfigError(f"actions must be True, False or None, got {actions!r}")
        needs_actions = bool(model.cfg.num_actions) if actions is None else bool(actions)
        if needs_actions and not model.cfg.num_actions:
            raise ConfigError("this model takes no actions (open it with actions=None or False)")
        if model.cfg.prev_frames and sampler.largest_chunk_frames != 1:
            raise ConfigError(
                "this model conditions on its previous frames and streams one frame per chunk; "
                f"got chunk_frames={sampler.chunk_frames}"
            )
        display_limit = None
        if max_frames is not None:
            display_limit = _int_arg("max_frames", max_frames, 1, 2**63, "2**63")
            max_frames = model_frames_for(self.pipeline.codec, display_limit)
        if target_fps is not None:
            ok = not isinstance(target_fps, (bool, np.bool_)) and isinstance(
                target_fps, numbers.Real
            )
            if not ok or not MIN_FPS <= float(target_fps) <= MAX_FPS:
                raise ConfigError(
                    f"target_fps must be None or a number of frames per second in "
                    f"[{MIN_FPS:g}, {MAX_FPS:g}], got {target_fps!r}"
                )
            target_fps = float(target_fps)
        buffer_frames = _int_arg("buffer_frames", buffer_frames, 1, MAX_BUFFER_FRAMES + 1)
        if not isinstance(backpressure, str) or backpressure not in BACKPRESSURES:
            raise ConfigError(
                f"backpressure must be 'block' or 'drop_oldest', got {backpressure!r}"
            )
        chunk_display = self._chunk_display_frames(sampler)
        if backpressure == "block" and buffer_frames < chunk_display:
            raise ConfigError(
                f"buffer_frames={buffer_frames} cannot hold one chunk of {chunk_display} "
                "frames: with backpressure='block' the stream would wait forever"
            )
        if not isinstance(admission, str) or admission not in ADMISSIONS:
            raise ConfigError(f"admission must be 'refuse' or 'queue', got {admission!r}")
        seed = _seed_arg("seed", seed)
        context_x, context_ids = self._context(context, context_actions, sampler, needs_actions)
        if sampler.still_threshold and not self.pipeline.model.cfg.prev_frames:
            raise ConfigError(
                "still_threshold holds pixels at the previous frame's value, which only models "
                "with prev_frames > 0 keep; set it to 0 for this model"
            )
        guided = sampler.kind == "euler" and sampler.cfg_scale != 1.0
        encoder = self.pipeline.text_encoder
        if prompt is not None and cond is not None:
            raise ConfigError("give a prompt or a cond, not both")
        if prompt is not None or (cond is None and encoder is not None):
            cond = self._encode_prompt("" if prompt is None else prompt)
        cond_row = self._cond_row(cond)
        uncond_row = None
        if negative_prompt is not None or (guided and encoder is not None):
            text = self.pipeline.negative_prompt if negative_prompt is None else negative_prompt
            uncond_row = self._cond_row(self._encode_prompt(text))
        if guided and self.cache.planes < 2:
            raise ConfigError(
                "guided sampling (cfg_scale != 1) needs the unconditional KV plane: create the "
                "Runtime with cfg=True"
            )
        generator = torch.Generator().manual_seed(
            int(torch.randint(0, 2**62, ()).item()) if seed is None else seed
        )
        with self._lock:
            sid = next(self._ids)
            # The frame buffer first: it checks its own arguments and holds nothing to undo.
            session = Session(
                self,
                sid,
                sampler,
                needs_actions,
                buffer_frames=buffer_frames,
                backpressure=backpressure,
                target_fps=target_fps,
            )
            self.scheduler.open(
                sid,
                chunk_frames=sampler.chunk_frames,
                first_chunk_frames=sampler.first_chunk_frames,
                steps_per_chunk=list(sampler.steps_per_chunk),
                times=list(sampler.times),
                cache_update=sampler.cache_update,
                sink_frames=sampler.sink_frames,
                window_frames=sampler.window_frames,
                max_frames=max_frames,
                target_fps=target_fps,
                needs_actions=needs_actions,
                admission=admission,
            )
            try:
                session._display_limit = display_limit
                state = StreamState(
                    sampler, cond_row, generator, self._sink(session.buffer, display_limit)
                )
                state.context = context_x
                state.uncond = uncond_row
                if isinstance(self.pipeline.codec, StreamingCodec):
                    state.decoder = self.pipeline.codec.open_stream()
                self.executor.add_stream(sid, state)
                self.sessions[sid] = session
                if context_ids:
                    self.scheduler.push_actions(sid, context_ids)
            except BaseException:
                self._undo_open(session)
                raise
        self._wake.set()
        return session

    def _undo_open(self, session: Session) -> None:
        """Takes back a stream the scheduler admitted (its pages return). Holds the lock."""
        session._closed = True
        self.sessions.pop(session.id, None)
        self.executor.remove_stream(session.id)
        with contextlib.suppress(CrcmError):
            self.scheduler.close(session.id)
        session.buffer.close()

    def _context(
        self,
        frames: np.ndarray | None,
        actions: Sequence[int | str] | None,
        sampler: SamplerConfig,
        needs_actions: bool,
    ) -> tuple[torch.Tensor | None, list[int]]:
        """Validated context frames in model space and their action ids."""
        if frames is None:
            if actions is not None:
                raise ConfigError("context_actions needs context frames")
            return None, []
        try:
            frames = np.asarray(frames)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"context must be a uint8 array of frames: {err}") from None
        shape = self.pipeline.frame_shape
        if frames.dtype != np.uint8 or frames.ndim != 4 or tuple(frames.shape[1:]) != shape:
            raise ConfigError(
                f"context must be uint8 [K, {', '.join(map(str, shape))}] frames, got "
                f"{frames.dtype} {list(frames.shape)}"
            )
        K = frames.shape[0]
        codec = self.pipeline.codec
        model_frames = model_frames_for(self.pipeline.codec, K) if K else 0
        if K == 0 or video_frame_span(codec, 0, model_frames)[1] != K:
            raise ConfigError(
                f"context has {K} frames: the codec takes 1 + {codec.temporal_downsample}·n"
                if getattr(codec, "first_frame_alone", False)
                else f"context has {K} frames: it must be a positive multiple of "
                f"{codec.temporal_downsample}"
            )
        first = sampler.chunk_frames_of(0)
        if model_frames < first or (model_frames - first) % sampler.chunk_frames:
            chunks = (
                f"{first} + a multiple of {sampler.chunk_frames}"
                if first != sampler.chunk_frames
                else f"a positive multiple of {first}"
            )
            raise ConfigError(
                f"context has {K} frames ({model_frames} model frames): whole chunks are "
                f"{chunks} model frames"
            )
        ids: list[int] = []
        if actions is not None and (
            isinstance(actions, (str, bytes)) or not hasattr(actions, "__len__")
        ):
            raise ConfigError(
                f"context_actions must be a sequence of actions, got {type(actions).__name__}"
            )
        if needs_actions:
            if actions is None or len(actions) != K:
                got = 0 if actions is None else len(actions)
                raise ConfigError(
                    f"context_actions needs one action per context frame ({K}), got {got}"
                )
            # -1 or "none" is no action (the model's null action): e.g. before an episode's
            # first frame.
            null = self.pipeline.model.null_action
            ids = [
                null
                if (isinstance(a, str) and a == "none") or (_is_int(a) and int(a) == -1)
                else self.pipeline.action_id(a)
                for a in actions
            ]
        elif actions is not None:
            raise ConfigError("this session takes no actions; pass context_actions=None")
        x = self.pipeline.codec.encode(torch.from_numpy(np.ascontiguousarray(frames))[None])[0]
        # Contiguous, as generated frames are: a compiled forward specialises on strides, and
        # a channels-last context would compile it again at the stream's first forward.
        return x.to(self.device, self.cache.k.dtype).contiguous(), ids

    def _sampler(
        self, sampler: SamplerConfig | str | None, steps: int | Sequence[int] | None
    ) -> SamplerConfig:
        base = self.pipeline.sampler
        schedule = None if steps is None else self._steps(steps)
        if isinstance(sampler, str):
            one = schedule[0] if schedule is not None and len(schedule) == 1 else None
            preset = get_preset(sampler, one)
            sampler = preset.streamed_like(base)
        elif sampler is None:
            sampler = base
        elif not isinstance(sampler, SamplerConfig):
            raise ConfigError(
                "sampler must be a SamplerConfig or a preset name, got "
                f"{type(sampler).__name__} {sampler!r}"[:200]
            )
        if schedule is not None:
            if max(schedule) > len(sampler.times):
                raise ConfigError(
                    f"steps must be in [1, {len(sampler.times)}] for this sampler (it has "
                    f"{len(sampler.times)} times), got {list(schedule)}"
                )
            sampler = sampler.with_steps(*schedule)
        return sampler

    @staticmethod
    def _steps(steps: object) -> tuple[int, ...]:
        """Steps per chunk: an int, or a per-chunk schedule of them."""
        if _is_int(steps):
            schedule: tuple = (steps,)
        elif isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
            schedule = ()
        else:
            schedule = tuple(steps)
        if not schedule or not all(_is_int(n) and 1 <= int(n) < 2**32 for n in schedule):
            raise ConfigError(
                "steps must be a positive integer or a non-empty sequence of them (one per "
                f"chunk, the last repeating), got {steps!r}"[:200]
            )
        return tuple(int(n) for n in schedule)

    def _chunk_display_frames(self, sampler: SamplerConfig) -> int:
        """The most display frames one chunk of ``sampler`` can emit."""
        return sampler.largest_chunk_frames * self.pipeline.codec.temporal_downsample

    def _encode_prompt(self, prompt: object) -> torch.Tensor:
        encoder = self.pipeline.text_encoder
        if encoder is None:
            raise ConfigError(
                "this pipeline has no text encoder: pass cond= tokens, or load a model folder "
                "with one (crcm.load of a diffusers Wan folder)"
            )
        if not isinstance(prompt, str):
            raise ConfigError(f"a prompt must be a string, got {_short(prompt)}")
        return encoder.encode([prompt])[0]

    def _switch_cond(self, session: Session, cond: object) -> None:
        if self.pipeline.model.cfg.cond != "text":
            raise ConfigError("only text-conditioned models can switch their prompt mid-stream")
        row = self._cond_row(cond)
        with self._lock:
            session._check_open()
            own = {int(p) for p in self.scheduler.page_table(session.id)[1].reshape(-1)}
            for sid in self.sessions:
                theirs = self.scheduler.page_table(sid)[1].reshape(-1)
                if sid != session.id and own.intersection(int(p) for p in theirs):
                    raise InvalidStateError(
                        f"session {session.id} shares cached frames with session {sid} (a "
                        "fork): switching its prompt would rewrite theirs too"
                    )
            self.executor.streams[session.id].pending_cond = row
        self._wake.set()

    def _cond_row(self, cond: int | torch.Tensor | None) -> torch.Tensor | None:
        """The stream's condition row, checked: a class id in range, or text tokens of the
        model's shape with finite values (NaN/inf tokens would make every frame NaN)."""
        model = self.pipeline.model
        kind = model.cfg.cond
        if kind == "none":
            if cond is not None:
                raise ConfigError("this model takes no condition; pass cond=None")
            return None
        if kind == "class":
            cls = model.null_class if cond is None else cond
            one_int_tensor = isinstance(cls, torch.Tensor) and cls.numel() == 1 and _int_dtype(cls)
            one_int_array = isinstance(cls, np.ndarray) and cls.size == 1 and _is_int(cls.flat[0])
            if one_int_tensor or one_int_array:
                cls = cls.item()
            if not _is_int(cls) or not 0 <= int(cls) <= model.null_class:
                raise ConfigError(
                    f"cond: the class condition must be an int in [0, {model.null_class}) "
                    f"({model.null_class}: none), got {_short(cond)}"
                )
            return torch.tensor([int(cls)], device=self.device)
        if cond is None:
            return model.null_text[None].detach().to(self.device)
        shape = list(model.null_text.shape)
        try:
            tokens = torch.as_tensor(cond)
        except (TypeError, ValueError, RuntimeError):
            tokens = None
        if tokens is None or not (tokens.is_floating_point() or _int_dtype(tokens)):
            raise ConfigError(
                f"cond: the text condition must be a {shape} tensor of numbers, got {_short(cond)}"
            )
        if list(tokens.shape) != shape:
            raise ConfigError(f"cond: the text condition must be {shape}, got {list(tokens.shape)}")
        finite = torch.isfinite(tokens)
        if not bool(finite.all()):
            raise ConfigError(
                f"cond must be finite: {int((~finite).sum())} of its {tokens.numel()} values are "
                "NaN or infinite"
            )
        return tokens[None].to(self.device, model.null_text.dtype)

    @staticmethod
    def _sink(buffer: _native.FrameBuffer, limit: int | None = None):
        def sink(frames: np.ndarray, first: int) -> None:
            if limit is not None:  # a video VAE's last chunk may decode past max_frames
                frames = frames[: max(0, limit - first)]
            for k, frame in enumerate(frames):
                # A "block" buffer never blocks the executor: the stream is paused before its
                # buffer can overflow (see step()); timeout=0 turns a bug into an error.
                buffer.push(np.ascontiguousarray(frame), first + k, timeout=0.0)

        return sink

    def _push_actions(self, sid: int, ids: list[int]) -> None:
        # The Rust scheduler is thread-safe on its own: a push never waits for a running forward.
        self.scheduler.push_actions(sid, ids)
        self._wake.set()

    def _next_chunk_ready(self, sid: int) -> bool:
        """Whether the stream's next chunk can start at the next plan: its actions are in and
        its frame buffer has room (the executor's question, see ``fuse_cache_update``)."""
        session = self.sessions.get(sid)
        if session is None or session._buffer_is_full():
            return False
        if not session.needs_actions:
            return True
        pending = int(self.scheduler.stream_stats(sid)["pending_actions"])
        return pending >= session.sampler.chunk_frames

    def _fork(self, parent: Session, seed: int | None) -> Session:
        with self._lock:  # all or nothing, like open
            # The child shares the parent's pages: they must hold every K/V first.
            self.executor.flush(parent.id)
            sid = next(self._ids)
            session = Session(
                self,
                sid,
                parent.sampler,
                parent.needs_actions,
                buffer_frames=parent.buffer_frames,
                backpressure=parent.backpressure,
                target_fps=parent.target_fps,
            )
            self.scheduler.fork(parent.id, sid)
            try:
                src = self.executor.streams[parent.id]
                generator = torch.Generator()
                if seed is None:
                    generator.set_state(src.generator.get_state())
                else:
                    generator.manual_seed(seed)
                # Everything the parent's stream holds (its chunk in progress, context still to
                # prefill, previous frames), with its own noise and frame sink.
                state = replace(
                    src,
                    generator=generator,
                    sink=self._sink(session.buffer, parent._display_limit),
                    written=list(src.written),
                )
                if src.decoder is not None:
                    state.decoder = self.pipeline.codec.fork_stream(src.decoder)
                self.executor.add_stream(sid, state)
                self.sessions[sid] = session
            except BaseException:
                self._undo_open(session)
                raise
        self._wake.set()
        return session

    def _close(self, session: Session) -> None:
        with self._lock:
            self.scheduler.close(session.id)
            self.executor.remove_stream(session.id)
            self.sessions.pop(session.id, None)
            session.buffer.close()

    # -- running --------------------------------------------------------------------------------

    def step(self) -> int:
        """Runs one plan (one batched forward per chunk size); returns how many items ran."""
        with self._lock:
            for sid, session in self.sessions.items():
                self.scheduler.set_paused(sid, session._buffer_is_full())
            plan = self.scheduler.tick()
            if plan is None:
                return 0
            try:
                self.executor.run(plan)
            except Exception as err:
                # Isolate the failure: the plan's streams end with the error recorded on their
                # sessions; every other stream keeps running.
                self.scheduler.fail(plan.id)
                for sid in {int(i) for i in plan.stream_ids}:
                    if (session := self.sessions.get(sid)) is not None:
                        session.error = err
                        session.close()
                raise
            self.scheduler.complete(plan.id)
            return len(plan)

    def warm_up(self, streams: int = 2, sampler: SamplerConfig | str | None = None) -> float:
        """Runs throw-away streams so that the first real one does not wait: one stream alone,
        then ``streams`` together (at most ``max_streams``; their first two chunks each), with
        ``sampler`` (default: the pipeline's). With ``compile=True`` this is when the forwards
        compile, for one stream and for a batch of several (a dynamic batch dimension, so any
        number of streams after it). If compiling fails (Inductor needs a C++ compiler on
        CPU), the runtime warns and goes on uncompiled. Call it before serving, with no session
        open; returns the seconds it took.
        """
        if self.sessions:
            raise InvalidStateError("warm_up() runs before any session is opened")
        t0 = time.perf_counter()
        try:
            self._warm_up(streams, sampler)
        except Exception as err:
            if not self.executor.compiled:
                raise
            warnings.warn(
                f"compiling the model failed ({type(err).__name__}: {err}); running it uncompiled",
                RuntimeWarning,
                stacklevel=2,
            )
            self.executor.use_eager()
            for session in list(self.sessions.values()):
                session.close()
            self._warm_up(streams, sampler)
        return time.perf_counter() - t0

    def _warm_up(self, streams: int, sampler: SamplerConfig | str | None) -> None:
        # Both kinds of forward a stream runs: cache updates alone (a player waiting for a
        # key) and fused into the next chunk's forward (actions queued).
        fused = self.executor.next_chunk_ready
        try:
            for ready in dict.fromkeys((None, fused)):
                self.executor.next_chunk_ready = ready
                self._warm_up_streams(streams, sampler)
        finally:
            self.executor.next_chunk_ready = fused

    def _warm_up_streams(self, streams: int, sampler: SamplerConfig | str | None) -> None:
        takes_actions = bool(self.pipeline.model.cfg.num_actions)
        for n in sorted({1, max(1, min(streams, self.max_streams))}):
            opened = []
            for i in range(n):
                session = self.open(sampler=sampler, seed=i, backpressure="drop_oldest")
                if takes_actions:
                    session.push_actions([0] * 2 * session.sampler.largest_chunk_frames)
                opened.append(session)
            want = 2 * opened[0].sampler.largest_chunk_frames
            while min(int(s.stats()["frames_emitted"]) for s in opened) < want and self.step():
                pass
            for session in opened:
                session.close()

    def run_until_idle(self, max_plans: int | None = None) -> int:
        """Steps until no stream is ready; returns the number of frames emitted."""
        before = self._frames_emitted()
        for _ in itertools.count() if max_plans is None else range(max_plans):
            if self.step() == 0:
                break
        return self._frames_emitted() - before

    def _frames_emitted(self) -> int:
        with self._lock:
            return sum(
                int(self.scheduler.stream_stats(sid)["frames_emitted"]) for sid in self.sessions
            )

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Runs the step loop in a background thread (idempotent)."""
        if self.running:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="crcm-runtime", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                ran = self.step()
            except Exception:
                # step() closed the failed plan's sessions (their .error says why); serve on.
                logger.exception("a plan failed; its sessions were closed")
                continue
            if ran == 0:
                self._wake.wait(timeout=0.01)
                self._wake.clear()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stops the loop and closes every session."""
        self.stop()
        for session in list(self.sessions.values()):
            session.close()

    def stats(self) -> dict[str, int]:
        return dict(self.scheduler.stats())

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generate(
    pipeline: Pipeline,
    num_frames: int,
    *,
    actions: Sequence[int | str] | None = None,
    cond: int | torch.Tensor | None = None,
    sampler: SamplerConfig | str | None = None,
    steps: int | Sequence[int] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    opening_frames: bool = True,
) -> Iterator[np.ndarray]:
    """Offline generation: yields ``num_frames`` frames (``uint8 [H, W, C]``) as they are made.

    World models need one action per frame (``actions``); video models take ``cond``. A
    pipeline with opening frames (``Pipeline.start``, e.g. the first screens of the shipped
    Breakout game) begins on them, as ``crcm play`` does: they are the stream's context and
    are not yielded; the first yielded frame is the first one generated, under ``actions[0]``.
    ``opening_frames=False`` starts from no context instead (a world model trained on game
    frames then draws noise).
    """
    num_frames = _int_arg("num_frames", num_frames, 1, 2**63, "2**63")
    needs_actions = bool(pipeline.model.cfg.num_actions)
    if needs_actions and (actions is None or len(actions) < num_frames):
        raise ConfigError(
            f"a world model needs {num_frames} actions, got "
            f"{0 if actions is None else len(actions)}"
        )
    start = pipeline.start if opening_frames else {}
    opening = len(start["context"]) if start else 0
    runtime = Runtime(
        pipeline,
        max_streams=1,
        device=device,
        cfg=isinstance(sampler, str) and sampler == "teacher",
    )
    with runtime:
        session = runtime.open(
            sampler=sampler,
            steps=steps,
            cond=cond,
            seed=seed,
            max_frames=opening + num_frames,
            **start,
        )
        if needs_actions:
            session.push_actions(list(actions)[:num_frames])
        yield from itertools.islice(session.frames(), opening, opening + num_frames)


def _param_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _int_dtype(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _short(value: object) -> str:
    """A value for a message: its repr, cut short (a tensor's would run to pages)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"{type(value).__name__} of dtype {value.dtype} and shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
