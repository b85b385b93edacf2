"""The fused cache update (``Runtime(fuse_cache_update=True)``, the default).

A clean chunk's time-0 cache-update pass runs as an extra row of the stream's next chunk's
first forward when that chunk can start at once. Checked against the full-sequence oracle of
``test_streaming.py``: the same frames, one forward per chunk instead of two at one step, a
stream that waits for its keys still updating while it waits, no held update reading a page
that another stream took over, and a fork seeing every K/V of its parent.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_streaming import TOL, max_diff, record_latents, reference_rollout

from crcm.runtime import Runtime
from crcm.sampling import SamplerConfig


def count_forwards(runtime: Runtime) -> list[int]:
    """Records the batch size of every forward the runtime's executor runs."""
    sizes: list[int] = []
    forward = runtime.executor._forward

    def counting(x, *args, **kwargs):
        sizes.append(x.shape[0])
        return forward(x, *args, **kwargs)

    runtime.executor._forward = counting
    return sizes


def run_stream(pipe, sampler, actions, *, seed, one_key_at_a_time=False, **runtime_kwargs):
    """One stream of ``len(actions)`` frames: its chunks (model space) and forward sizes."""
    n = len(actions)
    rt = Runtime(pipe, max_streams=2, context_frames=n + sampler.chunk_frames, **runtime_kwargs)
    latents = record_latents(rt)
    sizes = count_forwards(rt)
    session = rt.open(sampler=sampler, cond=1, seed=seed, max_frames=n)
    if one_key_at_a_time:
        for a in actions:  # a player: the next key comes after the frame before it
            session.push_actions([a])
            rt.run_until_idle()
    else:
        session.push_actions(actions)
        rt.run_until_idle()
    assert len(session.read()) == n
    return latents[session.id], sizes


@pytest.mark.parametrize("chunk,steps,window", [(1, (1,), None), (1, (2,), 2), (3, (1,), 3)])
def test_fused_stream_equals_the_oracle_with_one_forward_per_chunk_at_one_step(
    pipe, chunk, steps, window
):
    sampler = SamplerConfig(
        chunk_frames=chunk, steps_per_chunk=steps, cache_update=True, window_frames=window
    )
    actions = [0, 1, 2, 3, 1, 2, 0, 3, 2]
    chunks = len(actions) // chunk
    fused, sizes = run_stream(pipe, sampler, actions, seed=5)
    assert max_diff(fused, reference_rollout(pipe, sampler, 9, actions, 1, 5)) < TOL
    plain, plain_sizes = run_stream(pipe, sampler, actions, seed=5, fuse_cache_update=False)
    assert max_diff(fused, plain) < TOL
    n = steps[0]
    assert len(plain_sizes) == chunks * (n + 1) and set(plain_sizes) == {1}
    # Every update but the last joins the next chunk's first forward (two rows); the last
    # stream chunk has no next chunk, so its update runs alone.
    assert len(sizes) == chunks * n + 1
    assert sizes.count(2) == chunks - 1


def test_a_stream_waiting_for_keys_updates_its_cache_while_it_waits(pipe):
    """A key press costs one forward: the update ran while the stream waited for the key."""
    sampler = SamplerConfig(chunk_frames=1, steps_per_chunk=(1,), cache_update=True)
    actions = [3, 1, 2, 0, 1, 2]
    played, sizes = run_stream(pipe, sampler, actions, seed=2, one_key_at_a_time=True)
    assert set(sizes) == {1} and len(sizes) == 2 * len(actions)
    assert max_diff(played, reference_rollout(pipe, sampler, 6, actions, 1, 2)) < TOL


