"""Wan2.1-1.3B streaming on one GPU, end to end, beside the research loop it replaces.

Every row streams the same video twice in one process, with the same random weights and the
same noise: once through crcm's runtime (Rust scheduler, paged KV cache, Triton paged
attention, batched streams) and once through **the research loop**: one stream the way the
public Self-Forcing / Causal-rCM inference runs it — a dense contiguous KV cache tensor per
layer (``[1, frames·tokens_per_frame, heads, head_dim]``, written at the chunk's slot on every
forward), eager PyTorch, ``F.scaled_dot_product_attention`` (flash on GPU), chunk by chunk with
the same steps and the clean cache-update pass (or noisy context), then the same VAE decode.
Both call crcm's ``CausalDiT`` forward; only the attention callable and the loop around it
differ, and with fp32 weights their latents agree (to 1e-4 in ``tests/python/test_bench_wan.py``;
exactly, in practice, on a CPU).

Shapes (``get_config("wan2.1-1.3b")``): dim 1536, 30 layers, 12 heads × 128, 16 latent channels,
patch (1, 2, 2), text 512 × 4096, bf16, 832×480 video → 60×104 latents → 1,560 tokens per latent
frame. The VAE is diffusers' ``AutoencoderKLWan()`` (its defaults are Wan2.1's config) with
random weights in :class:`crcm.wan.vae.WanVAECodec`; the text condition is one cached random
embedding (``Runtime.open(cond=tokens)``: no text encoder). Random weights measure the real
speed: nothing here depends on their values (the DiT's zero-initialised output head gets random
weights so that every output depends on the attention).

Rows, most important first, until ``--budget-s`` is spent: c3-3 4-step end to end 1 stream,
c3-3 2-step, c1-1 1-step, 8 streams, DiT only, noisy context, … (``--list`` prints the plan).
Each stream generates ``--frames`` latent frames (default 21: an 81-frame video, the public
inference's length) with full causal context (no window), sampler ``causal-rcm`` (consistency
times; ``context`` clean = a time-0 cache-update pass after each chunk, noisy = the last
denoising step's K/V are kept). Row fields:

- ``model, steps, chunk, context, streams, vae`` (``vae``: the streaming VAE decode included;
  otherwise a pixel codec that only reshapes the latents: "DiT only");
- ``fps``: video frames emitted by all streams / wall time from opening the sessions to the last
  frame on the host (decoded frames actually emitted: 81 per stream with the VAE, latent frames
  without it);
- ``first_chunk_ms``: from open to a stream's first chunk of frames on the host (the slowest
  stream's); ``p50_chunk_ms`` / ``p99_chunk_ms``: the time between a stream's consecutive chunks;
- ``mfu``: analytic DiT FLOPs (:data:`FLOPS_FORMULA`) per second / the GPU's bf16 matmul peak
  measured in the same run (a large ``torch.matmul`` loop: ``peak_bf16_tflops_measured``);
  null on CPU;
- ``peak_mem_gb``: ``torch.cuda.max_memory_allocated`` over the timed run (weights included);
- ``baseline_fps`` / ``speedup``: the research loop's fps on the same settings and crcm's fps
  over it. ``baseline`` says what was compared: with N streams, N research runs one after
  another (one stream at a time, as that code serves them), i.e. its 1-stream fps;
- ``latent_max_abs_diff``: crcm's latents against the research loop's (1-stream rows, same
  seed): 0 in fp32 on a CPU; in bf16 the two attention kernels round differently;
- ``graphs`` / ``compiled``: CUDA graphs (not yet) / crcm's forwards under ``torch.compile``
  (``Runtime(compile=True)``: one graph per forward, the paged attention an opaque operator;
  its compilation is in the untimed warm-up). The research loop is always eager.

Timing: warm-up runs are not timed (a full-length one the first time a chunk size, stream count
and codec come up — Triton compiles a kernel variant per context split — and a 2-chunk one
otherwise; the research loop gets a 2-chunk one); ``torch.cuda.synchronize()`` before each timed
region, whose end is the last frame copied to the host. The JSON file is rewritten after every
row (``--out``, default ``benches/results/wan-e2e-<machine>.json``), so a run cut short keeps
what it measured; rows that do not fit the budget or the GPU's memory are listed in ``skipped``.

CLI::

    python benches/bench_wan.py [--tiny | --cpu] [--budget-s S] [--out FILE] [--frames N]
        [--steps 4,2,1] [--chunks 3,1] [--contexts clean,noisy] [--streams 1,8,4,16]
        [--vae both|on|off] [--max-rows N] [--no-baseline] [--seed N] [--list]

``--cpu``: a 36 M-parameter Wan-shaped DiT (:data:`CPU_CONFIG`: 8 layers of dim 512, Wan's text
tokens, 64 tokens per latent frame) in fp32 on the CPU, DiT only: where a CPU user's speed
against the research loop is measured (default budget 300 s; ``--vae off`` skips planning the
end-to-end rows).

``--tiny``: the same code path on CPU with tiny shapes (dim 64, 2 layers, 64×64 video, a tiny
``AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1])``) in fp32, default budget 30 s.
``crcm bench`` runs this module's rows when CUDA is present (``crcm.bench.run_wan_suite``).

Running it on a GPU machine (torch + Triton there, no network, maybe no diffusers)
--------------------------------------------------------------------------------
Build the abi3 wheel where Rust is, and gather the wheels the GPU machine lacks in ``wheels/``
(ignored by git; the VAE rows need diffusers, which needs importlib_metadata)::

    maturin build --release                       # → target/wheels/crcm-*-cp310-abi3-*.whl
    mkdir -p wheels && cp target/wheels/crcm-*.whl wheels/
    pip download diffusers importlib_metadata --no-deps -d wheels/

Build the wheel from the tree you measure: the run imports crcm from it. Carry ``wheels`` (the
device tool's ``carry=["wheels"]``, or copy the folder) and run, from the source tree's root, as
one command under a 600 s limit (the budget leaves ~3 minutes for setup and the last row)::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/*.whl \\
      && export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 benches/bench_wan.py --budget-s 420 --out $OUT/wan-e2e.json

(or ``pip install --no-deps wheels/*.whl`` into the machine's environment). Without diffusers the
DiT-only rows run and every VAE row is skipped with a note saying so (``notes``, ``skipped``).
Memory: one stream of 21 latent frames holds ~6 GB of KV cache in bf16 (and ~2 GB of VAE decoder
state end to end), so 8 streams need ~50–65 GB and 16 streams ~100 GB: a row whose estimate
does not fit the free memory is skipped, and one that runs out of memory anyway is recorded as
skipped with the error; a row that fails otherwise too, with the rows after it still run.
``--budget-s`` bounds when rows start, not model building (~10 s) or the row in flight (up to a
minute with 8 streams): give the command's own time limit a margin.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crcm.bench import GPU_PEAK_FLOPS, machine, machine_slug
from crcm.codec import Codec, PixelCodec, StreamingCodec
from crcm.models import CausalDiT, DiTConfig, get_config
from crcm.pipeline import Pipeline
from crcm.runtime import Runtime
from crcm.sampling import SamplerConfig, consistency_step, get_preset

MODEL = "wan2.1-1.3b"
WAN_FRAME_HW = (480, 832)  # video H × W: 60×104 latents, 30×52 = 1560 tokens per latent frame
TINY_FRAME_HW = (64, 64)  # 8×8 latents, 16 tokens per latent frame
DEFAULT_FRAMES = 21  # latent frames per stream: 81 video frames, the public inference's video
TINY_FRAMES = 6
DEFAULT_BUDGET_S = 480.0
TINY_BUDGET_S = 30.0
RESULTS = Path(__file__).resolve().parent / "results"

# --cpu: a Wan-shaped model a CPU streams in seconds (36 M parameters: 8 layers of dim 512,
# Wan's 512 × 4096 text tokens, 16 latent channels, 64 tokens per latent frame), fp32, DiT only.
CPU_CONFIG = DiTConfig(
    in_channels=16,
    out_channels=16,
    dim=512,
    num_layers=8,
    num_heads=8,
    ffn_dim=1536,
    frame_hw=(16, 16),
    patch=(1, 2, 2),
    freq_dim=256,
    cond="text",
    text_dim=4096,
    text_len=512,
)
CPU_BUDGET_S = 300.0

TINY_CONFIG = DiTConfig(
    in_channels=16,
    out_channels=16,
    dim=64,
    num_layers=2,
    num_heads=2,
    ffn_dim=128,
    frame_hw=(8, 8),
    patch=(1, 2, 2),
    freq_dim=32,
    cond="text",
    text_dim=32,
    text_len=16,
)
TINY_VAE = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}

FLOPS_FORMULA = (
    "One DiT forward over T latent frames: Lq = T·tpf query tokens, Lkv = Lq + context tokens, "
    "d = dim, N = layers, F = ffn_dim, Lt × Dt = text tokens × text dim, P = channels·pt·ph·pw: "
    "2·Lq·P·d (patch embedding) + 2·Lt·(Dt·d + d²) (text embedding, every forward) + "
    "N·[2·Lq·4d² (q, k, v, o) + 4·Lq·Lkv·d (QKᵀ and PV, 2·Lq·Lkv·head_dim each per head) + "
    "2·Lq·2d² + 2·Lt·2d² + 4·Lq·Lt·d (cross-attention) + 2·Lq·2·d·F (FFN)] + 2·Lq·d·P (head) "
    "+ 2·T·(freq_dim·d + d² + 6d²) (time embedding and projection, per frame); norms, RoPE, "
    "softmax and the elementwise modulation are left out. A chunk costs `steps` forwards (+1 "
    "cache-update pass with clean context), each with the context of every earlier frame; a "
    "video sums its chunks. Linear layers count 2·in·out per token."
)

RESEARCH = "research loop: dense KV cache per layer, eager PyTorch, SDPA, one stream"


# -- FLOPs -------------------------------------------------------------------------------------


def forward_flops(cfg: DiTConfig, frames: int, context_frames: int) -> float:
    """Analytic FLOPs of one forward over ``frames`` latent frames attending to
    ``context_frames`` earlier ones (:data:`FLOPS_FORMULA`)."""
    tpf = cfg.tokens_per_frame
    d, n_layers, ffn = cfg.dim, cfg.num_layers, cfg.ffn_dim
    lq = frames * tpf
    lkv = lq + context_frames * tpf
    patch_values = cfg.in_channels * math.prod(cfg.patch)
    out_values = cfg.out_channels * math.prod(cfg.patch)
    lt, dt = (cfg.text_len, cfg.text_dim) if cfg.cond == "text" else (0, 0)
    flops = 2 * lq * patch_values * d + 2 * lq * d * out_values
    flops += 2 * frames * (cfg.freq_dim * d + d * d + d * 6 * d)  # time embedding, per frame
    if lt:
        flops += 2 * lt * (dt * d + d * d)
    per_layer = 2 * lq * 4 * d * d + 4 * lq * lkv * d + 2 * lq * 2 * d * ffn
    if lt:
        per_layer += 2 * lq * 2 * d * d + 2 * lt * 2 * d * d + 4 * lq * lt * d
    return float(flops + n_layers * per_layer)


def chunk_sizes(sampler: SamplerConfig, frames: int) -> list[int]:
    """The latent frames of each chunk of a ``frames``-frame stream."""
    sizes, done = [], 0
    while done < frames:
        sizes.append(sampler.chunk_frames_of(len(sizes)))
        done += sizes[-1]
    if done != frames:
        raise ValueError(f"{frames} latent frames are not whole chunks of {sizes[-1]}")
    return sizes


def video_flops(cfg: DiTConfig, sampler: SamplerConfig, frames: int) -> float:
    """DiT FLOPs of one stream of ``frames`` latent frames (full causal context)."""
    total, start = 0.0, 0
    for k, size in enumerate(chunk_sizes(sampler, frames)):
        forwards = sampler.steps_of(k) + (1 if sampler.cache_update else 0)
        total += forwards * forward_flops(cfg, size, start)
        start += size
    return total


# -- setup -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSpec:
    """One row's settings."""

    chunk: int  # 3: c3-3, 1: c1-1
    steps: int
    context: str  # "clean" | "noisy"
    streams: int
    vae: bool
    compiled: bool = False  # crcm's forwards under torch.compile (Runtime(compile=True))

    @property
    def sampler_name(self) -> str:
        return f"causal-rcm c{self.chunk}-{self.chunk}"

    def describe(self) -> str:
        return (
            f"c{self.chunk}-{self.chunk} {self.steps}-step {self.context:>5} "
            f"{self.streams:>2} stream{'s' if self.streams > 1 else ' '} "
            f"{'e2e' if self.vae else 'dit'}{' compiled' if self.compiled else ''}"
        )


