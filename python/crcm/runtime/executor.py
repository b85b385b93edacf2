"""The executor: turns a scheduler plan into one batched DiT forward over the paged KV cache.

For every item of a plan (one stream's chunk at one denoising step, or its time-0 cache-update
pass) the executor builds the chunk's input, runs the model once for all items of the same
chunk size, and
- attends each item's queries to its context pages plus its own chunk (a paged attention
  backend of ``crcm.runtime.attention``: the Triton kernel on CUDA, gather + SDPA elsewhere);
- writes the item's K/V into its write pages when the plan says so (the cache-update pass, or
  the last denoising step with noisy context);
- applies the sampler's update (consistency re-noising or an Euler step with CFG) and, at a
  chunk's last step, decodes its frames and hands them to the stream's sink.

Context prefill: a stream opened with ground-truth frames (``StreamState.context``) takes them
as its first chunks instead of sampling them: every row of such a chunk is the given frame at
``s = 0``, so the K/V its write pass stores is exactly the cache-update pass over those frames
(in either cache mode), and the frames go to the sink like generated ones.

Models conditioned on their previous frames (``prev_frames > 0``) get the stream's last finished
frames (``StreamState.history``) with every row of a chunk.

Streams sampled with classifier-free guidance run a second, unconditional row that reads and
writes plane 1 of the cache (same page ids), so both branches keep their own context. The
unconditional row takes the stream's negative condition (a text model's negative prompt), else
drops the per-video condition, or — for models without one, such as world models conditioned on
actions only — the actions (the convention of the training objectives).

Condition K/V: a text model's cross-attention K/V depend on the condition only, not on the
frames, so each stream computes its condition's (and its unconditional row's) once, at its first
forward, and keeps them (``StreamState.cond_kv``/``uncond_kv``); a batched forward concatenates
its rows'. At Wan2.1-1.3B in bf16 that is 30 layers × 512 tokens × 1536 × (K, V) × 2 bytes ≈ 90
MiB per stream (twice that for a guided one), kept for the stream's lifetime.

Decoding: the chunks that finish in the same forward are decoded together; a
:class:`~crcm.codec.StreamingCodec` (a causal video VAE) continues each stream from its own
decoder state, so no past frame is decoded twice.

Condition switching (a new prompt mid-stream, LongLive's KV re-cache): a stream's new condition
takes effect at its next chunk. Before that chunk, the K/V of every frame still in its cache are
recomputed under the new condition from the very inputs that wrote them (kept per written chunk:
the clean chunk at s = 0, or the noisy one with noisy context), in their original chunks and
order, so the cache equals one built from scratch with the new condition over the same frames.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from crcm import _native
from crcm.codec import Codec, StreamingCodec, video_frame_span
from crcm.models import CausalDiT
from crcm.models.dit import CrossKV
from crcm.runtime.attention import RowPages, select_backend
from crcm.runtime.kv_cache import PagedKVCache
from crcm.sampling import SamplerConfig, consistency_step, euler_step, hold_still_pixels

DENOISE, CACHE_UPDATE = 0, 1

FrameSink = Callable[[np.ndarray, int], None]
"""Receives a chunk's decoded frames ``uint8 [T, H, W, C]`` and the index of the first one."""
PageTable = Callable[[int], tuple[np.ndarray, np.ndarray]]
"""A stream's resident frames and their pages (``Scheduler.page_table``)."""


@dataclass
class WrittenChunk:
    """The inputs of a forward that wrote one chunk's K/V: what a re-cache runs again."""

    frame_start: int
    x: torch.Tensor  # [T, C, H, W], the chunk as the network saw it
    s: float  # its time (0 for the clean cache-update pass)
    actions: torch.Tensor | None  # [T]
    prev: torch.Tensor | None  # [T, k·C, H, W]


@dataclass
class Row:
    """One batch row of a forward: a chunk's input, where it attends and what it writes."""

    x: torch.Tensor  # [T, C, H, W] in model space
    s: float  # the network's time (0 for a clean chunk)
    frame_start: int
    actions: torch.Tensor | None  # [T] action ids (null where none)
    prev: torch.Tensor | None  # [T, k·C, H, W] (prev_frames)
    context: RowPages  # the pages it attends to, and its cache plane
    write_pages: np.ndarray  # int32 pages its K/V go to (empty: it writes none)
    cond: torch.Tensor | None = None  # its condition row (class or uncached text models)
    cross_kv: CrossKV | None = None  # its condition's K/V (text models)


