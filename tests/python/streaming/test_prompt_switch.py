"""Prompt switching mid-stream: the K/V re-cache (LongLive) equals a cache built from scratch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crcm
from crcm.errors import ConfigError, InvalidStateError
from crcm.sampling import SamplerConfig
from crcm.wan.tiny import HashTextEncoder, tiny_text_config

TEXT_LEN, TEXT_DIM = 4, 8
CFG = tiny_text_config(TEXT_DIM, TEXT_LEN)


def make_pipe(**sampler) -> crcm.Pipeline:
    pipe = crcm.Pipeline.from_config(
        CFG, sampler=SamplerConfig(window_frames=16, **sampler), seed=3
    )
    pipe.text_encoder = HashTextEncoder()
    # Fresh weights have a zero output head (and frames that ignore the prompt): randomise.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return pipe


def context_frames(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)


def run_to(rt: crcm.Runtime, session, n: int) -> list[np.ndarray]:
    frames: list[np.ndarray] = []
    while len(frames) < n:
        assert rt.step() > 0, "the stream stopped early"
        frames += session.read()
    return frames


def cached_kv(rt: crcm.Runtime, session) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    frames, pages = rt.scheduler.page_table(session.id)
    order = np.argsort(frames)
    idx = torch.from_numpy(pages[order].reshape(-1).astype(np.int64))
    return frames[order], rt.cache.k[0][:, idx].clone(), rt.cache.v[0][:, idx].clone()


@pytest.mark.parametrize("cache_update", [True, False])
def test_cache_after_a_switch_equals_one_built_with_the_new_prompt(cache_update: bool) -> None:
    ctx = context_frames(6)
    pipe = make_pipe(cache_update=cache_update)

    with crcm.Runtime(pipe, max_streams=1) as rt:
        a = rt.open(prompt="a red car", context=ctx, seed=5, max_frames=9)
        run_to(rt, a, 6)
        _, k_before, _ = cached_kv(rt, a)
        a.set_prompt("a blue boat")
        after_switch = run_to(rt, a, 1)  # frame 6: the first one under the new prompt
        frames_a, k_a, v_a = cached_kv(rt, a)

    with crcm.Runtime(pipe, max_streams=1) as rt:
        b = rt.open(prompt="a blue boat", context=ctx, seed=5, max_frames=9)
        scratch = run_to(rt, b, 7)
        frames_b, k_b, v_b = cached_kv(rt, b)

    with crcm.Runtime(pipe, max_streams=1) as rt:
        c = rt.open(prompt="a red car", context=ctx, seed=5, max_frames=9)
        unswitched = run_to(rt, c, 7)

    # The six context frames' K/V were rewritten under the new prompt: equal to the cache of a
    # stream that had the new prompt from the start over the same frames (frame 6, written
    # after the switch, too).
    np.testing.assert_array_equal(frames_a, frames_b)
    torch.testing.assert_close(k_a, k_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_a, v_b, atol=1e-5, rtol=1e-5)
    assert (k_before[:, : k_a.shape[1] - 1] - k_a[:, : k_a.shape[1] - 1]).abs().max() > 1e-3
    # So the next frame is the new prompt's, and not the old one's.
    np.testing.assert_array_equal(after_switch[0], scratch[6])
    assert np.abs(after_switch[0].astype(int) - unswitched[6].astype(int)).max() > 0


def test_switch_applies_at_the_next_chunk_and_generated_frames_are_recached() -> None:
    pipe = make_pipe(chunk_frames=2)
    with crcm.Runtime(pipe, max_streams=1) as rt:
        s = rt.open(prompt="first", seed=1, max_frames=8)
        run_to(rt, s, 4)
        state = rt.executor.streams[s.id]
        assert {w.frame_start for w in state.written} <= {0, 2}
        s.set_prompt("second")
        assert state.pending_cond is not None
        run_to(rt, s, 2)
        assert state.pending_cond is None
        torch.testing.assert_close(state.cond, pipe.text_encoder.encode(["second"])[:1])


def test_prompt_errors_are_clear() -> None:
    pipe = make_pipe()
    with crcm.Runtime(pipe, max_streams=2) as rt:
        with pytest.raises(ConfigError, match="not both"):
            rt.open(prompt="x", cond=torch.zeros(TEXT_LEN, TEXT_DIM))
        with pytest.raises(ConfigError, match="must be a string"):
            rt.open(prompt=3)
        s = rt.open(prompt="x", seed=0, max_frames=4)
        run_to(rt, s, 1)
        rt.step()  # its cache-update pass: the stream is between chunks, and can fork
        fork = s.fork()
        with pytest.raises(InvalidStateError, match="shares cached frames"):
            s.set_prompt("y")
        fork.close()
        s.set_prompt("y")  # alone again: allowed
    plain = crcm.Pipeline.from_config(CFG, sampler=SamplerConfig(window_frames=4))
    with (
        crcm.Runtime(plain, max_streams=1) as rt,
        pytest.raises(ConfigError, match="no text encoder"),
    ):
        rt.open(prompt="x")


def test_guided_sampling_uses_the_negative_prompt() -> None:
    from crcm.sampling import get_preset

    pipe = make_pipe()
    teacher = get_preset("teacher", 2)

    def frames(**kw) -> np.ndarray:
        with crcm.Runtime(pipe, max_streams=1, cfg=True) as rt:
            s = rt.open(prompt="a cat", sampler=teacher, seed=0, max_frames=2, **kw)
            return np.stack(run_to(rt, s, 2))

    pipe.negative_prompt = "blurry"
    default = frames()
    np.testing.assert_array_equal(default, frames(negative_prompt="blurry"))
    assert not np.array_equal(default, frames(negative_prompt="ugly"))