def sampler_for(spec: RowSpec) -> SamplerConfig:
    """The ``causal-rcm`` preset: full context (no sink or window)."""
    return get_preset(
        "causal-rcm", spec.steps, chunk_frames=spec.chunk, noisy_context=spec.context == "noisy"
    )


@dataclass
class Setup:
    """The model, codecs and condition every row shares."""

    cfg: DiTConfig
    model: CausalDiT
    tokens: torch.Tensor  # the cached text embedding [text_len, text_dim], on the device
    pixel_codec: PixelCodec  # DiT-only rows: latents reshaped to pixels, nothing else
    vae_codec: Codec | None  # end-to-end rows: the streaming Wan VAE (None: not available)
    vae_note: str
    device: torch.device
    dtype: torch.dtype
    tiny: bool
    name: str  # the model's name in the rows
    vae_state_bytes: int = 0  # one stream's decoder state, once measured

    def codec(self, vae: bool) -> Codec:
        if vae:
            if self.vae_codec is None:
                raise RuntimeError(self.vae_note)
            return self.vae_codec
        return self.pixel_codec

    def pipeline(self, spec: RowSpec) -> Pipeline:
        return Pipeline(
            model=self.model, codec=self.codec(spec.vae), sampler=sampler_for(spec), name=MODEL
        )

    @property
    def tokens_per_frame(self) -> int:
        return self.cfg.tokens_per_frame


