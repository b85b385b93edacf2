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
unconditional row drops the per-video condition, or — for models without one, such as world
models conditioned on actions only — the actions (the convention of the training objectives).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from crcm import _native
from crcm.codec import Codec
from crcm.models import CausalDiT
from crcm.runtime.attention import RowPages, select_backend
from crcm.runtime.kv_cache import PagedKVCache
from crcm.sampling import SamplerConfig, consistency_step, euler_step

DENOISE, CACHE_UPDATE = 0, 1

FrameSink = Callable[[np.ndarray, int], None]
"""Receives a chunk's decoded frames ``uint8 [T, H, W, C]`` and the index of the first one."""


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
    ) -> None:
        self.model = model
        self.codec = codec
        self.cache = cache
        self.latent_chw = latent_chw
        self.attention = select_backend(attention_backend, cache)
        self.streams: dict[int, StreamState] = {}
        self._device = cache.k.device

    def add_stream(self, stream_id: int, state: StreamState) -> None:
        if state.guided and self.cache.planes < 2:
            raise ValueError("this runtime has no unconditional KV plane; create it with cfg=True")
        self.streams[stream_id] = state

    def remove_stream(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    @torch.inference_mode()
    def run(self, plan: _native.Plan) -> None:
        """Runs every item of ``plan`` (one forward per distinct chunk size)."""
        num_frames = plan.num_frames
        for T in np.unique(num_frames):
            self._run_group(plan, np.flatnonzero(num_frames == T), int(T))

    def _run_group(self, plan: _native.Plan, items: np.ndarray, T: int) -> None:
        dev = self._device
        states = [self.streams[int(sid)] for sid in plan.stream_ids[items]]
        kinds = plan.kind[items]
        s_item = np.where(kinds == CACHE_UPDATE, 0.0, plan.s[items]).astype(np.float32)

        x_rows = []
        for j, st in enumerate(states):
            if kinds[j] == DENOISE and plan.step[items[j]] == 0:
                self._start_chunk(st, T)
            if st.forced:  # a context frame: the clean frame at s = 0, every pass
                s_item[j] = 0.0
                x_rows.append(st.x0)
            elif kinds[j] == DENOISE:
                x_rows.append(st.x)
            else:
                x_rows.append(st.x0)
        # Guided streams get a second, unconditional row reading/writing cache plane 1.
        guided = [j for j, st in enumerate(states) if st.guided]
        rows = list(range(len(items))) + guided
        planes = [0] * len(items) + [1] * len(guided)
        x_R = torch.stack([x_rows[j] for j in rows])
        s_R_T = torch.from_numpy(s_item[rows]).to(dev)[:, None].expand(-1, T)
        frame_start = torch.from_numpy(plan.frame_start[items][rows]).to(dev)
        pos_R_T = frame_start[:, None] + torch.arange(T, device=dev)
        actions_R_T = self._actions(plan, items, T, rows)
        cond_R = self._cond(states, rows, n_cond=len(items))
        prev_R = None
        if self.model.cfg.prev_frames:
            prev_R = torch.stack([states[j].prev for j in rows])

        attn_fn = self._attention(plan, items[rows], planes, T)
        v_R = self.model(
            x_R,
            s_R_T,
            frame_pos_B_T=pos_R_T,
            cond=cond_R,
            actions_B_T=actions_R_T,
            attention=attn_fn,
            prev_B_T_C_H_W=prev_R,
        )

        for j, st in enumerate(states):
            if kinds[j] != DENOISE:
                continue
            v = v_R[j]
            if st.guided:
                v_uncond = v_R[len(items) + guided.index(j)]
                v = v_uncond + st.sampler.cfg_scale * (v - v_uncond)
            i = items[j]
            s, s_next = float(plan.s[i]), float(plan.s_next[i])
            if st.forced:
                x0 = st.x0
            elif st.sampler.kind == "euler":
                x0, st.x = euler_step(st.x, v, s, s_next)
            else:
                noise = self._noise(st, T) if s_next > 0 else torch.zeros_like(st.x)
                x0, st.x = consistency_step(st.x, v, s, s_next, noise)
            if plan.emits_frames[i]:
                st.x0 = x0
                self._finish_chunk(st, x0)
                frames = self.codec.decode(x0[None])[0]
                st.sink(frames.cpu().numpy(), int(plan.frame_start[i]))

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

    def _finish_chunk(self, st: StreamState, x0: torch.Tensor) -> None:
        k = self.model.cfg.prev_frames
        if k:
            frames = x0 if st.history is None else torch.cat([st.history, x0])
            st.history = frames[-k:]
        if st.forced and st.context_used >= st.context.shape[0]:
            st.context = None  # the prefill is done; free it

    def _noise(self, st: StreamState, T: int) -> torch.Tensor:
        # Drawn on the stream's own generator (CPU, so results do not depend on the device):
        # a stream's video is the same whether it runs alone or batched with others.
        noise = torch.randn((T, *self.latent_chw), generator=st.generator)
        return noise.to(self._device, self.cache.k.dtype)

    def _actions(
        self, plan: _native.Plan, items: np.ndarray, T: int, rows: list[int]
    ) -> torch.Tensor | None:
        if not self.model.cfg.num_actions:
            return None
        starts = plan.frame_indptr[items][rows]
        a = plan.actions[starts[:, None] + np.arange(T)]
        a = np.where(a < 0, self.model.null_action, a)
        if self.model.cfg.cond == "none":
            # Without a per-video condition the actions are the condition: the unconditional
            # rows of guided streams (after the first len(items)) see the null action.
            a[len(items) :] = self.model.null_action
        return torch.from_numpy(a).to(self._device)

    def _cond(self, states: list[StreamState], rows: list[int], n_cond: int) -> torch.Tensor | None:
        if self.model.cfg.cond == "none":
            return None
        cond = torch.cat([states[j].cond for j in rows])
        drop = torch.zeros(len(rows), dtype=torch.bool, device=cond.device)
        drop[n_cond:] = True  # the unconditional rows of guided streams
        return self.model.drop_cond(cond, drop)

    def _attention(
        self, plan: _native.Plan, row_items: np.ndarray, planes: list[int], T: int
    ) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The model's ``attn_fn`` for these rows: write K/V where due, attend over pages."""
        dev = self._device
        cache = self.cache
        L = T * cache.tokens_per_frame
        ppf = cache.pages_per_frame

        # Writes: (plane, row, flat slots) for rows whose item stores its K/V this pass.
        writes: list[tuple[int, int, torch.Tensor]] = []
        for r, (i, p) in enumerate(zip(row_items, planes, strict=True)):
            a, b = plan.write_indptr[i], plan.write_indptr[i + 1]
            if b > a:
                pages = torch.from_numpy(plan.write_page_ids[a:b]).to(dev).view(T, ppf)
                writes.append((p, r, cache.token_slots(pages)))

        rows = [
            RowPages(
                plan.kv_page_ids[plan.kv_indptr[i] : plan.kv_indptr[i + 1]],
                plan.kv_page_lens[plan.kv_indptr[i] : plan.kv_indptr[i + 1]],
                p,
            )
            for i, p in zip(row_items, planes, strict=True)
        ]
        backend = self.attention
        ctx = backend.prepare(rows, L)

        def attn_fn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            for p, r, slots in writes:
                cache.write(p, layer, slots, k[r], v[r])
            return backend.attend(layer, q, k, v, ctx)

        return attn_fn
