"""The streaming sampler on the Rust runtime equals the full-sequence model it stands for.

Oracle: for every chunk and denoising step, run the model on the *whole* video so far (earlier
chunks clean at s = 0, the current chunk noisy) under a block-causal mask — windowed when the
stream has a sink + window — and take the current chunk's output. Same noise, same actions.
Tolerance: max |Δx0| ≤ 1e-4 in float32 (float rounding of different but equivalent reductions).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from crcm.masks import Mask, Rect
from crcm.models.configs import get_config
from crcm.pipeline import Pipeline
from crcm.runtime import Runtime
from crcm.sampling import SamplerConfig, consistency_step, euler_step, euler_times

TOL = 1e-4


def record_latents(runtime: Runtime) -> dict[int, list[torch.Tensor]]:
    """Captures each stream's denoised chunks (model space) as the executor emits them."""
    latents: dict[int, list[torch.Tensor]] = {}
    executor = runtime.executor

    def wrapped_run_group(plan, items, T):
        before = {int(sid): executor.streams[int(sid)].x0 for sid in plan.stream_ids[items]}
        original_run_group(plan, items, T)
        for sid in plan.stream_ids[items]:
            st = executor.streams.get(int(sid))
            if st is not None and st.x0 is not None and st.x0 is not before[int(sid)]:
                latents.setdefault(int(sid), []).append(st.x0.clone())

    original_run_group = executor._run_group
    executor._run_group = wrapped_run_group
    return latents


def windowed_block_causal(
    num_frames: int, chunk: int, tpf: int, sink: int, window: int | None
) -> Mask:
    """Chunk i sees the sink frames, the `window` latest other frames before it, and itself."""
    rects = []
    for c0 in range(0, num_frames, chunk):
        q = (c0 * tpf, (c0 + chunk) * tpf)
        earlier = list(range(c0))
        sinks = [f for f in earlier if f < sink]
        others = [f for f in earlier if f >= sink]
        if window is not None:
            others = others[max(0, len(others) - window) :]
        for f in sinks + others:
            rects.append(Rect(*q, f * tpf, (f + 1) * tpf))
        rects.append(Rect(*q, *q))
    n = num_frames * tpf
    return Mask(n, n, tuple(rects))


def reference_rollout(
    pipe: Pipeline,
    sampler: SamplerConfig,
    num_frames: int,
    actions: list[int],
    cond: int,
    seed: int,
) -> list[torch.Tensor]:
    """Denoised chunks by full-sequence recomputation (no KV cache), same noise as streaming.

    Earlier chunks enter as the cache holds them: clean at s = 0 after a cache-update pass, or
    (noisy context) as the input of their last denoising step at that step's time.
    """
    model = pipe.model
    c, h, w = pipe.latent_chw
    tpf = model.tokens_per_frame(h, w)
    T = sampler.chunk_frames
    gen = torch.Generator().manual_seed(seed)
    context: list[torch.Tensor] = []
    context_s: list[float] = []
    out: list[torch.Tensor] = []
    for chunk in range(num_frames // T):
        x = torch.randn((T, c, h, w), generator=gen)
        n = sampler.steps_of(chunk)
        F = (chunk + 1) * T
        mask = windowed_block_causal(F, T, tpf, sampler.sink_frames, sampler.window_frames)
        for k in range(n):
            s = sampler.times[k]
            s_next = sampler.times[k + 1] if k + 1 < n else 0.0
            seq = torch.cat([*context, x])[None]
            s_seq = torch.tensor(context_s + [s] * T)[None]
            with torch.no_grad():
                v = model(
                    seq,
                    s_seq,
                    cond=torch.tensor([cond]),
                    actions_B_T=torch.tensor(actions[:F])[None],
                    attention=mask,
                )[0, -T:]
            x_in, s_in = x, s
            if sampler.kind == "euler":
                x0, x = euler_step(x, v, s, s_next)
            else:
                noise = torch.randn((T, c, h, w), generator=gen) if s_next > 0 else 0 * x
                x0, x = consistency_step(x, v, s, s_next, noise)
        out.append(x0)
        if sampler.cache_update:
            context.append(x0)
            context_s += [0.0] * T
        else:
            context.append(x_in)
            context_s += [s_in] * T
    return out


def stream(pipe, sampler, num_frames, actions, cond, seed, **runtime_kwargs):
    rt = Runtime(
        pipe, max_streams=4, context_frames=num_frames + sampler.chunk_frames, **runtime_kwargs
    )
    latents = record_latents(rt)
    session = rt.open(sampler=sampler, cond=cond, seed=seed, max_frames=num_frames)
    session.push_actions(actions[:num_frames])
    rt.run_until_idle()
    frames = session.read()
    assert len(frames) == num_frames
    return latents[session.id], rt, session


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "chunk,steps,cache_update",
    [
        (1, (1,), True),
        (1, (4, 2), True),
        (3, (2,), True),
        (3, (4, 2), True),
        (1, (2,), False),
        (3, (4, 2), False),
    ],
)
def test_streaming_equals_full_block_causal_forward(pipe, chunk, steps, cache_update):
    sampler = SamplerConfig(chunk_frames=chunk, steps_per_chunk=steps, cache_update=cache_update)
    actions = [0, 1, 2, 3, 1, 2, 0, 3, 2]
    ours, _, _ = stream(pipe, sampler, 9, actions, cond=1, seed=5)
    ref = reference_rollout(pipe, sampler, 9, actions, cond=1, seed=5)
    assert max_diff(ours, ref) < TOL