def test_held_updates_never_read_a_page_another_stream_took(pipe):
    """Small windows and a pool with no slack recycle every evicted page at once; one item per
    plan and deadlines (target_fps) make the streams take turns, so a held update's context
    pages go to another stream before it runs. Each stream still equals its own oracle, and
    the runtime had to run some held updates early to get there (the case this guards)."""
    sampler = SamplerConfig(
        chunk_frames=1, steps_per_chunk=(1,), cache_update=True, sink_frames=0, window_frames=1
    )
    tpf = pipe.model.tokens_per_frame(*pipe.latent_chw[1:])
    rt = Runtime(pipe, max_streams=3, context_frames=2, max_batch_tokens=tpf)
    latents = record_latents(rt)
    executor = rt.executor
    early = []
    flush = executor.flush

    def counting_flush(sid):
        if sid in executor._deferred:
            early.append(sid)
        flush(sid)

    executor.flush = counting_flush
    specs = [(1, [0, 1, 2, 3, 0, 1, 2, 3]), (2, [3, 3, 2, 2, 1, 1, 0, 0]), (3, [1, 0] * 4)]
    sessions = []
    for seed, actions in specs:
        s = rt.open(sampler=sampler, cond=1, seed=seed, max_frames=8, target_fps=1000.0)
        s.push_actions(actions)
        sessions.append(s)
    rt.run_until_idle()
    for s, (seed, actions) in zip(sessions, specs, strict=True):
        assert len(s.read()) == 8
        ref = reference_rollout(pipe, sampler, 8, actions, 1, seed)
        assert max_diff(latents[s.id], ref) < TOL, f"stream seeded {seed}"
    assert early  # the guarded case happened


def test_a_fork_sees_every_kv_of_its_parent(pipe):
    """Forked right after its parent's update was held back, the child needs that update in
    the pages it shares: fork runs it first, so parent and child make the same frames."""
    sampler = SamplerConfig(chunk_frames=1, steps_per_chunk=(1,), cache_update=True)
    rt = Runtime(pipe, max_streams=2, context_frames=8)
    latents = record_latents(rt)
    parent = rt.open(sampler=sampler, cond=1, seed=4, max_frames=6)
    parent.push_actions([0, 1, 2, 3, 1, 2])
    while not (parent.stats()["frames_emitted"] == 3 and rt.executor._deferred):
        assert rt.step()
    child = parent.fork()
    assert not rt.executor._deferred  # fork ran the held update
    rt.run_until_idle()
    assert len(latents[child.id]) == 3
    assert max_diff(latents[parent.id][3:], latents[child.id]) < TOL
    with torch.no_grad():
        ref = reference_rollout(pipe, sampler, 6, [0, 1, 2, 3, 1, 2], 1, 4)
    assert max_diff(latents[parent.id], ref) < TOL


def test_after_warm_up_a_compiled_runtime_compiles_nothing_mid_stream(pipe):
    """warm_up compiles both kinds of forward a stream runs: cache updates alone (a player
    waiting for a key) and fused ones (keys queued). Neither a waiting player, nor queued
    streams, nor a stream opened on context frames compiles anything afterwards: a compile in
    the middle of a game stalls it for seconds."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    sampler = SamplerConfig(
        chunk_frames=1, steps_per_chunk=(1,), cache_update=True, window_frames=3
    )
    rt = Runtime(pipe, max_streams=4, compile=True)
    rt.warm_up(2, sampler)
    graphs = counters["stats"]["unique_graphs"]
    context = np.zeros((2, *pipe.frame_shape), dtype=np.uint8)
    player = rt.open(
        sampler=sampler, cond=0, seed=1, max_frames=8, context=context, context_actions=[0, 1]
    )
    queued = [rt.open(sampler=sampler, cond=c, seed=c, max_frames=6) for c in (1, 2)]
    for s in queued:
        s.push_actions([1, 2, 3, 0, 1, 2])
    for key in [3, 2, 1, 0, 3, 2]:
        player.push_actions([key])
        rt.run_until_idle()
    assert len(player.read()) == 8 and all(len(s.read()) == 6 for s in queued)
    assert counters["stats"]["unique_graphs"] == graphs
