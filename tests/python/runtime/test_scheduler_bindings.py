"""Stateful property test of ``crcm._native.Scheduler`` through the Python binding.

A hypothesis ``RuleBasedStateMachine`` drives the scheduler with random opens (valid and
invalid configs), actions, ticks at an increasing fake clock, completions, failures, closes
(also mid-plan and while queued) and forks, against a small Python model of what the runtime
must do (rust/crcm-core/src/scheduler.rs and pages.rs module docs, design §3). The model
predicts every outcome exactly: the error class of each refused call, which streams a tick
plans and in which order, every per-item value of the plan, the stream phases, and the pages
in use. Pages are modelled at frame granularity: each allocated frame gets a unique key, a
fork copies keys, so ``pages_used = pages_per_frame × distinct keys held``. Streams may have a
first chunk of its own size (``first_chunk_frames``, e.g. 1 then 3s); worked examples of that
follow the state machine.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from crcm import _native
from crcm.errors import (
    ConfigError,
    InvalidStateError,
    PagesExhaustedError,
    StreamExistsError,
    UnknownPlanError,
    UnknownStreamError,
)

TIMES = [1.0, 0.8, 0.55, 0.3]  # strictly decreasing in (0, 1]; enough for 4 steps
DT = st.sampled_from([0.0, 0.01, 0.05, 0.5])  # steps of the fake clock
IDS = st.integers(0, 5)  # few ids, so that collisions and unknown ids both happen


@dataclass
class StreamOpts:
    chunk_frames: int
    steps_per_chunk: list[int]
    times: list[float]
    cache_update: bool
    sink_frames: int
    window_frames: int | None
    max_frames: int | None
    target_fps: float | None
    needs_actions: bool
    admission: str
    first_chunk_frames: int | None = None

    def kwargs(self) -> dict[str, object]:
        return dict(self.__dict__)

    def steps_of(self, chunk: int) -> int:
        return self.steps_per_chunk[min(chunk, len(self.steps_per_chunk) - 1)]

    def frames_of(self, chunk: int) -> int:
        """Frames of chunk ``chunk``: the first one has its own size when given."""
        if chunk == 0 and self.first_chunk_frames is not None:
            return self.first_chunk_frames
        return self.chunk_frames

    def start_of(self, chunk: int) -> int:
        return sum(self.frames_of(k) for k in range(chunk))


# One way each to break a valid config (ConfigError), applied to one config in five.
BREAKS = {
    "chunk_frames": 0,
    "first_chunk_frames": 0,
    "steps_per_chunk": [],
    "times": [0.5, 0.5],
    "target_fps": -1.0,
    "max_frames": 0,
    "admission": "later",
    "window_frames": None,  # with max_frames=None: unbounded memory
}


@st.composite
def stream_opts(draw: st.DrawFn) -> StreamOpts:
    """Mostly valid configs; one in five broken in one way, some too big for the pool."""
    steps = draw(st.sampled_from([[1], [2], [3, 1], [4, 2], [1, 2]]))
    opts = StreamOpts(
        chunk_frames=draw(st.sampled_from([1, 3])),
        steps_per_chunk=steps,
        times=TIMES[: max(steps)],
        cache_update=draw(st.booleans()),
        sink_frames=draw(st.integers(0, 2)),
        window_frames=draw(st.sampled_from([None, 0, 1, 2, 3])),
        max_frames=draw(st.sampled_from([None, 1, 3, 4, 7])),
        target_fps=draw(st.sampled_from([None, 10.0, 30.0])),
        needs_actions=draw(st.booleans()),
        admission=draw(st.sampled_from(["refuse", "queue"])),
        first_chunk_frames=draw(st.sampled_from([None, None, 1, 2, 3])),
    )
    if opts.window_frames is None and opts.max_frames is None:
        opts.max_frames = 4
    if draw(st.integers(0, 4)) == 0:
        name = draw(st.sampled_from(sorted(BREAKS)))
        setattr(opts, name, BREAKS[name])
        if name == "window_frames":
            opts.max_frames = None
    return opts


def config_problem(o: StreamOpts, tokens_per_frame: int, max_batch_tokens: int) -> bool:
    """Whether ``StreamConfig::validate`` must refuse this config (ConfigError)."""
    if o.admission not in ("refuse", "queue") or o.chunk_frames == 0:
        return True
    if o.first_chunk_frames == 0:
        return True
    if max(o.chunk_frames, o.first_chunk_frames or 0) * tokens_per_frame > max_batch_tokens:
        return True
    if not o.steps_per_chunk or 0 in o.steps_per_chunk:
        return True
    if len(o.times) < max(o.steps_per_chunk):
        return True
    t = o.times
    if not all(math.isfinite(x) and 0 < x <= 1 for x in t) or any(
        a <= b for a, b in itertools.pairwise(t)
    ):
        return True
    if o.target_fps is not None and not (math.isfinite(o.target_fps) and o.target_fps > 0):
        return True
    if o.max_frames == 0:
        return True
    return o.window_frames is None and o.max_frames is None


@dataclass
class ModelStream:
    opts: StreamOpts
    arrival: int
    reserved: int
    phase: str  # "queued" | "idle" | "denoise" | "cache_update" | "finished"
    step: int = 0
    chunk: int = 0
    in_flight: int | None = None
    closing: bool = False
    actions: deque[int] = field(default_factory=deque)
    chunk_actions: list[int] = field(default_factory=list)
    ready_since: float | None = None
    frames_emitted: int = 0
    chunks_emitted: int = 0
    last_latency: float | None = None
    latency_sum: float = 0.0
    # Pages, at frame granularity: (frame index, key) pairs; keys are shared after a fork.
    resident: list[tuple[int, int]] = field(default_factory=list)
    pending: list[tuple[int, int]] = field(default_factory=list)
    next_frame: int = 0

    @property
    def frame_start(self) -> int:
        return self.opts.start_of(self.chunk)

    @property
    def frames(self) -> int:
        """Frames of the current (or next) chunk."""
        return self.opts.frames_of(self.chunk)

    def can_start_chunk(self) -> bool:
        n = self.frames
        within = self.opts.max_frames is None or self.frame_start < self.opts.max_frames
        return within and (not self.opts.needs_actions or len(self.actions) >= n)

    def deadline(self) -> float:
        if self.opts.target_fps is None or self.ready_since is None:
            return math.inf
        return self.ready_since + self.frames / self.opts.target_fps

    def commit(self) -> None:
        """Pending frames become resident; the oldest non-sink frames beyond the window go."""
        self.resident += self.pending
        self.pending = []
        window = self.opts.window_frames
        if window is not None:
            sinks = [f for f in self.resident if f[0] < self.opts.sink_frames]
            rest = [f for f in self.resident if f[0] >= self.opts.sink_frames]
            self.resident = (
                sinks + rest[len(rest) - window :] if len(rest) > window else sinks + rest
            )


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.streams: dict[int, ModelStream] = {}
        self.plans: dict[int, list[int]] = {}  # in flight: plan id -> stream ids
        self.done_plans: list[int] = []
        self.reserved_total = 0
        self.now = 0.0
        self.arrivals = itertools.count()
        self.keys = itertools.count()

    @initialize(
        num_pages=st.integers(6, 32),
        page_tokens=st.sampled_from([8, 16, 32]),
        tokens_per_frame=st.sampled_from([8, 24]),
        batch_frames=st.sampled_from([2, 4, 8]),
        max_batch_items=st.sampled_from([1, 2, 256]),
    )
    def setup(self, num_pages, page_tokens, tokens_per_frame, batch_frames, max_batch_items):
        self.num_pages = num_pages
        self.tpf = tokens_per_frame
        self.ppf = -(-tokens_per_frame // page_tokens)
        self.page_lens = [
            min(page_tokens, tokens_per_frame - k * page_tokens) for k in range(self.ppf)
        ]
        self.max_tokens = batch_frames * tokens_per_frame  # 2 frames: c3 chunks are refused
        self.max_items = max_batch_items
        self.sched = _native.Scheduler(
            num_pages=num_pages,
            page_tokens=page_tokens,
            tokens_per_frame=tokens_per_frame,
            max_batch_tokens=self.max_tokens,
            max_batch_items=max_batch_items,
        )

    # ---- model helpers -----------------------------------------------------------------

    def live(self, sid: int) -> ModelStream | None:
        s = self.streams.get(sid)
        return s if s is not None and not s.closing else None

    def reservation(self, o: StreamOpts) -> int:
        """Sinks + window + the larger chunk, or every frame up to the first chunk boundary at
        or past max_frames, whichever is less."""
        largest = max(o.chunk_frames, o.frames_of(0))
        by_window = (
            None
            if o.window_frames is None
            else (o.sink_frames + o.window_frames + largest) * self.ppf
        )
        by_length = None
        if o.max_frames is not None:
            chunks = next(k for k in itertools.count() if o.start_of(k) >= o.max_frames)
            by_length = o.start_of(chunks) * self.ppf
        return min(x for x in (by_window, by_length) if x is not None)

    def release(self, sid: int) -> None:
        s = self.streams.pop(sid)
        if s.phase != "queued":
            self.reserved_total -= s.reserved
        # First come, first served: the queue is admitted in arrival order, up to the first
        # stream that does not fit.
        for q in sorted(
            (q for q in self.streams.values() if q.phase == "queued"), key=lambda q: q.arrival
        ):
            if q.reserved > self.num_pages - self.reserved_total:
                break
            self.reserved_total += q.reserved
            q.phase = "idle"

    def expect_error(self, cls: type[BaseException], fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except cls as e:
            assert str(e), f"{cls.__name__} without a message"
            return
        raise AssertionError(f"{fn.__name__}{args} should raise {cls.__name__}")

    # ---- rules -----------------------------------------------------------------------

    @rule(sid=IDS, opts=stream_opts())
    def open(self, sid: int, opts: StreamOpts) -> None:
        if opts.admission not in ("refuse", "queue"):  # parsed by the binding, before anything
            return self.expect_error(ConfigError, self.sched.open, sid, **opts.kwargs())
        if sid in self.streams:  # closing streams keep their id until their plan ends
            return self.expect_error(StreamExistsError, self.sched.open, sid, **opts.kwargs())
        if config_problem(opts, self.tpf, self.max_tokens):
            return self.expect_error(ConfigError, self.sched.open, sid, **opts.kwargs())
        reserved = self.reservation(opts)
        # First come, first served: nobody is admitted past streams waiting in the queue.
        waiting = any(s.phase == "queued" for s in self.streams.values())
        fits = reserved <= self.num_pages - self.reserved_total and not waiting
        if reserved > self.num_pages or (not fits and opts.admission == "refuse"):
            return self.expect_error(PagesExhaustedError, self.sched.open, sid, **opts.kwargs())
        phase = self.sched.open(sid, **opts.kwargs())
        assert phase == ("idle" if fits else "queued")
        self.streams[sid] = ModelStream(opts, next(self.arrivals), reserved, phase)
        if fits:
            self.reserved_total += reserved

    def pick_id(self, data: st.DataObject) -> int:
        """Mostly an open stream's id (else the rules would mostly hit unknown ids)."""
        known = sorted(self.streams)
        return data.draw(st.sampled_from(known) if known and data.draw(st.integers(0, 4)) else IDS)

    @rule(data=st.data(), actions=st.lists(st.integers(0, 9), min_size=1, max_size=4))
    def push_actions(self, data: st.DataObject, actions: list[int]) -> None:
        sid = self.pick_id(data)
        s = self.live(sid)
        if s is None:
            return self.expect_error(UnknownStreamError, self.sched.push_actions, sid, actions)
        if not s.opts.needs_actions:
            return self.expect_error(ConfigError, self.sched.push_actions, sid, actions)
        if s.phase == "finished":
            return self.expect_error(InvalidStateError, self.sched.push_actions, sid, actions)
        self.sched.push_actions(sid, actions)
        s.actions.extend(actions)

    @rule(dt=DT)
    def tick(self, dt: float) -> None:
        self.do_tick(dt)

    # One argument and a name early in the alphabet: hypothesis tries rules sorted by (number
    # of arguments, name) and favours the first, which should be the one that makes progress.
    @rule(loop=st.tuples(DT, st.integers(1, 6)))
    def advance(self, loop: tuple[float, int]) -> None:
        """What the executor does: tick, run the plan, complete it; streams make progress."""
        dt, rounds = loop
        for _ in range(rounds):
            self.do_tick(dt)
            for pid in sorted(self.plans):
                self.do_complete(pid)

    def do_tick(self, dt: float) -> None:
        self.now += dt
        ready = []
        for sid, s in sorted(self.streams.items()):
            if s.in_flight is not None or s.closing:
                continue
            if s.phase in ("denoise", "cache_update") or (
                s.phase == "idle" and s.can_start_chunk()
            ):
                if s.ready_since is None:
                    s.ready_since = self.now
                ready.append((s.deadline(), s.arrival, sid))
        ready.sort()
        planned, tokens = [], 0
        for _, _, sid in ready:
            if len(planned) >= self.max_items:
                break
            item_tokens = self.streams[sid].frames * self.tpf
            if tokens + item_tokens > self.max_tokens:
                continue  # a smaller chunk of a later stream may still fit
            tokens += item_tokens
            planned.append(sid)

        plan = self.sched.tick(self.now)
        if not planned:
            assert plan is None
            return
        assert plan is not None
        assert list(plan.stream_ids) == planned, "wrong streams or order (deadline, arrival)"
        assert len(set(planned)) == len(planned) <= self.max_items
        assert plan.id not in self.plans and plan.id not in self.done_plans
        # Page tables right after the tick: what each item's context must be.
        tables = {sid: self.sched.page_table(sid) for sid in planned}
        q_cu = plan.q_cu_seqlens
        assert q_cu[0] == 0 and q_cu[-1] == tokens <= self.max_tokens
        for i, sid in enumerate(planned):
            s = self.streams[sid]
            if s.phase == "idle":  # the chunk starts: pages and actions are taken now
                s.phase, s.step = "denoise", 0
                for _ in range(s.frames):
                    s.pending.append((s.next_frame, next(self.keys)))
                    s.next_frame += 1
                n = s.frames
                if s.opts.needs_actions:
                    s.chunk_actions = [s.actions.popleft() for _ in range(n)]
                else:
                    s.chunk_actions = [-1] * n
            self.check_item(plan, i, s, tables[sid])
            s.in_flight = plan.id
        self.plans[plan.id] = planned

    def check_item(self, plan, i: int, s: ModelStream, table) -> None:
        """Every array of item ``i`` against the model and the stream's page table."""
        n_steps = s.opts.steps_of(s.chunk)
        cf = s.frames
        assert plan.chunk_index[i] == s.chunk and plan.num_steps[i] == n_steps
        assert plan.frame_start[i] == s.frame_start and plan.num_frames[i] == cf
        assert plan.q_cu_seqlens[i + 1] - plan.q_cu_seqlens[i] == cf * self.tpf
        if s.phase == "denoise":
            last = s.step + 1 == n_steps
            s_next = 0.0 if last else s.opts.times[s.step + 1]
            expected = (
                0,
                s.step,
                s.opts.times[s.step],
                s_next,
                last,
                last and not s.opts.cache_update,
            )
        else:
            expected = (1, n_steps, 0.0, 0.0, False, True)
        kind, step, t, t_next, emits, writes = expected
        assert plan.kind[i] == kind and plan.step[i] == step
        assert plan.s[i] == np.float32(t) and plan.s_next[i] == np.float32(t_next)
        assert bool(plan.emits_frames[i]) == emits

        frames, pages = table
        kv = slice(plan.kv_indptr[i], plan.kv_indptr[i + 1])
        assert list(frames) == [f for f, _ in s.resident]
        np.testing.assert_array_equal(plan.kv_page_ids[kv], pages.reshape(-1))
        np.testing.assert_array_equal(plan.kv_frames[kv], np.repeat(frames, self.ppf))
        np.testing.assert_array_equal(plan.kv_page_lens[kv], self.page_lens * len(frames))

        w = plan.write_page_ids[plan.write_indptr[i] : plan.write_indptr[i + 1]]
        if writes:
            assert len(w) == cf * self.ppf == len(set(w.tolist()))
            # The chunk writes its own fresh pages: never a page any stream reads as context.
            for sid, other in self.streams.items():
                if other.phase != "queued":
                    assert not set(w.tolist()) & set(self.sched.page_table(sid)[1].ravel().tolist())
        else:
            assert len(w) == 0
        acts = plan.actions[plan.frame_indptr[i] : plan.frame_indptr[i + 1]]
        assert acts.tolist() == s.chunk_actions

    @precondition(lambda self: self.plans)
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        self.do_complete(data.draw(st.sampled_from(sorted(self.plans))))

    @precondition(lambda self: self.plans)
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        self.do_fail(data.draw(st.sampled_from(sorted(self.plans))))

    def do_complete(self, pid: int) -> None:
        self.sched.complete(pid, self.now)
        for sid in self.plans.pop(pid):
            s = self.streams[sid]
            s.in_flight = None
            if s.closing:
                self.release(sid)
                continue
            n_steps = s.opts.steps_of(s.chunk)
            chunk_done = s.phase == "cache_update"
            if s.phase == "denoise" and s.step + 1 < n_steps:
                s.step += 1
            elif s.phase == "denoise":
                s.frames_emitted += s.frames
                s.chunks_emitted += 1
                s.last_latency = self.now - s.ready_since
                s.latency_sum += s.last_latency
                if s.opts.cache_update:
                    s.phase = "cache_update"
                else:
                    chunk_done = True
            if chunk_done:
                s.commit()
                s.chunk += 1
                s.ready_since = None
                s.chunk_actions = []
                done = s.opts.max_frames is not None and s.frame_start >= s.opts.max_frames
                s.phase = "finished" if done else "idle"
        self.done_plans.append(pid)

    def do_fail(self, pid: int) -> None:
        self.sched.fail(pid)
        for sid in self.plans.pop(pid):
            s = self.streams[sid]
            s.in_flight = None
            if s.closing:
                self.release(sid)
            elif s.phase == "denoise" and s.step == 0:
                # Nothing of the chunk ran: its pages and actions come back.
                if s.opts.needs_actions:
                    s.actions.extendleft(reversed(s.chunk_actions))
                s.chunk_actions = []
                s.next_frame -= len(s.pending)
                s.pending = []
                s.phase = "idle"
        self.done_plans.append(pid)

    @precondition(lambda self: self.done_plans)
    @rule(data=st.data())
    def complete_twice(self, data) -> None:
        pid = data.draw(st.sampled_from(self.done_plans))
        self.expect_error(UnknownPlanError, self.sched.complete, pid, self.now)
        self.expect_error(UnknownPlanError, self.sched.fail, pid)

    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        sid = self.pick_id(data)
        s = self.live(sid)
        if s is None:
            return self.expect_error(UnknownStreamError, self.sched.close, sid)
        self.sched.close(sid)
        if s.in_flight is not None:
            s.closing = True  # its pages stay until the forward that writes them has ended
        else:
            self.release(sid)

    @rule(data=st.data(), dst=IDS)
    def fork(self, data: st.DataObject, dst: int) -> None:
        src = self.pick_id(data)
        if dst in self.streams:
            return self.expect_error(StreamExistsError, self.sched.fork, src, dst)
        p = self.live(src)
        if p is None:
            return self.expect_error(UnknownStreamError, self.sched.fork, src, dst)
        if p.phase != "idle":
            return self.expect_error(InvalidStateError, self.sched.fork, src, dst)
        if p.reserved > self.num_pages - self.reserved_total:
            return self.expect_error(PagesExhaustedError, self.sched.fork, src, dst)
        self.sched.fork(src, dst)
        self.reserved_total += p.reserved
        self.streams[dst] = ModelStream(
            p.opts,
            next(self.arrivals),
            p.reserved,
            "idle",
            chunk=p.chunk,
            actions=deque(p.actions),
            frames_emitted=p.frame_start,
            chunks_emitted=p.chunk,
            last_latency=p.last_latency,  # a fork inherits the parent's chunks and latencies
            latency_sum=p.latency_sum,
            resident=list(p.resident),
            next_frame=p.next_frame,
        )

    # ---- invariants ------------------------------------------------------------------

    @invariant()
    def runtime_matches_model(self) -> None:
        if not hasattr(self, "sched"):
            return
        self.sched.check_invariants()
        stats = self.sched.stats()
        keys = {k for s in self.streams.values() for _, k in s.resident + s.pending}
        assert stats == {
            "streams": len(self.streams),
            "queued": sum(s.phase == "queued" for s in self.streams.values()),
            "plans_in_flight": len(self.plans),
            "pages_free": self.num_pages - len(keys) * self.ppf,
            "pages_used": len(keys) * self.ppf,
            "pages_reserved": self.reserved_total,
            "pages_capacity": self.num_pages,
        }
        assert stats["pages_used"] <= stats["pages_reserved"] <= self.num_pages
        assert self.sched.stream_ids() == sorted(
            i for i, s in self.streams.items() if not s.closing
        )
        for sid, s in self.streams.items():
            if s.closing:
                continue
            st_ = self.sched.stream_stats(sid)
            assert st_["phase"] == s.phase == self.sched.phase(sid)
            assert st_["chunk"] == s.chunk and st_["frames_emitted"] == s.frames_emitted
            assert st_["pending_actions"] == len(s.actions)
            assert st_["in_flight"] == (s.in_flight is not None)
            assert st_["last_latency_s"] == s.last_latency
            if s.last_latency is not None:
                assert st_["mean_latency_s"] == s.latency_sum / s.chunks_emitted
            if s.phase != "queued":
                assert st_["pages_reserved"] == s.reserved
                assert st_["pages_held"] == (len(s.resident) + len(s.pending)) * self.ppf
                frames, pages = self.sched.page_table(sid)
                assert frames.tolist() == [f for f, _ in s.resident]
                assert pages.shape == (len(s.resident), self.ppf)
                assert ((pages >= 0) & (pages < self.num_pages)).all()

    def teardown(self) -> None:
        """Closing everything and ending the plans in flight returns every page."""
        if not hasattr(self, "sched"):
            return
        for sid in list(self.sched.stream_ids()):
            self.sched.close(sid)
        for pid in list(self.plans):
            self.sched.complete(pid, self.now)
        self.sched.check_invariants()
        stats = self.sched.stats()
        assert stats["streams"] == stats["plans_in_flight"] == 0
        assert stats["pages_used"] == stats["pages_reserved"] == 0
        assert stats["pages_free"] == self.num_pages


SchedulerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestScheduler = SchedulerMachine.TestCase


# ---- a first chunk of its own size: worked examples ------------------------------------------


def run_stream(sched: _native.Scheduler, sid: int) -> list[tuple[int, int, int]]:
    """Ticks and completes until nothing is ready; (chunk, frame_start, num_frames) of every
    chunk's first denoising step."""
    chunks = []
    while (plan := sched.tick(0.0)) is not None:
        if plan.kind[0] == 0 and plan.step[0] == 0:
            chunks.append(
                (int(plan.chunk_index[0]), int(plan.frame_start[0]), int(plan.num_frames[0]))
            )
        assert plan.q_cu_seqlens[-1] == plan.num_frames[0] * sched.tokens_per_frame
        sched.check_invariants()
        sched.complete(plan.id, 0.0)
    return chunks


def test_an_independent_first_frame_then_chunks_of_three():
    sched = _native.Scheduler(
        num_pages=32, page_tokens=16, tokens_per_frame=16, max_batch_tokens=16 * 3
    )
    phase = sched.open(
        7, chunk_frames=3, first_chunk_frames=1, steps_per_chunk=[2], times=[1.0, 0.5],
        max_frames=10,
    )  # fmt: skip
    assert phase == "idle"
    assert sched.stats()["pages_reserved"] == 10  # 1 + 3 + 3 + 3 frames, one page each
    assert run_stream(sched, 7) == [(0, 0, 1), (1, 1, 3), (2, 4, 3), (3, 7, 3)]
    stats = sched.stream_stats(7)
    assert (stats["phase"], stats["chunk"], stats["frames_emitted"]) == ("finished", 4, 10)
    assert sched.page_table(7)[0].tolist() == list(range(10))
    sched.close(7)
    stats = sched.stats()
    assert stats["pages_free"] == 32 and stats["pages_used"] == stats["pages_reserved"] == 0
    sched.check_invariants()