@pytest.mark.parametrize("chunk,sink,window", [(1, 1, 2), (1, 0, 3), (3, 1, 3), (3, 2, 4)])
def test_windowed_streaming_equals_windowed_reference(pipe, chunk, sink, window):
    sampler = SamplerConfig(
        chunk_frames=chunk, steps_per_chunk=(2,), sink_frames=sink, window_frames=window
    )
    actions = [3, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 1]
    ours, _rt, session = stream(pipe, sampler, 12, actions, cond=2, seed=11)
    ref = reference_rollout(pipe, sampler, 12, actions, cond=2, seed=11)
    assert max_diff(ours, ref) < TOL
    # And the window really bounds the context the runtime keeps.
    assert session.stats()["resident_frames"] <= sink + window


def test_euler_teacher_with_cfg_matches_reference_without_guidance(pipe):
    # CFG scale 1 reduces to the conditional branch, so the full-sequence oracle applies.
    sampler = SamplerConfig(kind="euler", steps_per_chunk=(4,), times=tuple(euler_times(4)))
    actions = [0, 1, 2, 3, 0, 1]
    ours, _, _ = stream(pipe, sampler, 6, actions, cond=0, seed=3)
    ref = reference_rollout(pipe, sampler, 6, actions, cond=0, seed=3)
    assert max_diff(ours, ref) < TOL


def test_cfg_combines_conditional_and_unconditional_branches(pipe):
    """Guidance w: v = v_u + w·(v_c − v_u), each branch with its own KV context (plane 1)."""
    base = dict(kind="euler", steps_per_chunk=(3,), times=tuple(euler_times(3)))
    actions = [1, 2, 3, 0]
    guided, rt, _ = stream(pipe, SamplerConfig(**base, cfg_scale=2.0), 4, actions, 1, 7, cfg=True)
    cond, _, _ = stream(pipe, SamplerConfig(**base), 4, actions, 1, 7)
    assert rt.cache.planes == 2
    assert max_diff(guided, cond) > 1e-3  # guidance changes the result
    # Without the second plane a guided session is refused with a clear error.
    runtime = Runtime(pipe, max_streams=1)
    with pytest.raises(ValueError, match="cfg=True"):
        runtime.open(sampler=SamplerConfig(**base, cfg_scale=2.0), max_frames=4)
    assert runtime.stats()["streams"] == 0  # nothing was left half-open


def streams_per_plan(runtime: Runtime) -> list[int]:
    """Records, for every plan the runtime runs, how many distinct streams it carries."""
    widths: list[int] = []
    run_plan = runtime.executor.run

    def counting_run(plan):
        widths.append(len({int(i) for i in plan.stream_ids}))
        run_plan(plan)

    runtime.executor.run = counting_run
    return widths