@dataclass
class StreamState:
    """What the executor keeps per stream between plans (the page pool keeps its K/V)."""

    sampler: SamplerConfig
    cond: torch.Tensor | None  # this stream's condition row (batch dim 1), or None
    generator: torch.Generator
    sink: FrameSink
    x: torch.Tensor | None = None  # the chunk being denoised, [T, C, H, W] in model space
    x0: torch.Tensor | None = None  # the chunk's denoised frames, for the cache-update pass
    # Ground-truth frames the stream starts from, [K, C, H, W] in model space; `context_used`
    # of them have been taken so far.
    context: torch.Tensor | None = None
    context_used: int = 0
    history: torch.Tensor | None = None  # the last finished frames, [k, C, H, W] (prev_frames)
    prev: torch.Tensor | None = None  # the current chunk's previous frames, [T, k·C, H, W]
    forced: bool = False  # whether the current chunk is taken from `context`
    decoder: object | None = None  # a StreamingCodec's state for this stream
    uncond: torch.Tensor | None = None  # the unconditional rows' condition (negative prompt)
    pending_cond: torch.Tensor | None = None  # a new condition, from the next chunk on
    # The chunks whose K/V are in the cache, kept for a condition switch (text models only).
    written: list[WrittenChunk] = field(default_factory=list)
    # The cross-attention K/V of `cond` and of the unconditional rows (text models only), each
    # with the condition it was computed from (`cond`, or `uncond`: None = the null condition):
    # made at the stream's first forward, remade when that condition changes. ≈ 90 MiB each at
    # Wan2.1-1.3B in bf16 (see the module docstring). Read-only: a fork shares its parent's.
    cond_kv: tuple[torch.Tensor | None, CrossKV] | None = None
    uncond_kv: tuple[torch.Tensor | None, CrossKV] | None = None
    guided: bool = field(init=False)

    def __post_init__(self) -> None:
        self.guided = self.sampler.kind == "euler" and self.sampler.cfg_scale != 1.0