def test_first_chunk_frames_none_is_uniform_chunks():
    sched = _native.Scheduler(
        num_pages=32, page_tokens=16, tokens_per_frame=16, max_batch_tokens=16 * 3
    )
    sched.open(1, chunk_frames=3, first_chunk_frames=None, steps_per_chunk=[1], times=[1.0],
               max_frames=6)  # fmt: skip
    assert run_stream(sched, 1) == [(0, 0, 3), (1, 3, 3)]


def test_a_window_reserves_the_larger_first_chunk():
    sched = _native.Scheduler(num_pages=6, page_tokens=16, tokens_per_frame=16, max_batch_tokens=64)
    # sink 1 + window 2 + the 3-frame first chunk, though later chunks have 1 frame.
    sched.open(1, chunk_frames=1, first_chunk_frames=3, steps_per_chunk=[1], times=[1.0],
               sink_frames=1, window_frames=2)  # fmt: skip
    assert sched.stats()["pages_reserved"] == 6
    for _ in range(10):
        plan = sched.tick(0.0)
        sched.complete(plan.id, 0.0)
        sched.check_invariants()
    sched.close(1)
    assert sched.stats()["pages_free"] == 6


def test_first_chunk_frames_is_checked_like_chunk_frames():
    sched = _native.Scheduler(
        num_pages=32, page_tokens=16, tokens_per_frame=16, max_batch_tokens=64
    )
    base = dict(chunk_frames=3, steps_per_chunk=[1], times=[1.0], max_frames=4)
    for value, error in [
        (-1, OverflowError),
        (2**32, OverflowError),
        ("1", TypeError),
        (1.0, TypeError),
        (True, TypeError),
        (0, ConfigError),
        (5, ConfigError),  # 5 frames × 16 tokens are over max_batch_tokens
    ]:
        try:
            sched.open(1, first_chunk_frames=value, **base)
        except error as e:
            assert "first_chunk_frames" in str(e), str(e)
        else:
            raise AssertionError(f"first_chunk_frames={value!r} should raise {error.__name__}")
    assert sched.stream_ids() == [] and sched.stats()["pages_reserved"] == 0
    sched.open(1, first_chunk_frames=np.uint8(1), **base)  # NumPy integers are integers
    assert run_stream(sched, 1)[:2] == [(0, 0, 1), (1, 1, 3)]