def test_batched_streams_equal_each_stream_alone(pipe):
    sampler = SamplerConfig(chunk_frames=1, steps_per_chunk=(2, 1), sink_frames=1, window_frames=3)
    specs = [(0, 1, [0, 1, 2, 3, 0, 1]), (1, 2, [3, 3, 2, 2, 1, 1]), (2, 0, [1, 0, 1, 0, 1, 0])]
    alone_rt = Runtime(pipe, max_streams=4)
    alone = streams_per_plan(alone_rt)
    alone_rt.open(sampler=sampler, cond=0, seed=1).push_actions(specs[0][2])
    alone_rt.run_until_idle()
    assert alone and set(alone) == {1}
    rt = Runtime(pipe, max_streams=4)
    latents = record_latents(rt)
    together = streams_per_plan(rt)
    sessions = []
    for cond, seed, actions in specs:
        s = rt.open(sampler=sampler, cond=cond, seed=seed)
        s.push_actions(actions)
        sessions.append(s)
    rt.run_until_idle()
    # The streams really ran together: same schedule, same start, so each of the plans one
    # stream needs alone carries all three.
    assert together == [3] * len(alone)
    for session, (cond, seed, actions) in zip(sessions, specs, strict=True):
        single, _, _ = stream(pipe, sampler, 6, actions, cond, seed)
        assert max_diff(latents[session.id], single) < TOL


def test_fork_equals_fresh_stream_with_the_same_prefix(pipe):
    sampler = SamplerConfig(chunk_frames=1, steps_per_chunk=(2,), sink_frames=1, window_frames=4)
    prefix, rest = [0, 1, 2, 3], [2, 2, 1]
    rt = Runtime(pipe, max_streams=4)
    latents = record_latents(rt)
    parent = rt.open(sampler=sampler, cond=1, seed=9)
    parent.push_actions(prefix)
    rt.run_until_idle()
    child = parent.fork()
    used_before = rt.stats()["pages_used"]
    assert used_before == parent.stats()["resident_frames"]  # the fork shares every page
    for s in (parent, child):
        s.push_actions(rest)
    rt.run_until_idle()
    fresh, _, _ = stream(pipe, sampler, len(prefix + rest), prefix + rest, 1, 9)
    assert max_diff(latents[parent.id], fresh) < TOL
    assert max_diff(latents[child.id], fresh[len(prefix) :]) < TOL


def test_close_and_cancel_return_every_page(pipe):
    sampler = SamplerConfig(chunk_frames=3, steps_per_chunk=(4,), sink_frames=1, window_frames=3)
    rt = Runtime(pipe, max_streams=3)
    a, b, c = (rt.open(sampler=sampler, cond=0, seed=i) for i in range(3))
    for s in (a, b, c):
        s.push_actions([1] * 9)
    rt.run_until_idle(max_plans=3)  # b and c are mid-chunk now
    assert rt.stats()["pages_used"] > 0
    a.close()
    rt.step()
    b.close()
    c.close()
    a.close()  # idempotent
    stats = rt.stats()
    assert stats["pages_used"] == 0 and stats["pages_reserved"] == 0 and stats["streams"] == 0
    with pytest.raises(Exception, match="closed"):
        a.push_actions([0])