def load_vae_codec(
    tiny: bool, frame_hw: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> tuple[Codec | None, str]:
    """The streaming Wan VAE with random weights, or None and why not (no diffusers)."""
    try:
        importlib.import_module("diffusers")
        from diffusers import AutoencoderKLWan

        from crcm.wan.vae import WanVAECodec
    except ImportError as err:
        return None, (
            f"VAE rows skipped: diffusers is not importable ({err}). Carry its wheel: "
            "`pip download diffusers importlib_metadata --no-deps -d wheels/` where there is "
            "network, then `pip install --no-index --no-deps wheels/*.whl` here"
        )
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # no "modules to keep in float32: []" notice
    try:
        vae = AutoencoderKLWan(**TINY_VAE) if tiny else AutoencoderKLWan()  # on the CPU: ~127M
        vae = vae.to(device, dtype).eval().requires_grad_(False)
        codec = WanVAECodec(vae, frame_hw)
    except Exception as err:  # the DiT-only rows can still run
        return None, f"VAE rows skipped: building the VAE failed: {type(err).__name__}: {err}"
    finally:
        diffusers_logging.set_verbosity(verbosity)
    what = (
        f"AutoencoderKLWan({TINY_VAE}), random weights"
        if tiny
        else "AutoencoderKLWan() (diffusers' defaults: Wan2.1's VAE config), random weights"
    )
    return codec, what


def build_setup(
    *,
    tiny: bool = False,
    cpu: bool = False,
    device: torch.device | str | None = None,
    seed: int = 0,
    vae: bool = True,
) -> Setup:
    """Random weights of the real sizes in bf16 on the GPU, or the tiny ones (``tiny``) or the
    36 M-parameter Wan-shaped ones (``cpu``: :data:`CPU_CONFIG`, no VAE) in fp32 on the CPU;
    ``vae=False``: no VAE (DiT-only rows)."""
    on_cpu = tiny or cpu
    device = torch.device(device or ("cpu" if on_cpu else "cuda"))
    dtype = torch.float32 if on_cpu else torch.bfloat16
    cfg = TINY_CONFIG if tiny else CPU_CONFIG if cpu else get_config(MODEL)
    frame_hw = TINY_FRAME_HW if tiny else WAN_FRAME_HW
    name = "tiny-wan" if tiny else "wan-shaped-36m" if cpu else MODEL
    torch.manual_seed(seed)
    with torch.device(device):  # built in place: 1.3B parameters are not initialised on a CPU
        model = CausalDiT(cfg)
    with torch.no_grad():
        # Wan's output head starts at zero (v = 0 whatever the input); random values make every
        # output depend on the whole network, so the crcm/research comparison means something.
        torch.nn.init.normal_(model.head.head.weight, std=cfg.dim**-0.5)
    model = model.to(dtype).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = (0.1 * torch.randn(cfg.text_len, cfg.text_dim, generator=gen)).to(device, dtype)
    # 16 channels at 1/4 scale of a grayscale frame: crcm's default pixel codec for the config.
    lh, lw = cfg.frame_hw
    pixel = PixelCodec((lh * 4, lw * 4), 1, 4)
    if cpu:
        codec, note = None, "VAE rows skipped: --cpu measures the DiT only"
    elif vae:
        codec, note = load_vae_codec(tiny, frame_hw, device, dtype)
    else:
        codec, note = None, "no VAE"
    return Setup(cfg, model, tokens, pixel, codec, note, device, dtype, tiny, name)


# -- the two ways of streaming -----------------------------------------------------------------


@dataclass
class RunResult:
    """One timed run: what came out and when."""

    elapsed_s: float
    frames: int  # display frames emitted, all streams
    first_chunk_ms: float
    chunk_gaps_ms: list[float]
    peak_mem_gb: float | None
    latents: list[torch.Tensor] = field(default_factory=list)  # stream 0's chunks, if recorded


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2)


