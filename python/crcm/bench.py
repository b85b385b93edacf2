"""Streaming benchmarks: frames/s, first-frame latency, per-frame latency and scheduler cost.

Every figure comes from a real run on this machine, written with the machine's description.
One row per setting::

    {"model", "steps", "chunk", "context", "streams", "fps", "first_frame_ms", "p50_frame_ms",
     "p99_frame_ms", "tick_us", "mfu"}

- ``context``: ``"clean"`` (a time-0 cache-update pass after each chunk: steps + 1 forwards
  per chunk) or ``"noisy"`` (the last denoising step's K/V are kept: steps forwards);

- ``fps``: frames emitted by all streams per second of wall time in steady state;
- ``first_frame_ms``: a new session, from ``open`` to its first decoded frame (its first chunk);
- ``p50/p99_frame_ms``: per stream, the time between consecutive frame emissions (a chunk's
  frames arrive together; the gap is spread over them);
- ``tick_us``: runtime overhead per plan (Rust tick + complete through PyO3);
- ``mfu``: model FLOP utilisation on a GPU (analytic FLOPs / time / the GPU's peak), else None.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from crcm.pipeline import Pipeline
from crcm.runtime import Runtime
from crcm.sampling import consistency_times

# Dense bf16 peak FLOP/s used for MFU (vendor figures, no sparsity).
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def forward_flops(pipeline: Pipeline, tokens: int, context_tokens: int) -> float:
    """Analytic FLOPs of one forward over ``tokens`` query tokens with ``context_tokens`` keys."""
    cfg = pipeline.model.cfg
    d, layers = cfg.dim, cfg.num_layers
    linear = 2 * tokens * layers * (4 * d * d + 2 * d * cfg.ffn_dim)
    attention = 4 * tokens * (context_tokens + tokens) * d * layers
    return float(linear + attention)


def bench_streaming(
    pipeline: Pipeline,
    *,
    steps: int,
    chunk: int = 1,
    streams: int = 1,
    context: str = "clean",
    frames: int = 64,
    warmup_frames: int = 8,
    seed: int = 0,
) -> dict[str, object]:
    """One row: ``streams`` sessions generating ``frames`` frames each after a warm-up."""
    if context not in ("clean", "noisy"):
        raise ValueError(f"context must be 'clean' or 'noisy', got {context!r}")
    sampler = replace(
        pipeline.sampler,
        chunk_frames=chunk,
        steps_per_chunk=(steps,),
        times=tuple(consistency_times(4)),
        kind="consistency",
        cfg_scale=1.0,
        cache_update=context == "clean",
    )
    total = warmup_frames + frames + chunk
    runtime = Runtime(
        pipeline,
        max_streams=streams + 1,
        context_frames=sampler.sink_frames + (sampler.window_frames or total) + chunk,
    )
    needs_actions = bool(pipeline.model.cfg.num_actions)
    rng = np.random.default_rng(seed)

    def open_session(i: int):
        session = runtime.open(
            sampler=sampler,
            seed=seed + i,
            max_frames=None if sampler.window_frames else total,
            buffer_frames=8,
            backpressure="drop_oldest",
        )
        if needs_actions:
            session.push_actions(rng.integers(0, pipeline.model.cfg.num_actions, total).tolist())
        return session

    # First-frame latency of a lone session (its first chunk: `steps` forwards + cache update).
    first = open_session(streams)
    t0 = time.perf_counter()
    while first.stats()["frames_emitted"] == 0:
        runtime.step()
    first_frame_ms = 1e3 * (time.perf_counter() - t0)
    first.close()

    sessions = [open_session(i) for i in range(streams)]
    emitted = {s.id: 0 for s in sessions}
    last_emit: dict[int, float] = {}
    gaps: list[float] = []
    tick_s, plans, t_start, frames_done = 0.0, 0, None, 0
    target = warmup_frames + frames
    while min(emitted.values()) < target:
        t_tick = time.perf_counter()
        plan = runtime.scheduler.tick()
        tick_s_one = time.perf_counter() - t_tick
        if plan is None:
            break
        runtime.executor.run(plan)
        t_done = time.perf_counter()
        runtime.scheduler.complete(plan.id)
        tick_s_one += time.perf_counter() - t_done
        for i in np.flatnonzero(plan.emits_frames):
            sid = int(plan.stream_ids[i])
            n = int(plan.num_frames[i])
            emitted[sid] += n
            if emitted[sid] > warmup_frames:
                if t_start is None:
                    t_start = t_done
                frames_done += n
                if sid in last_emit:
                    gaps.extend([(t_done - last_emit[sid]) / n] * n)
            last_emit[sid] = t_done
        if t_start is not None:
            tick_s += tick_s_one
            plans += 1
        for s in sessions:
            s.read()
    elapsed = time.perf_counter() - (t_start or time.perf_counter())
    fps = frames_done / elapsed if elapsed > 0 else float("nan")
    runtime.close()

    mfu = None
    if torch.cuda.is_available() and pipeline.model.patch_embedding.weight.is_cuda:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
        if peak:
            tpf = pipeline.model.tokens_per_frame(*pipeline.latent_chw[1:])
            ctx = (sampler.sink_frames + (sampler.window_frames or 0)) * tpf
            forwards = steps + (1 if sampler.cache_update else 0)
            flops_per_frame = forward_flops(pipeline, chunk * tpf, ctx) * forwards / chunk
            mfu = flops_per_frame * fps / peak
    return {
        "model": pipeline.name,
        "steps": steps,
        "chunk": chunk,
        "context": context,
        "streams": streams,
        "fps": round(fps, 2),
        "first_frame_ms": round(first_frame_ms, 2),
        "p50_frame_ms": round(1e3 * float(np.percentile(gaps, 50)), 2) if gaps else None,
        "p99_frame_ms": round(1e3 * float(np.percentile(gaps, 99)), 2) if gaps else None,
        "tick_us": round(1e6 * tick_s / max(plans, 1), 2),
        "mfu": None if mfu is None else round(mfu, 4),
    }


def run_suite(
    pipeline: Pipeline,
    *,
    steps: Sequence[int] = (1, 2, 4),
    chunks: Sequence[int] = (1,),
    streams: Sequence[int] = (1, 8),
    contexts: Sequence[str] = ("noisy", "clean"),
    frames: int = 64,
    progress: bool = True,
) -> list[dict[str, object]]:
    rows = []
    for chunk in chunks:
        for n_streams in streams:
            for context in contexts:
                for n_steps in steps:
                    row = bench_streaming(
                        pipeline,
                        steps=n_steps,
                        chunk=chunk,
                        streams=n_streams,
                        context=context,
                        frames=frames,
                    )
                    rows.append(row)
                    if progress:
                        print(format_row(row), flush=True)
    return rows


def format_row(row: dict[str, object]) -> str:
    return (
        f"{row['model']:>12} steps={row['steps']} chunk={row['chunk']} {row['context']:>5} "
        f"streams={row['streams']:>2}  {row['fps']:>8} frames/s  first frame "
        f"{row['first_frame_ms']} ms  p99 {row['p99_frame_ms']} ms  tick {row['tick_us']} µs"
        + (f"  MFU {row['mfu']:.1%}" if row.get("mfu") is not None else "")
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
