"""The condition's cross-attention K/V: computed once per stream, equal to the plain forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crcm
from crcm.models import CausalDiT, get_config
from crcm.models.dit import CrossKV
from crcm.sampling import SamplerConfig, get_preset
from crcm.wan.tiny import HashTextEncoder, tiny_text_config

TEXT_LEN, TEXT_DIM = 4, 8
CFG = tiny_text_config(TEXT_DIM, TEXT_LEN)


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    # Fresh weights have a zero output head (and outputs that ignore the condition).
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def make_pipe(**sampler) -> crcm.Pipeline:
    pipe = crcm.Pipeline.from_config(
        CFG, sampler=SamplerConfig(window_frames=16, **sampler), seed=3
    )
    pipe.text_encoder = HashTextEncoder()
    randomise(pipe.model)
    return pipe


def run_to(rt: crcm.Runtime, session, n: int) -> list[np.ndarray]:
    frames: list[np.ndarray] = []
    while len(frames) < n:
        assert rt.step() > 0, "the stream stopped early"
        frames += session.read()
    return frames


def run_all(rt: crcm.Runtime, sessions: list, n: int) -> list[np.ndarray]:
    frames: list[list[np.ndarray]] = [[] for _ in sessions]
    while min(len(f) for f in frames) < n:
        assert rt.step() > 0, "the streams stopped early"
        for f, s in zip(frames, sessions, strict=True):
            f += s.read()
    return [np.stack(f[:n]) for f in frames]


def count_cross_kv(model: CausalDiT) -> tuple[list[int], list[int], list]:
    """Hooks counting the cross-attention k projections and the model's forwards."""
    k_calls, forwards = [0], [0]
    handles = [
        block.cross_attn.k.register_forward_hook(lambda *_: k_calls.__setitem__(0, k_calls[0] + 1))
        for block in model.blocks
    ]
    handles.append(model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1)))
    return k_calls, forwards, handles


# -- the model -------------------------------------------------------------------------------


def test_forward_with_cross_kv_equals_the_plain_forward() -> None:
    cfg = tiny_text_config(text_dim=16, text_len=12)
    model = CausalDiT(cfg)
    randomise(model)
    gen = torch.Generator().manual_seed(1)
    B, T = 3, 2
    x = torch.randn(B, T, 4, 8, 8, generator=gen)
    s = torch.rand(B, T, generator=gen)
    cond = torch.randn(B, cfg.text_len, cfg.text_dim, generator=gen)
    with torch.no_grad():
        plain = model(x, s, cond=cond)
        kv = model.cross_kv(cond)
        assert len(kv.k) == len(kv.v) == cfg.num_layers and kv.batch == B
        # The same ops on the same batch: bitwise equal.
        assert torch.equal(model(x, s, cross_kv=kv), plain)
        # Per-row caches, concatenated (as the runtime batches its streams').
        rows = CrossKV.cat([model.cross_kv(cond[b : b + 1]) for b in range(B)])
        torch.testing.assert_close(model(x, s, cross_kv=rows), plain, atol=1e-6, rtol=0)
        # The null condition.
        null = model(x, s, cond=None)
        assert torch.equal(model(x, s, cross_kv=model.cross_kv(None, batch=B)), null)
        assert not torch.equal(null, plain)  # the condition does matter
        with pytest.raises(ValueError, match="not both"):
            model(x, s, cond=cond, cross_kv=kv)
        with pytest.raises(ValueError, match="batch"):
            model(x[:2], s[:2], cross_kv=kv)


def test_class_models_take_a_cross_kv_too() -> None:
    cfg = get_config("tiny")  # class-conditioned, 2 class tokens
    model = CausalDiT(cfg)
    randomise(model)
    x = torch.randn(2, 1, 4, 8, 8)
    s = torch.full((2, 1), 0.5)
    cls = torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model(x, s, cross_kv=model.cross_kv(cls)), model(x, s, cond=cls))


# -- the runtime -----------------------------------------------------------------------------


def streams(pipe: crcm.Runtime, cached: bool, opens: list[dict], n: int, **rt_kw):
    with crcm.Runtime(pipe, max_streams=len(opens), **rt_kw) as rt:
        rt.executor.cache_cross_kv = cached
        sessions = [rt.open(**kw) for kw in opens]
        return run_all(rt, sessions, n)