class Executor:
    """Runs plans of a :class:`crcm._native.Scheduler` with a :class:`CausalDiT`."""

    def __init__(
        self,
        model: CausalDiT,
        codec: Codec,
        cache: PagedKVCache,
        latent_chw: tuple[int, int, int],
        attention_backend: str = "auto",
        page_table: PageTable | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.codec = codec
        self.cache = cache
        self.page_table = page_table
        self.latent_chw = latent_chw
        self.attention = select_backend(attention_backend, cache)
        self._plan_attention = PlanAttention(cache, self.attention)
        # The batched forward: the model itself, or its compiled forward (compile_forward).
        self._forward = compile_forward(model) if compile else model
        self.streams: dict[int, StreamState] = {}
        self._device = cache.k.device
        # Reuse each stream's condition K/V across forwards (text models); False recomputes
        # them at every forward from the condition tokens (the model's plain path).
        self.cache_cross_kv = model.cfg.cond == "text"
        # Whether a stream's next chunk can start at once (the runtime's answer): its cache
        # update is then fused into that chunk's forward (see _hold). None: never fused.
        self.next_chunk_ready: Callable[[int], bool] | None = None
        self._deferred: dict[int, Row] = {}  # held-back cache-update rows, by stream

    @property
    def compiled(self) -> bool:
        """Whether the batched forwards run compiled."""
        return self._forward is not self.model

    def use_eager(self) -> None:
        """Runs the forwards uncompiled from now on (a failed compilation's way out)."""
        self._forward = self.model

    def add_stream(self, stream_id: int, state: StreamState) -> None:
        if state.guided and self.cache.planes < 2:
            raise ValueError("this runtime has no unconditional KV plane; create it with cfg=True")
        self.streams[stream_id] = state

    def remove_stream(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self._deferred.pop(stream_id, None)  # its pages go back: nothing reads them again

    @torch.inference_mode()
    def run(self, plan: _native.Plan) -> None:
        """Runs every item of ``plan`` (one forward per distinct chunk size); cache updates
        whose stream can go on at once are held back for its next forward (:meth:`_hold`)."""
        held = self._hold(plan)
        num_frames = plan.num_frames
        for T in np.unique(num_frames[~held]):
            self._run_group(plan, np.flatnonzero((num_frames == T) & ~held), int(T))

    @torch.inference_mode()
    def flush(self, stream_id: int) -> None:
        """Runs the stream's held-back cache update now, if it has one (before a fork shares
        its pages)."""
        if (held := self._deferred.pop(stream_id, None)) is not None:
            self._run_held(held)

    def _run_held(self, held: Row) -> None:
        self._settle(held.write_pages.tolist())
        self._forward_rows([held], pixel_head=False)

    def _settle(self, pages: list[int]) -> None:
        """Runs first every held update that reads or writes one of ``pages``, about to be
        written: a page its stream let go of (the window moved on) that another stream now
        holds. Each runs after the held updates its own writes would disturb; there is no
        cycle, since a page changes hands only after the stream that let it go committed."""
        pages = set(pages)
        for sid in list(self._deferred):
            held = self._deferred.get(sid)
            if held is None:
                continue
            touched = held.context.page_ids.tolist() + held.write_pages.tolist()
            if not pages.isdisjoint(touched):
                self.flush(sid)

    def _hold(self, plan: _native.Plan) -> np.ndarray:
        """The fused cache update: the plan's cache-update items of streams whose next chunk
        can start now (:attr:`next_chunk_ready`) become rows of that chunk's first forward
        instead of forwards of their own. Per layer a forward writes every row's K/V before
        any row attends, so the next chunk reads exactly what a separate pass would have
        written, and a stream at one step runs one forward per chunk instead of two. A stream
        that waits (for a key press) runs its update at once, while it waits. Text models
        (condition switches re-cache from the written chunks), guided streams and plans of
        several items are not fused. Returns which items were held."""
        held = np.zeros(len(plan), dtype=bool)
        # Only a plan of one item: with several streams the plans are batched already, and a
        # held row would only add its pixel head to the next forward (8 Breakout streams:
        # 89.7 frames/s fused, 95.3 unfused).
        if self.next_chunk_ready is None or self.model.cfg.cond == "text" or len(plan) != 1:
            return held
        for i in np.flatnonzero(plan.kind == CACHE_UPDATE):
            sid = int(plan.stream_ids[i])
            st = self.streams[sid]
            if st.guided or not self.next_chunk_ready(sid):
                continue
            T = int(plan.num_frames[i])
            row = self._plan_row(plan, int(i), 0, st.x0, 0.0, st.prev, T)
            row.cond = st.cond
            self._deferred[sid] = row
            held[i] = True
        return held

    def _run_group(self, plan: _native.Plan, items: np.ndarray, T: int) -> None:
        states = [self.streams[int(sid)] for sid in plan.stream_ids[items]]
        kinds = plan.kind[items]
        s_item = np.where(kinds == CACHE_UPDATE, 0.0, plan.s[items]).astype(np.float32)
        # The time the network is given: the sampler's model time where it has its own (the
        # release's unwarped steps), else the update rule's s.
        for j, st in enumerate(states):
            if kinds[j] == DENOISE and st.sampler.model_times is not None:
                s_item[j] = st.sampler.model_time_of(int(plan.step[items[j]]))

        rows: list[Row] = []
        row_of: dict[int, int] = {}  # item j -> its (conditional) row
        for j, st in enumerate(states):
            i = int(items[j])
            if kinds[j] == DENOISE and plan.step[i] == 0:
                if st.pending_cond is not None:
                    self._switch_cond(int(plan.stream_ids[i]), st)
                self._start_chunk(st, T)
            writes = plan.write_indptr[i + 1] > plan.write_indptr[i]
            if st.forced and kinds[j] == DENOISE and not writes:
                continue  # a context frame whose K/V its cache update writes: nothing to run
            if st.forced:  # a context frame: the clean frame at s = 0, every pass
                s_item[j] = 0.0
            x = st.x if kinds[j] == DENOISE and not st.forced else st.x0
            row_of[j] = len(rows)
            rows.append(self._plan_row(plan, i, 0, x, float(s_item[j]), st.prev, T))
        # Guided streams get a second, unconditional row reading/writing cache plane 1.
        guided = [j for j in row_of if states[j].guided]
        uncond_of = {j: len(rows) + k for k, j in enumerate(guided)}
        for j in guided:
            r = rows[row_of[j]]
            rows.append(self._plan_row(plan, int(items[j]), 1, r.x, r.s, r.prev, T))
        if self.model.cfg.num_actions and self.model.cfg.cond == "none":
            # Without a per-video condition the actions are the condition: the unconditional
            # rows see the null action.
            for j in guided:
                rows[uncond_of[j]].actions = torch.full_like(
                    rows[uncond_of[j]].actions, self.model.null_action
                )
        self._set_conds(states, rows, row_of, uncond_of)
        self._remember_writes(plan, items, states, rows, row_of)

        # Held-back cache updates of these streams join this forward. Any held update that
        # this forward would disturb runs first, and so does a joining one that would read a
        # page another row of this forward writes.
        joining = [
            held
            for sid in {int(sid) for sid in plan.stream_ids[items]}
            if (held := self._deferred.pop(sid, None)) is not None
        ]
        written = [int(p) for r in rows + joining for p in r.write_pages]
        self._settle(written)
        clear = []
        for held in joining:
            others = set(written).difference(held.write_pages.tolist())
            if held.x.shape[0] == T and others.isdisjoint(held.context.page_ids.tolist()):
                clear.append(held)
            else:
                self._run_held(held)

        # Only denoising rows' outputs are read: a forward of cache updates and context frames
        # alone skips the model's pixel head. A forward with a row that is read runs it on
        # every row, held updates too: a head over some of the rows would compile a graph per
        # case of how many (1, ≥ 2, and 0, 1, ≥ 2 after them), and a case that warm_up missed
        # would compile for seconds in the middle of a stream.
        read = any(kinds[j] == DENOISE and not states[j].forced for j in row_of)
        v_R = None
        if rows or clear:
            v_R = self._forward_rows(rows + clear, pixel_head=read)

        finished: list[tuple[StreamState, torch.Tensor, int]] = []
        for j, st in enumerate(states):
            if kinds[j] != DENOISE:
                continue
            i = items[j]
            s, s_next = float(plan.s[i]), float(plan.s_next[i])
            if st.forced:
                x0 = st.x0
            else:
                v = v_R[row_of[j]]
                if st.guided:
                    v_uncond = v_R[uncond_of[j]]
                    v = v_uncond + st.sampler.cfg_scale * (v - v_uncond)
                if st.sampler.kind == "euler":
                    x0, st.x = euler_step(st.x, v, s, s_next)
                else:
                    noise = self._noise(st, T) if s_next > 0 else torch.zeros_like(st.x)
                    x0, st.x = consistency_step(st.x, v, s, s_next, noise)
            if plan.emits_frames[i]:
                st.x0 = x0 = self._finish_chunk(st, x0)
                finished.append((st, x0, int(plan.frame_start[i])))
        if finished:
            self._emit(finished)

    def _plan_row(
        self,
        plan: _native.Plan,
        i: int,
        plane: int,
        x: torch.Tensor,
        s: float,
        prev: torch.Tensor | None,
        T: int,
    ) -> Row:
        """Item ``i``'s row on cache ``plane``: its input, context pages and write pages."""
        actions = None
        if self.model.cfg.num_actions:
            a = plan.actions[plan.frame_indptr[i] : plan.frame_indptr[i] + T]
            a = np.where(a < 0, self.model.null_action, a)
            actions = torch.from_numpy(a).to(self._device)
        a, b = plan.kv_indptr[i], plan.kv_indptr[i + 1]
        return Row(
            x=x,
            s=s,
            frame_start=int(plan.frame_start[i]),
            actions=actions,
            prev=prev if self.model.cfg.prev_frames else None,
            context=RowPages(plan.kv_page_ids[a:b], plan.kv_page_lens[a:b], plane),
            write_pages=plan.write_page_ids[plan.write_indptr[i] : plan.write_indptr[i + 1]],
        )

    def _forward_rows(self, rows: list[Row], pixel_head: bool) -> torch.Tensor:
        """One batched forward over ``rows`` (all of one chunk size): writes their K/V where
        due and returns the velocity of every row (with the model's pixel head or not)."""
        dev = self._device
        T = rows[0].x.shape[0]
        x_R = torch.stack([r.x for r in rows])
        s_R_T = torch.tensor([r.s for r in rows], dtype=torch.float32, device=dev)
        s_R_T = s_R_T[:, None].expand(-1, T)
        frame_start = torch.tensor([r.frame_start for r in rows], device=dev)
        pos_R_T = frame_start[:, None] + torch.arange(T, device=dev)
        actions_R_T = None
        if self.model.cfg.num_actions:
            actions_R_T = torch.stack([r.actions for r in rows])
        prev_R = None
        if self.model.cfg.prev_frames:
            prev_R = torch.stack([r.prev for r in rows])
        cond_R = kv_R = None
        if self.cache_cross_kv:
            kv_R = CrossKV.cat([r.cross_kv for r in rows])
        elif self.model.cfg.cond != "none":
            cond_R = torch.cat([r.cond for r in rows])
        attn_fn = self._attention(rows, T)
        # The inputs are valid by construction (the scheduler's times and positions, actions
        # checked when pushed): no value checks, so no device→host sync inside the forward.
        return self._forward(
            x_R,
            s_R_T,
            frame_pos_B_T=pos_R_T,
            cond=cond_R,
            actions_B_T=actions_R_T,
            attention=attn_fn,
            prev_B_T_C_H_W=prev_R,
            cross_kv=kv_R,
            check_values=False,
            pixel_head=pixel_head,
        )

    def _emit(self, finished: list[tuple[StreamState, torch.Tensor, int]]) -> None:
        """Decodes the finished chunks in one call and hands each stream its frames."""
        chunks = [x0 for _, x0, _ in finished]
        if isinstance(self.codec, StreamingCodec):
            frames = self.codec.decode_streams(chunks, [st.decoder for st, _, _ in finished])
        else:
            frames = list(self.codec.decode(torch.stack(chunks)))
        for (st, x0, first), f in zip(finished, frames, strict=True):
            start, _ = video_frame_span(self.codec, first, x0.shape[0])
            st.sink(f.cpu().numpy(), start)

    def _start_chunk(self, st: StreamState, T: int) -> None:
        """A new chunk: pure noise, or the next context frames; its previous frames."""
        st.x = self._noise(st, T)  # drawn for context chunks too: a seed's noise stays aligned
        st.forced = st.context is not None and st.context_used < st.context.shape[0]
        if st.forced:
            st.x0 = st.context[st.context_used : st.context_used + T]
            st.context_used += T
        if self.model.cfg.prev_frames:
            history = None if st.history is None else st.history[None]
            st.prev = self.model.next_frame_previous(history, st.x[None])[0]

    def _finish_chunk(self, st: StreamState, x0: torch.Tensor) -> torch.Tensor:
        """Records a finished chunk in the stream's history; returns its frames as emitted
        (generated pixels that barely changed held at the frame before, when the sampler
        has a still threshold)."""
        if not st.forced and st.history is not None:
            x0 = hold_still_pixels(x0, st.history[-1], st.sampler.still_threshold)
        k = self.model.cfg.prev_frames
        if k:
            frames = x0 if st.history is None else torch.cat([st.history, x0])
            st.history = frames[-k:]
        if st.forced and st.context_used >= st.context.shape[0]:
            st.context = None  # the prefill is done; free it
        return x0

    def _remember_writes(
        self,
        plan: _native.Plan,
        items: np.ndarray,
        states: list[StreamState],
        rows: list[Row],
        row_of: dict[int, int],
    ) -> None:
        """Keeps the inputs of each conditional row that writes K/V (text models only)."""
        if self.model.cfg.cond != "text":
            return
        for j, r in row_of.items():
            st, row = states[j], rows[r]
            if not len(row.write_pages):
                continue
            frame = int(plan.frame_start[items[j]])
            # Only chunks that can still be in the cache are kept: the sink and the window.
            sampler = st.sampler
            oldest = None if sampler.window_frames is None else frame - sampler.window_frames
            st.written = [
                w
                for w in st.written
                if w.frame_start != frame
                and (
                    oldest is None
                    or w.frame_start < sampler.sink_frames
                    or w.frame_start + w.x.shape[0] > oldest
                )
            ]
            st.written.append(
                WrittenChunk(
                    frame,
                    row.x.clone(),
                    row.s,
                    None if row.actions is None else row.actions.clone(),
                    None if row.prev is None else row.prev.clone(),
                )
            )

    def _switch_cond(self, stream_id: int, st: StreamState) -> None:
        """Recomputes the stream's cached K/V under its new condition, then switches to it."""
        cond, st.pending_cond = st.pending_cond, None
        frames, pages = self.page_table(stream_id)
        resident = {int(f): k for k, f in enumerate(frames)}
        st.written = [w for w in st.written if w.frame_start in resident]
        st.written.sort(key=lambda w: w.frame_start)
        ppf = self.cache.pages_per_frame
        page_lens = np.array(
            [
                min(
                    self.cache.page_tokens, self.cache.tokens_per_frame - k * self.cache.page_tokens
                )
                for k in range(ppf)
            ],
            dtype=np.int32,
        )
        dev = self._device
        kv = None
        if self.cache_cross_kv:
            kv = self.model.cross_kv(cond)
            st.cond_kv = (cond, kv)
        for w in st.written:
            T = w.x.shape[0]
            rows = [resident.get(w.frame_start + t) for t in range(T)]
            keep = [t for t, r in enumerate(rows) if r is not None]
            own = np.asarray([rows[t] for t in keep])
            before = np.asarray([k for f, k in resident.items() if f < w.frame_start], dtype=int)
            before = before[np.argsort(frames[before])] if len(before) else before
            ctx = RowPages(
                pages[before].reshape(-1).astype(np.int32),
                np.tile(page_lens, len(before)),
                0,
            )
            slots = self.cache.token_slots(torch.from_numpy(pages[own]).to(dev))
            x = w.x[keep][None]
            n = len(keep)
            backend_ctx = self.attention.prepare([ctx], n * self.cache.tokens_per_frame)

            def attn_fn(layer, q, k, v, slots=slots, backend_ctx=backend_ctx):
                self.cache.write(0, layer, slots, k[0], v[0])
                return self.attention.attend(layer, q, k, v, backend_ctx)

            pos = torch.tensor([[w.frame_start + t for t in keep]], device=dev)
            self.model(
                x,
                torch.full((1, n), w.s, device=dev),
                frame_pos_B_T=pos,
                cond=None if kv is not None else cond,
                actions_B_T=None if w.actions is None else w.actions[keep][None],
                attention=attn_fn,
                prev_B_T_C_H_W=None if w.prev is None else w.prev[keep][None],
                cross_kv=kv,
            )
        st.cond = cond

    def _noise(self, st: StreamState, T: int) -> torch.Tensor:
        # Drawn on the stream's own generator (CPU, so results do not depend on the device):
        # a stream's video is the same whether it runs alone or batched with others.
        noise = torch.randn((T, *self.latent_chw), generator=st.generator)
        return noise.to(self._device, self.cache.k.dtype)

    def _set_conds(
        self,
        states: list[StreamState],
        rows: list[Row],
        row_of: dict[int, int],
        uncond_of: dict[int, int],
    ) -> None:
        """Each row's condition: the stream's own for its conditional row; for the
        unconditional row of a guided stream, the stream's negative condition where it has
        one, else the model's null condition. Text models take the condition's cross-attention
        K/V, each stream's cached ones (made here at its first forward)."""
        if self.model.cfg.cond == "none":
            return
        for j, r in row_of.items():
            st = states[j]
            if self.cache_cross_kv:
                if st.cond_kv is None or st.cond_kv[0] is not st.cond:
                    st.cond_kv = (st.cond, self.model.cross_kv(st.cond))
                rows[r].cross_kv = st.cond_kv[1]
            else:
                rows[r].cond = st.cond
        for j, r in uncond_of.items():
            st = states[j]
            cond = st.uncond
            if cond is None and st.cond is not None:  # the null condition
                drop = torch.ones(1, dtype=torch.bool, device=st.cond.device)
                cond = self.model.drop_cond(st.cond, drop)
            if self.cache_cross_kv:
                if st.uncond_kv is None or st.uncond_kv[0] is not st.uncond:
                    st.uncond_kv = (st.uncond, self.model.cross_kv(cond))
                rows[r].cross_kv = st.uncond_kv[1]
            else:
                rows[r].cond = cond

    def _attention(self, rows: list[Row], T: int) -> PlanAttention:
        """The model's ``attn_fn`` for these rows: write K/V where due, attend over pages."""
        dev = self._device
        cache = self.cache
        ppf = cache.pages_per_frame
        # Writes: (plane, row, flat slots) for rows that store their K/V this pass.
        writes: list[tuple[int, int, torch.Tensor]] = []
        for r, row in enumerate(rows):
            if len(row.write_pages):
                pages = torch.from_numpy(row.write_pages).to(dev).view(T, ppf)
                writes.append((row.context.plane, r, cache.token_slots(pages)))
        contexts = [row.context for row in rows]
        self._plan_attention.point_at(
            writes, self.attention.prepare(contexts, T * cache.tokens_per_frame)
        )
        return self._plan_attention


class PlanAttention:
    """The ``attn_fn`` the executor hands the model: per layer, it writes the K/V of the rows
    whose item stores them, then attends each row over its pages (the attention backend).

    One object for the executor's lifetime, pointed at each forward's rows (:meth:`point_at`).
    Under a compiled forward it is one opaque operator (``crcm::plan_attention``), so the
    whole forward is one graph — no graph break per layer, no recompilation per layer — while
    the page gathers and cache writes, whose shapes change from plan to plan with the context
    length, run eagerly inside it. (Like vLLM's attention operator, it writes the KV cache
    that it does not declare: nothing else in the graph reads the cache, so no reordering
    can observe it.)
    """

    def __init__(self, cache: PagedKVCache, backend) -> None:
        self.cache = cache
        self.backend = backend
        self._writes: list[tuple[int, int, torch.Tensor]] = []
        self._ctx: object = None

    def point_at(self, writes: list[tuple[int, int, torch.Tensor]], ctx: object) -> None:
        """``writes``: (plane, row, flat token slots) per writing row; ``ctx``: the backend's
        prepared page tables of the rows. Also makes this the thread's current one, which the
        compiled operator calls: a runtime runs its forwards on one thread at a time, and the
        graph, shared by every runtime of the model, names no runtime."""
        self._writes, self._ctx = writes, ctx
        _current.attention = self

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.crcm.plan_attention(q, k, v, layer)
        return self.attend(layer, q, k, v)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        for p, r, slots in self._writes:
            self.cache.write(p, layer, slots, k[r], v[r])
        return self.backend.attend(layer, q, k, v, self._ctx)


_current = threading.local()  # .attention: the PlanAttention of this thread's forward


@torch.library.custom_op("crcm::plan_attention", mutates_args=())
def _plan_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int
) -> torch.Tensor:
    return _current.attention.attend(layer, q, k, v)


@_plan_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(q)


def compile_forward(model: CausalDiT) -> Callable[..., torch.Tensor]:
    """``model``'s forward under ``torch.compile`` (Inductor), for the executor's batched forwards.

    Everything but the paged attention (one opaque operator, :class:`PlanAttention`) is
    compiled — patch and time embeddings, norms, modulation, RoPE, the projections and the FFN
    — into one graph, which fuses the small elementwise work around each matmul. The weights
    are frozen into the compiled code (Inductor ``freezing``: constant-folded and, on CPU,
    pre-packed for oneDNN), so the model must not change after the runtime is made. The first
    forward of each batch shape compiles (seconds, cached on disk by Inductor for later
    processes); the batch size becomes a dynamic dimension at its second distinct value, so
    more streams do not compile again (:meth:`Runtime.warm_up` does both before serving).
    One compiled forward per model, shared by every runtime of it: a second
    ``torch.compile`` of the same model would compile everything again.
    """
    compiled = model.__dict__.get("_crcm_compiled")
    if compiled is None:
        compiled = torch.compile(model, options={"freezing": True})
        # Kept on the model outside its submodules (not in its state_dict), freed with it.
        object.__setattr__(model, "_crcm_compiled", compiled)
    return compiled