@pytest.mark.parametrize(
    "num_frames", [600, pytest.param(10_000, marks=pytest.mark.slow, id="10k-frames")]
)
def test_pages_stay_flat_over_a_long_stream(pipe, num_frames):
    """Sink + window keep memory flat (c3-3, noisy context, 1 step per chunk)."""
    sampler = SamplerConfig(
        chunk_frames=3, steps_per_chunk=(1,), cache_update=False, sink_frames=1, window_frames=3
    )
    rt = Runtime(pipe, max_streams=1)
    session = rt.open(sampler=sampler, cond=0, seed=0, buffer_frames=8, backpressure="drop_oldest")
    session.push_actions(np.random.default_rng(0).integers(0, 4, num_frames).tolist())
    peak = 0
    for _ in range(-(-num_frames // 3)):
        assert rt.step() == 1
        peak = max(peak, rt.stats()["pages_used"])
    assert session.stats()["frames_emitted"] == num_frames // 3 * 3
    assert peak <= (1 + 3 + 3) * rt.scheduler.pages_per_frame
    assert rt.stats()["pages_used"] == session.stats()["pages_held"] == 4


def test_cfg_of_an_action_only_world_model_guides_on_actions():
    """Without a per-video condition, the unconditional branch sees the null action."""
    from crcm.models import get_config

    cfg = get_config("tiny").replace(cond="none", num_classes=0, class_tokens=0)
    world = Pipeline.from_config(cfg, seed=0)
    with torch.no_grad():
        for p in world.model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    base = dict(kind="euler", steps_per_chunk=(3,), times=tuple(euler_times(3)))
    outs = []
    for scale in (1.0, 2.0):
        rt = Runtime(world, max_streams=1, context_frames=5, cfg=True)
        latents = record_latents(rt)
        s = rt.open(sampler=SamplerConfig(**base, cfg_scale=scale), seed=4, max_frames=4)
        s.push_actions([1, 2, 3, 0])
        rt.run_until_idle()
        outs.append(latents[s.id])
    assert max_diff(outs[0], outs[1]) > 1e-3


@pytest.mark.interpreter
def test_triton_paged_attention_streams_like_the_reference():
    """The executor's Triton backend (the GPU path; here in Triton's interpreter) over the
    runtime's real page tables: windowed, with evictions, two streams batched."""
    # The kernel needs a head dim of 16 or more: "tiny" widened from 2 heads × 12 to 2 × 16.
    pipe = Pipeline.from_config(dataclasses.replace(get_config("tiny"), dim=32), seed=1)
    with torch.no_grad():
        for p in pipe.model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    sampler = SamplerConfig(chunk_frames=1, steps_per_chunk=(2,), sink_frames=1, window_frames=2)
    specs = [(0, 3, [0, 1, 2, 3, 0]), (2, 4, [3, 2, 1, 0, 3])]
    rt = Runtime(pipe, max_streams=2, attention_backend="triton")
    latents = record_latents(rt)
    sessions = []
    for cond, seed, actions in specs:
        session = rt.open(sampler=sampler, cond=cond, seed=seed, max_frames=len(actions))
        session.push_actions(actions)
        sessions.append(session)
    rt.run_until_idle()
    for session, (cond, seed, actions) in zip(sessions, specs, strict=True):
        ref = reference_rollout(pipe, sampler, len(actions), actions, cond=cond, seed=seed)
        assert max_diff(latents[session.id], ref) < TOL


def test_compiled_runtime_streams_like_the_reference_without_recompiling_per_plan(pipe):
    """``Runtime(compile=True)``: the same frames as the oracle, and what is compiled for one
    batch shape serves every later plan of that shape (the paged attention, whose context
    length changes from plan to plan, runs outside the graphs); only a new batch shape
    compiles again."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    sampler = SamplerConfig(chunk_frames=1, steps_per_chunk=(2,), cache_update=True)
    actions = [0, 1, 2, 3, 1, 2]
    # Unfused: one stream's forwards are then all of batch 1 (a fused cache update batches a
    # stream's update with its next chunk, test_fused_cache_update.py).
    ours, rt, _ = stream(
        pipe, sampler, 6, actions, cond=1, seed=5, compile=True, fuse_cache_update=False
    )
    ref = reference_rollout(pipe, sampler, 6, actions, cond=1, seed=5)
    assert max_diff(ours, ref) < TOL
    one_stream = counters["stats"]["unique_graphs"]
    assert one_stream > 0  # it did compile
    # One graph per forward: the attention is an opaque operator and no input check reads a
    # tensor back to the host, so nothing breaks the graph.
    assert not counters["graph_break"], dict(counters["graph_break"])

    latents = record_latents(rt)
    again = rt.open(sampler=sampler, cond=0, seed=1, max_frames=4)
    again.push_actions([0, 1, 2, 3])
    rt.run_until_idle()
    assert counters["stats"]["unique_graphs"] == one_stream  # 12 more plans, nothing compiled
    alone, _, _ = stream(pipe, sampler, 4, [0, 1, 2, 3], cond=0, seed=1)
    assert max_diff(latents[again.id], alone) < TOL

    a = rt.open(sampler=sampler, cond=0, seed=1, max_frames=4)
    b = rt.open(sampler=sampler, cond=2, seed=2, max_frames=4)
    a.push_actions([0, 1, 2, 3])
    b.push_actions([3, 2, 1, 0])
    rt.run_until_idle()
    assert max_diff(latents[a.id], alone) < TOL  # batched with b, compiled: the same frames
    # The batch of two compiled once (the batch becomes a dynamic dimension), not per plan.
    assert one_stream < counters["stats"]["unique_graphs"] <= 2 * one_stream
    torch._dynamo.reset()
