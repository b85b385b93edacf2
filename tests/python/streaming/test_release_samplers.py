"""The runtime runs the release samplers exactly: an independent loop over the same network
(its own per-frame K/V store, no pages, no scheduler) gives the same latents.

The loop states the Self-Forcing release's inference: chunks of [c, c, …] or [1, c, c, …], at
each step x0 = x − σ·v(x, t_model) and re-noising to the next σ with fresh noise, the clean
chunk's K/V written by a pass at time 0 (or, with noisy context, by the last step), and a cache
of sink + window frames.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import crcm
from crcm.codec import PixelCodec
from crcm.sampling import SamplerConfig, get_preset
from crcm.wan.tiny import tiny_text_config

CFG = tiny_text_config().replace(frame_hw=(4, 4))


class RecordingCodec(PixelCodec):
    """A pixel codec that keeps the float latents it is asked to decode."""

    def __init__(self) -> None:
        super().__init__((8, 8), 1, 2)
        self.latents: list[torch.Tensor] = []

    def decode(self, x_B_T_C_H_W: torch.Tensor) -> torch.Tensor:
        self.latents.extend(x_B_T_C_H_W.float().clone())
        return super().decode(x_B_T_C_H_W.clamp(-1, 1))


def make_pipe(sampler: SamplerConfig) -> crcm.Pipeline:
    pipe = crcm.Pipeline.from_config(CFG, codec=RecordingCodec(), sampler=sampler, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pipe.model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return pipe


def runtime_latents(pipe: crcm.Pipeline, cond: torch.Tensor, frames: int) -> torch.Tensor:
    pipe.codec.latents.clear()
    with crcm.Runtime(pipe, max_streams=1, context_frames=32) as rt:
        rt.open(cond=cond, seed=7, max_frames=frames)
        rt.run_until_idle()
    return torch.cat(pipe.codec.latents)[:frames]


def reference_latents(pipe: crcm.Pipeline, cond: torch.Tensor, frames: int) -> torch.Tensor:
    sampler, model = pipe.sampler, pipe.model
    gen = torch.Generator().manual_seed(7)
    shape = (CFG.in_channels, *CFG.frame_hw)
    store: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # frame → per-layer (k, v)
    out, start, chunk = [], 0, 0

    def forward(x: torch.Tensor, t: float, keep: bool) -> torch.Tensor:
        n = x.shape[0]
        sink = [f for f in sorted(store) if f < sampler.sink_frames]
        recent = [f for f in sorted(store) if f >= sampler.sink_frames]
        if sampler.window_frames is not None:
            recent = [f for f in recent if f >= start - sampler.window_frames]
        context = sink + recent
        written: list[tuple[torch.Tensor, torch.Tensor]] = []

        def attn_fn(layer, q, k, v):
            written.append((k[0].clone(), v[0].clone()))
            ks = torch.cat([store[f][layer][0] for f in context] + [k[0]])
            vs = torch.cat([store[f][layer][1] for f in context] + [v[0]])
            o = F.scaled_dot_product_attention(
                q[0].transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1)
            )
            return o.transpose(0, 1)[None]

        with torch.no_grad():
            v = model(
                x[None],
                torch.full((1, n), t),
                frame_pos_B_T=torch.arange(start, start + n)[None],
                cond=cond[None],
                attention=attn_fn,
            )[0]
        if keep:
            per = CFG.tokens_per_frame
            for i in range(n):
                store[start + i] = [
                    (k[i * per : (i + 1) * per], w[i * per : (i + 1) * per]) for k, w in written
                ]
        return v

    while start < frames:
        n = sampler.chunk_frames_of(chunk)
        steps = sampler.steps_of(chunk)
        x = torch.randn((n, *shape), generator=gen)
        for i in range(steps):
            s = sampler.times[i]
            s_next = sampler.times[i + 1] if i + 1 < steps else 0.0
            t_model = sampler.model_time_of(i) if sampler.model_times else s
            last = i == steps - 1
            x0 = x - s * forward(x, t_model, keep=last and not sampler.cache_update)
            if s_next > 0:
                x = (1 - s_next) * x0 + s_next * torch.randn((n, *shape), generator=gen)
        if sampler.cache_update:
            forward(x0, 0.0, keep=True)
        out.append(x0)
        start, chunk = start + n, chunk + 1
    return torch.cat(out)[:frames]


CASES = {
    "self-forcing warped c3": get_preset("self-forcing"),
    "self-forcing unwarped c3": get_preset("self-forcing", warp=False),
    "self-forcing unwarped c1": get_preset("self-forcing", chunk_frames=1, warp=False),
    "self-forcing first frame alone": get_preset(
        "self-forcing", warp=False, independent_first_frame=True
    ),
    "self-forcing 2 steps, sink + window": get_preset("self-forcing", 2),
    "causal-rcm c1 1 step": get_preset("causal-rcm", 1),
    "causal-rcm c3 4 steps": get_preset("causal-rcm", 4, 3),
    "causal-rcm c3 noisy context": get_preset("causal-rcm", 2, 3, noisy_context=True),
}
WINDOWED = {"self-forcing 2 steps, sink + window", "causal-rcm c1 1 step"}


@pytest.mark.parametrize("name", list(CASES))
def test_the_runtime_runs_the_release_sampler(name: str) -> None:
    sampler = CASES[name]
    if name in WINDOWED:  # long enough that the window evicts frames
        sampler = replace(sampler, sink_frames=1, window_frames=3)
    pipe = make_pipe(sampler)
    cond = torch.randn(CFG.text_len, CFG.text_dim, generator=torch.Generator().manual_seed(3))
    frames = sampler.chunk_frames_of(0) + 3 * sampler.chunk_frames
    got = runtime_latents(pipe, cond, frames)
    expected = reference_latents(pipe, cond, frames)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_the_reference_would_see_a_wrong_network_time() -> None:
    """With unwarped steps the network's time is not σ: ignoring model_times changes frames."""
    sampler = get_preset("self-forcing", warp=False)
    pipe = make_pipe(sampler)
    cond = torch.randn(CFG.text_len, CFG.text_dim, generator=torch.Generator().manual_seed(3))
    expected = reference_latents(pipe, cond, 6)
    pipe.sampler = replace(sampler, model_times=None)
    wrong = runtime_latents(pipe, cond, 6)
    assert (wrong - expected).abs().max() > 1e-4