@pytest.mark.parametrize("chunk_frames", [1, 2])
def test_stream_frames_are_the_same_with_and_without_the_cache(chunk_frames: int) -> None:
    pipe = make_pipe(chunk_frames=chunk_frames, steps_per_chunk=(2,))
    opens = [
        {"prompt": "a red car", "seed": 1, "max_frames": 6},
        {"prompt": "a blue boat", "seed": 2, "max_frames": 6},
        {"seed": 3, "max_frames": 6},  # the empty prompt
    ]
    cached = streams(pipe, True, opens, 6)
    plain = streams(pipe, False, opens, 6)
    for a, b in zip(cached, plain, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(cached[0], cached[1])


def test_cross_kv_projections_run_once_per_stream() -> None:
    pipe = make_pipe(chunk_frames=2, steps_per_chunk=(3,))
    layers = CFG.num_layers
    k_calls, forwards, handles = count_cross_kv(pipe.model)
    try:
        with crcm.Runtime(pipe, max_streams=2) as rt:
            s = rt.open(prompt="a red car", seed=0, max_frames=12)
            run_to(rt, s, 6)
            assert forwards[0] >= 9  # 3 chunks × (3 steps + a cache-update pass)
            assert k_calls[0] == layers  # once, not once per forward
            state = rt.executor.streams[s.id]
            kv = state.cond_kv[1]

            # A fork shares the parent's K/V (read-only) and computes none.
            rt.step()  # the last chunk's cache-update pass: between chunks, the stream can fork
            fork = s.fork(seed=7)
            run_all(rt, [s, fork], 2)
            assert k_calls[0] == layers
            assert rt.executor.streams[fork.id].cond_kv[1] is kv
            fork.close()

            # A prompt switch: once for the new prompt (the re-cache forwards use it too).
            before = forwards[0]
            s.set_prompt("a blue boat")
            run_to(rt, s, 4)
            assert forwards[0] > before + 4
            assert k_calls[0] == 2 * layers
            new = state.cond_kv[1]
            assert new is not kv
            with torch.no_grad():
                want = pipe.model.cross_kv(pipe.text_encoder.encode(["a blue boat"]))
            for got, ref in zip(new.k + new.v, want.k + want.v, strict=True):
                assert torch.equal(got, ref)
    finally:
        for h in handles:
            h.remove()


def test_guided_streams_compute_their_unconditional_kv_once() -> None:
    pipe = make_pipe()
    layers = CFG.num_layers
    k_calls, forwards, handles = count_cross_kv(pipe.model)
    try:
        with crcm.Runtime(pipe, max_streams=1, cfg=True) as rt:
            s = rt.open(prompt="a cat", sampler=get_preset("teacher", 3), seed=0, max_frames=3)
            run_to(rt, s, 3)
        assert forwards[0] >= 9
        assert k_calls[0] == 2 * layers  # the conditional and the unconditional row
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("cache_update", [True, False])
def test_a_prompt_switch_updates_the_cached_kv(cache_update: bool) -> None:
    ctx = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)
    pipe = make_pipe(cache_update=cache_update)

    with crcm.Runtime(pipe, max_streams=1) as rt:
        a = rt.open(prompt="a red car", context=ctx, seed=5, max_frames=9)
        run_to(rt, a, 6)
        a.set_prompt("a blue boat")
        switched = run_to(rt, a, 3)  # frames 6..8: under the new prompt

    with crcm.Runtime(pipe, max_streams=1) as rt:
        b = rt.open(prompt="a blue boat", context=ctx, seed=5, max_frames=9)
        scratch = run_to(rt, b, 9)

    with crcm.Runtime(pipe, max_streams=1) as rt:
        rt.executor.cache_cross_kv = False
        c = rt.open(prompt="a red car", context=ctx, seed=5, max_frames=9)
        run_to(rt, c, 6)
        c.set_prompt("a blue boat")
        plain = run_to(rt, c, 3)

    np.testing.assert_array_equal(np.stack(switched), np.stack(scratch[6:9]))
    np.testing.assert_array_equal(np.stack(switched), np.stack(plain))


def test_guided_streams_with_a_negative_prompt_give_the_same_frames() -> None:
    pipe = make_pipe()
    pipe.negative_prompt = "blurry"
    teacher = get_preset("teacher", 2)
    opens = [
        {"prompt": "a cat", "sampler": teacher, "seed": 0, "max_frames": 3},
        {"prompt": "a dog", "sampler": teacher, "seed": 1, "max_frames": 3, "negative_prompt": ""},
        {"prompt": "a cow", "seed": 2, "max_frames": 3},  # unguided, in the same forwards
    ]
    cached = streams(pipe, True, opens, 3, cfg=True)
    plain = streams(pipe, False, opens, 3, cfg=True)
    for a, b in zip(cached, plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_guided_streams_without_a_negative_prompt_use_the_null_condition() -> None:
    pipe = make_pipe()
    pipe.text_encoder = None  # cond= tokens: the unconditional rows take the null condition
    with torch.no_grad():
        pipe.model.null_text.copy_(torch.randn(TEXT_LEN, TEXT_DIM))
    teacher = get_preset("teacher", 2)
    encode = HashTextEncoder().encode
    opens = [
        {"cond": encode(["a cat"])[0], "sampler": teacher, "seed": 0, "max_frames": 3},
        {"cond": encode(["a dog"])[0], "sampler": teacher, "seed": 1, "max_frames": 3},
    ]
    cached = streams(pipe, True, opens, 3, cfg=True)
    plain = streams(pipe, False, opens, 3, cfg=True)
    for a, b in zip(cached, plain, strict=True):
        np.testing.assert_array_equal(a, b)