def display_frames(codec: Codec, latent_frames: int) -> int:
    """Video frames ``latent_frames`` decode to (Wan's VAE: 1 + 4·(n − 1))."""
    td = codec.temporal_downsample
    if getattr(codec, "first_frame_alone", False):
        return 1 + td * (latent_frames - 1)
    return td * latent_frames


@contextlib.contextmanager
def recording(codec: Codec, into: list[torch.Tensor] | None) -> Iterator[None]:
    """Keeps the latents the runtime hands to the codec (a one-stream run: its chunks)."""
    if into is None:
        yield
        return
    streaming = isinstance(codec, StreamingCodec)
    name = "decode_streams" if streaming else "decode"
    original = getattr(codec, name)

    if streaming:

        def wrapped(chunks, states):
            into.extend(chunks)
            return original(chunks, states)

    else:

        def wrapped(x):
            into.extend(x.unbind(0))
            return original(x)

    setattr(codec, name, wrapped)
    try:
        yield
    finally:
        delattr(codec, name)  # the class's method again


def run_crcm(
    setup: Setup, spec: RowSpec, frames: int, *, seed: int = 0, record: bool = False
) -> RunResult:
    """``spec.streams`` sessions of ``frames`` latent frames each through crcm's runtime."""
    pipe = setup.pipeline(spec)
    codec = pipe.codec
    total = display_frames(codec, frames)
    dev = setup.device
    runtime = Runtime(
        pipe,
        max_streams=spec.streams,
        context_frames=frames,
        device=dev,
        compile=spec.compiled,
    )
    latents: list[torch.Tensor] | None = [] if record and spec.streams == 1 else None
    try:
        _sync(dev)
        _reset_peak(dev)
        with recording(codec, latents):
            t0 = time.perf_counter()
            sessions = [
                runtime.open(
                    sampler=pipe.sampler,
                    cond=setup.tokens,
                    seed=seed + i,
                    max_frames=total,
                    buffer_frames=total + 8,
                    backpressure="drop_oldest",
                )
                for i in range(spec.streams)
            ]
            emitted = [0] * spec.streams
            last: list[float | None] = [None] * spec.streams
            first: list[float] = []
            gaps: list[float] = []
            while runtime.step():
                now = time.perf_counter()  # a chunk's frames are on the host when step returns
                for i, session in enumerate(sessions):
                    got = len(session.read())
                    if got:
                        emitted[i] += got
                        if last[i] is None:
                            first.append(now - t0)
                        else:
                            gaps.append(now - last[i])
                        last[i] = now
            _sync(dev)
            elapsed = max(t for t in last if t is not None) - t0
        peak = _peak_gb(dev)
    finally:
        runtime.close()
    if sum(emitted) != total * spec.streams:
        raise RuntimeError(f"crcm emitted {emitted} frames, expected {total} per stream")
    return RunResult(
        elapsed,
        sum(emitted),
        1e3 * max(first),
        [1e3 * g for g in gaps],
        peak,
        latents or [],
    )


@torch.inference_mode()
def run_research(
    setup: Setup, spec: RowSpec, frames: int, *, seed: int = 0, record: bool = False
) -> RunResult:
    """One stream the way the public Self-Forcing / Causal-rCM inference runs it.

    A dense KV cache per layer, ``[1, frames·tpf, heads, head_dim]``, zero-filled once; every
    forward writes its chunk's K/V at the chunk's slot and attends (SDPA) over the cache up to
    the chunk's end — so the last forward of a chunk (the clean cache-update pass, or with noisy
    context the last denoising step) leaves its K/V for the chunks after it. Same noise order
    as crcm's executor: a chunk's initial noise, then one draw per re-noising.
    """
    model, cfg = setup.model, setup.cfg
    codec = setup.codec(spec.vae)
    sampler = sampler_for(spec)
    dev, dtype = setup.device, setup.dtype
    tpf = cfg.tokens_per_frame
    c, (h, w) = cfg.in_channels, cfg.frame_hw
    heads, head_dim = cfg.num_heads, cfg.head_dim
    cond = setup.tokens[None].to(dev, model.null_text.dtype)
    shape = (1, frames * tpf, heads, head_dim)
    k_cache = [torch.zeros(shape, device=dev, dtype=dtype) for _ in range(cfg.num_layers)]
    v_cache = [torch.zeros(shape, device=dev, dtype=dtype) for _ in range(cfg.num_layers)]
    span = [0, 0]  # the chunk's token slots in the cache

    def attn_fn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a, b = span
        k_cache[layer][:, a:b] = k
        v_cache[layer][:, a:b] = v
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k_cache[layer][:, :b].transpose(1, 2),
            v_cache[layer][:, :b].transpose(1, 2),
        )
        return o.transpose(1, 2)

    # The scheduler hands times to the executor as float32: the same values here.
    times = [float(np.float32(t)) for t in sampler.times]
    streaming = isinstance(codec, StreamingCodec)
    gen = torch.Generator().manual_seed(seed)
    latents: list[torch.Tensor] = []
    emitted, first, gaps = 0, 0.0, []
    _sync(dev)
    _reset_peak(dev)
    t0 = time.perf_counter()
    decoder = codec.open_stream() if streaming else None
    last = None
    start = 0
    for k, size in enumerate(chunk_sizes(sampler, frames)):
        steps = sampler.steps_of(k)
        pos = torch.arange(start, start + size, device=dev)[None]
        span[:] = [start * tpf, (start + size) * tpf]
        x = torch.randn((size, c, h, w), generator=gen).to(dev, dtype)
        for i in range(steps):
            s, s_next = times[i], times[i + 1] if i + 1 < steps else 0.0
            s_model = float(np.float32(sampler.model_time_of(i)))
            t = torch.full((1, size), s_model, device=dev)
            v = model(x[None], t, frame_pos_B_T=pos, cond=cond, attention=attn_fn)[0]
            if s_next > 0:
                noise = torch.randn((size, c, h, w), generator=gen).to(dev, dtype)
            else:
                noise = torch.zeros_like(x)
            x0, x = consistency_step(x, v, s, s_next, noise)
        if record:
            latents.append(x0)
        # The executor's decode calls, for one stream.
        decoded = codec.decode_streams([x0], [decoder]) if streaming else codec.decode(x0[None])
        emitted += len(decoded[0].cpu().numpy())
        now = time.perf_counter()
        if last is None:
            first = now - t0
        else:
            gaps.append(now - last)
        last = now
        if sampler.cache_update:  # the clean pass at s = 0 writes the chunk's K/V
            t = torch.zeros((1, size), device=dev)
            model(x0[None], t, frame_pos_B_T=pos, cond=cond, attention=attn_fn)
        start += size
    _sync(dev)
    elapsed = last - t0
    if streaming and setup.vae_state_bytes == 0:
        setup.vae_state_bytes = int(codec.state_nbytes(decoder))
    return RunResult(elapsed, emitted, 1e3 * first, [1e3 * g for g in gaps], _peak_gb(dev), latents)


def latent_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float | None:
    """Largest absolute difference of two runs' latents (chunk by chunk), None if not both."""
    if not a or not b or len(a) != len(b):
        return None
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


# -- the machine -------------------------------------------------------------------------------


def driver_version() -> str | None:
    """The NVIDIA driver's version (NVML, else nvidia-smi), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0] or None
    except Exception:
        return None


def machine_info(device: torch.device) -> dict[str, object]:
    info = machine()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 1e9, 1),
            compute_capability=f"{props.major}.{props.minor}",
            driver=driver_version(),
            cuda=torch.version.cuda,
        )
    return info


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float | None:
    """The GPU's bf16 matmul FLOP/s, measured: the best of 3 timed loops of ``n``³ matmuls."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(5):
        torch.matmul(a, b, out=out)
    best = 0.0
    iters = 30
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        end.record()
        torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * iters / (start.elapsed_time(end) / 1e3))
    del a, b, out
    torch.cuda.empty_cache()
    return best


# -- rows --------------------------------------------------------------------------------------

# Most important first: the headline (c3-3 4-step, end to end, one stream), fewer steps, c1-1,
# many streams, the DiT alone, noisy context; then the rest of the grid.
PRIORITY = (
    RowSpec(3, 4, "clean", 1, True),
    RowSpec(3, 2, "clean", 1, True),
    RowSpec(1, 1, "clean", 1, True),
    RowSpec(3, 4, "clean", 8, True),
    RowSpec(3, 4, "clean", 1, False),
    RowSpec(3, 4, "noisy", 1, True),
    RowSpec(3, 1, "clean", 1, True),
    RowSpec(1, 1, "clean", 8, True),
    RowSpec(3, 2, "clean", 8, True),
    RowSpec(1, 1, "noisy", 1, True),
    RowSpec(3, 2, "clean", 1, False),
    RowSpec(1, 1, "clean", 1, False),
    RowSpec(3, 4, "clean", 16, False),
    RowSpec(3, 4, "clean", 4, True),
)


def plan_rows(
    *,
    steps: Sequence[int] = (4, 2, 1),
    chunks: Sequence[int] = (3, 1),
    contexts: Sequence[str] = ("clean", "noisy"),
    streams: Sequence[int] = (1, 8, 4, 16),
    vae: Sequence[bool] = (True, False),
    compiles: Sequence[bool] = (False, True),
) -> list[RowSpec]:
    """Every combination, :data:`PRIORITY` rows first (each eager, then compiled: the change
    measured beside its baseline), then end to end before DiT only, then by stream count,
    chunk, steps and context in the order given, eager before compiled."""
    grid = [
        RowSpec(c, n, ctx, s, v, comp)
        for comp in compiles
        for v in vae
        for s in streams
        for c in chunks
        for n in steps
        for ctx in contexts
    ]
    wanted = set(grid)
    first = [replace(r, compiled=comp) for r in PRIORITY for comp in compiles]
    first = [r for r in first if r in wanted]
    return first + [r for r in grid if r not in first]


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(float(x), digits)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def make_row(
    setup: Setup,
    spec: RowSpec,
    frames: int,
    crcm: RunResult,
    base: RunResult | None,
    peak_flops: float | None,
    diff: float | None,
) -> dict[str, object]:
    sampler = sampler_for(spec)
    flops = video_flops(setup.cfg, sampler, frames) * spec.streams
    fps = crcm.frames / crcm.elapsed_s
    mfu = None if peak_flops is None else flops / crcm.elapsed_s / peak_flops
    row: dict[str, object] = {
        "model": setup.name,
        "sampler": spec.sampler_name,
        "steps": spec.steps,
        "chunk": spec.chunk,
        "context": spec.context,
        "streams": spec.streams,
        "vae": spec.vae,
        "fps": round(fps, 2),
        "first_chunk_ms": round(crcm.first_chunk_ms, 2),
        "p50_chunk_ms": _pct(crcm.chunk_gaps_ms, 50),
        "p99_chunk_ms": _pct(crcm.chunk_gaps_ms, 99),
        "mfu": _round(mfu, 4),
        "peak_mem_gb": crcm.peak_mem_gb,
        "baseline_fps": None,
        "speedup": None,
        "graphs": False,
        "compiled": spec.compiled,
        "baseline": None,
        "latent_frames_per_stream": frames,
        "video_frames_per_stream": crcm.frames // spec.streams,
        "tokens_per_frame": setup.tokens_per_frame,
        "dit_tflop": round(flops / 1e12, 3),
        "elapsed_s": round(crcm.elapsed_s, 3),
        "latent_max_abs_diff": None if diff is None else float(f"{diff:.3g}"),
    }
    if base is not None:
        base_fps = base.frames / base.elapsed_s
        one_flops = video_flops(setup.cfg, sampler, frames)
        row.update(
            baseline_fps=round(base_fps, 2),
            speedup=round(fps / base_fps, 2),
            baseline=RESEARCH
            if spec.streams == 1
            else f"{spec.streams} sequential runs of the {RESEARCH} (its 1-stream fps)",
            baseline_first_chunk_ms=round(base.first_chunk_ms, 2),
            baseline_p50_chunk_ms=_pct(base.chunk_gaps_ms, 50),
            baseline_p99_chunk_ms=_pct(base.chunk_gaps_ms, 99),
            baseline_mfu=None
            if peak_flops is None
            else round(one_flops / base.elapsed_s / peak_flops, 4),
            baseline_peak_mem_gb=base.peak_mem_gb,
        )
    return row


def format_row(row: dict[str, object]) -> str:
    text = (
        f"{row['sampler']} {row['steps']}-step {row['context']:>5} streams={row['streams']:>2} "
        f"{'e2e' if row['vae'] else 'dit'}{' compiled' if row.get('compiled') else ''}  "
        f"{row['fps']:>8} frames/s  first chunk "
        f"{row['first_chunk_ms']} ms  p50 {row['p50_chunk_ms']} ms  p99 {row['p99_chunk_ms']} ms"
    )
    if row.get("mfu") is not None:
        text += f"  MFU {row['mfu']:.1%}"
    if row.get("peak_mem_gb") is not None:
        text += f"  {row['peak_mem_gb']} GB"
    if row.get("speedup") is not None:
        text += f"  research {row['baseline_fps']} frames/s → {row['speedup']}x"
    if row.get("latent_max_abs_diff") is not None:
        text += f"  |Δ| {row['latent_max_abs_diff']:.2g}"
    return text


def _write(path: Path, record: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _kv_bytes(setup: Setup, spec: RowSpec, frames: int) -> int:
    """crcm's paged KV cache for the row (pages padded to 16 tokens), K and V."""
    cfg = setup.cfg
    page = -(-cfg.tokens_per_frame // 16) * 16
    elem = torch.finfo(setup.dtype).bits // 8
    return spec.streams * frames * page * cfg.num_layers * 2 * cfg.dim * elem


def run_benchmark(
    *,
    tiny: bool = False,
    cpu: bool = False,
    frames: int | None = None,
    budget_s: float | None = None,
    out: Path | str | None = None,
    rows: Sequence[RowSpec] | None = None,
    max_rows: int | None = None,
    baseline: bool = True,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Runs the rows in order within ``budget_s`` seconds (from the call), writing the JSON
    record to ``out`` after every row; returns the record."""
    threads = torch.get_num_threads()
    if tiny:
        # Tiny shapes are too small to share between threads: on a busy CPU two threads are
        # several times slower than one (their barriers wait on the other jobs).
        torch.set_num_threads(1)
    try:
        return _run_benchmark(
            tiny=tiny,
            cpu=cpu,
            frames=frames,
            budget_s=budget_s,
            out=out,
            rows=rows,
            max_rows=max_rows,
            baseline=baseline,
            seed=seed,
            progress=progress,
            log=log,
        )
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(
    *,
    tiny: bool,
    cpu: bool,
    frames: int | None,
    budget_s: float | None,
    out: Path | str | None,
    rows: Sequence[RowSpec] | None,
    max_rows: int | None,
    baseline: bool,
    seed: int,
    progress: bool,
    log: Callable[[str], None] | None,
) -> dict[str, object]:
    t_start = time.perf_counter()
    log = log or ((lambda text: print(text, flush=True)) if progress else (lambda text: None))
    if not (tiny or cpu) and not torch.cuda.is_available():
        raise RuntimeError(
            "bench_wan needs a CUDA GPU for the real shapes; use --cpu or --tiny on a CPU"
        )
    default_budget = TINY_BUDGET_S if tiny else CPU_BUDGET_S if cpu else DEFAULT_BUDGET_S
    budget = float(budget_s if budget_s is not None else default_budget)
    frames = int(frames or (TINY_FRAMES if tiny else DEFAULT_FRAMES))
    rows = list(rows if rows is not None else plan_rows())
    if max_rows is not None:
        rows = rows[:max_rows]
    for spec in rows:
        chunk_sizes(sampler_for(spec), frames)  # whole chunks, or refuse before any work

    setup = build_setup(tiny=tiny, cpu=cpu, seed=seed, vae=any(spec.vae for spec in rows))
    info = machine_info(setup.device)
    out = Path(out) if out is not None else RESULTS / f"wan-e2e-{machine_slug(info)}.json"
    peak = measure_matmul_peak(setup.device, setup.dtype)
    vendor = next((v for k, v in GPU_PEAK_FLOPS.items() if k in str(info.get("gpu", ""))), None)
    record: dict[str, object] = {
        "benchmark": "wan-e2e",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": "tiny" if tiny else "cpu" if cpu else "gpu",
        "machine": info,
        "settings": {
            "model": setup.name,
            "config": asdict(setup.cfg),
            "video_hw": None if cpu else list(TINY_FRAME_HW if tiny else WAN_FRAME_HW),
            "latent_frames_per_stream": frames,
            "tokens_per_frame": setup.tokens_per_frame,
            "dtype": str(setup.dtype).removeprefix("torch."),
            "sampler": "causal-rcm preset (consistency times), full causal context",
            "vae": setup.vae_note,
            "text": "one cached random embedding (Runtime.open(cond=tokens)), no text encoder",
            "dit_only_codec": "PixelCodec(patch 4): latents reshaped to grayscale pixels",
            "weights": "random (speed does not depend on their values)",
            "budget_s": budget,
            "seed": seed,
            "warmup": "untimed: a full-length crcm run per (chunk, streams, codec) first seen, "
            "else 2 chunks; the research loop 2 chunks",
        },
        "peak_bf16_tflops_measured": _round(None if peak is None else peak / 1e12, 1),
        "peak_tflops_vendor": None if vendor is None else vendor / 1e12,
        "flops_formula": FLOPS_FORMULA,
        "notes": [] if setup.vae_codec is not None else [setup.vae_note],
        "rows": [],
        "skipped": [],
        "complete": False,
    }
    log(
        f"bench_wan: {record['settings']['model']} on {info.get('gpu') or info.get('cpu')}, "
        f"{frames} latent frames per stream, budget {budget:.0f} s, {len(rows)} rows planned"
        + (f", matmul peak {peak / 1e12:.0f} TFLOP/s" if peak else "")
    )
    if setup.vae_codec is None:
        log(setup.vae_note)
    _write(out, record)

    baselines: dict[tuple, RunResult] = {}
    warmed: set[tuple] = set()
    row_cost: dict[bool, tuple[float, int, int]] = {}  # vae -> (seconds, streams, steps)

    def skip(spec: RowSpec, reason: str, *, quiet: bool = False) -> None:
        record["skipped"].append({**asdict(spec), "reason": reason})
        if not quiet:
            log(f"skipped {spec.describe()}: {reason}")

    for n, spec in enumerate(rows):
        elapsed = time.perf_counter() - t_start
        if elapsed >= budget:
            for rest in rows[n:]:
                record["skipped"].append({**asdict(rest), "reason": "time budget spent"})
            log(f"time budget spent ({elapsed:.0f} of {budget:.0f} s): {len(rows) - n} rows left")
            break
        if spec.vae and setup.vae_codec is None:
            skip(spec, setup.vae_note, quiet=True)  # said once, at the start
            _write(out, record)
            continue
        if spec.vae in row_cost:  # scaled from the last row of the same kind
            sec, s0, n0 = row_cost[spec.vae]
            estimate = sec * (spec.streams + 1) / (s0 + 1) * (spec.steps + 1) / (n0 + 1)
            if (spec.chunk, spec.streams, spec.vae, spec.compiled) not in warmed:
                estimate *= 2  # a full-length warm-up first
            if elapsed + estimate > budget:
                left = budget - elapsed
                skip(spec, f"time budget: ~{estimate:.0f} s needed, {left:.0f} s left", quiet=True)
                _write(out, record)
                continue
        if setup.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(setup.device)
            need = _kv_bytes(setup, spec, frames) + spec.streams * setup.vae_state_bytes * spec.vae
            if need > 0.9 * free:
                gb = f"~{need / 1e9:.0f} GB of KV cache and decoder state, {free / 1e9:.0f} free"
                skip(spec, f"memory: {gb}")
                _write(out, record)
                continue
        t_row = time.perf_counter()
        error = None
        try:
            key = (spec.chunk, spec.streams, spec.vae, spec.compiled)
            full_warmup = key not in warmed
            warm_frames = frames if full_warmup else min(frames, 2 * spec.chunk)
            t_warm = time.perf_counter()
            run_crcm(setup, spec, _whole(spec, warm_frames), seed=seed)
            _free()  # a runtime's sessions and it refer to each other: gc frees its KV cache
            warm_s = time.perf_counter() - t_warm if full_warmup else 0.0
            warmed.add(key)
            record_latents = spec.streams == 1
            crcm = run_crcm(setup, spec, frames, seed=seed, record=record_latents)
            _free()
            bkey = (spec.chunk, spec.steps, spec.context, spec.vae)
            one = RowSpec(spec.chunk, spec.steps, spec.context, 1, spec.vae)  # eager, as research
            if baseline and bkey not in baselines:
                run_research(setup, one, _whole(spec, min(frames, 2 * spec.chunk)), seed=seed)
                _free()
                baselines[bkey] = run_research(setup, one, frames, seed=seed, record=True)
                _free()
            base = baselines.get(bkey)
            diff = latent_diff(crcm.latents, base.latents) if base and record_latents else None
            row = make_row(setup, spec, frames, crcm, base, peak, diff)
            row["row_s"] = round(time.perf_counter() - t_row, 1)
        except torch.cuda.OutOfMemoryError as err:
            error = f"out of memory: {str(err).splitlines()[0][:200]}"
        except Exception as err:  # one row's failure must not cost the rows after it
            error = f"{type(err).__name__}: {err}"[:500]
            log("".join(traceback.format_exception(err)))
        if error is not None:
            _free()
            skip(spec, error)
            _write(out, record)
            continue
        crcm = None  # stream 0's latents
        _free()
        # The cost of a row whose kind is warm already, for the estimates of later rows.
        row_cost[spec.vae] = (time.perf_counter() - t_row - warm_s, spec.streams, spec.steps)
        record["rows"].append(row)
        record["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        _write(out, record)
        log(format_row(row))

    record["complete"] = True
    record["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    _write(out, record)
    log(f"wrote {out} ({len(record['rows'])} rows, {len(record['skipped'])} skipped)")
    return record


def _whole(spec: RowSpec, frames: int) -> int:
    """``frames`` rounded up to whole chunks."""
    return -(-frames // spec.chunk) * spec.chunk


# -- CLI ---------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 4,2,1, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _contexts(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values or any(v not in ("clean", "noisy") for v in values):
        raise argparse.ArgumentTypeError(f"contexts are clean and/or noisy, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_wan.py",
        description="Wan2.1-1.3B streaming (crcm vs the research loop), rows written as they go.",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU in fp32")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="a 36M-parameter Wan-shaped DiT on CPU in fp32 (8 layers of dim 512, 64 tokens per "
        "latent frame), DiT only",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        help=f"seconds for the rows ({DEFAULT_BUDGET_S:.0f}; tiny {TINY_BUDGET_S:.0f})",
    )
    parser.add_argument("--out", type=Path, help="JSON file (benches/results/wan-e2e-<machine>)")
    parser.add_argument(
        "--frames", type=int, help=f"latent frames per stream ({DEFAULT_FRAMES}; tiny 6)"
    )
    parser.add_argument("--steps", type=_ints, default=(4, 2, 1), help="steps per chunk (4,2,1)")
    parser.add_argument("--chunks", type=_ints, default=(3, 1), help="chunk frames: 3, 1 (3,1)")
    parser.add_argument("--contexts", type=_contexts, default=("clean", "noisy"))
    parser.add_argument("--streams", type=_ints, default=(1, 8, 4, 16), help="(1,8,4,16)")
    parser.add_argument(
        "--vae", choices=("both", "on", "off"), default="both", help="end to end, DiT only, both"
    )
    parser.add_argument(
        "--compile",
        choices=("both", "on", "off"),
        default="both",
        help="crcm's forwards compiled (torch.compile), eager, or both (both)",
    )
    parser.add_argument("--max-rows", type=int, help="stop after this many rows of the plan")
    parser.add_argument("--no-baseline", action="store_true", help="skip the research loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the planned rows and exit")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if any(c not in (1, 3) for c in args.chunks) or any(n > 4 for n in args.steps):
        raise SystemExit("chunks are 1 or 3 and steps 1 to 4 (the causal-rcm presets)")
    vae = {"both": (True, False), "on": (True,), "off": (False,)}[args.vae]
    compiles = {"both": (False, True), "on": (True,), "off": (False,)}[args.compile]
    rows = plan_rows(
        steps=args.steps,
        chunks=args.chunks,
        contexts=args.contexts,
        streams=args.streams,
        vae=vae,
        compiles=compiles,
    )
    if args.max_rows is not None:
        rows = rows[: args.max_rows]
    if args.list:
        for i, spec in enumerate(rows, 1):
            print(f"{i:>3}. {spec.describe()}")
        return 0
    if not (args.tiny or args.cpu) and not torch.cuda.is_available():
        print(
            "bench_wan.py: no CUDA GPU here; run it on one, or try --cpu or --tiny",
            file=sys.stderr,
        )
        return 2
    frames = args.frames or (TINY_FRAMES if args.tiny else DEFAULT_FRAMES)
    try:
        for spec in rows:
            chunk_sizes(sampler_for(spec), frames)
    except ValueError as err:
        print(f"bench_wan.py: --frames {frames}: {err}", file=sys.stderr)
        return 2
    run_benchmark(
        tiny=args.tiny,
        cpu=args.cpu,
        frames=args.frames,
        budget_s=args.budget_s,
        out=args.out,
        rows=rows,
        baseline=not args.no_baseline,
        seed=args.seed,
        progress=not args.quiet,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
