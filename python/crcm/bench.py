"""Streaming benchmarks: frames/s, first-frame latency, per-frame latency and scheduler cost.

Every figure comes from a real run on this machine, written with the machine's description.
One row per setting::

    {"model", "steps", "chunk", "context", "streams", "fps", "first_frame_ms", "p50_frame_ms",
     "p99_frame_ms", "tick_us", "mfu"}

- ``context``: ``"clean"`` (a time-0 cache-update pass after each chunk, fused into the next
  chunk's first forward: steps forwards per chunk, one of them with an extra row),
  ``"clean-unfused"`` (the same pass as a forward of its own: steps + 1 forwards) or
  ``"noisy"`` (the last denoising step's K/V are kept: steps forwards);

- ``fps``: frames emitted by all streams per second of wall time in steady state;
- ``first_frame_ms``: a new session, from ``open`` to its first decoded frame (its first chunk);
- ``p50/p99_frame_ms``: per stream, the time between consecutive frame emissions (a chunk's
  frames arrive together; the gap is spread over them);
- ``tick_us``: runtime overhead per plan (Rust tick + complete through PyO3);
- ``mfu``: model FLOP utilisation on a GPU (analytic FLOPs / time / the GPU's peak), else None;
- ``baseline_fps`` / ``speedup`` (c1-1 rows): a plain PyTorch streaming loop of the same model
  (:func:`plain_pytorch_fps`), measured in the same process, and crcm's frames/s over it.
"""

from __future__ import annotations

import itertools
import os
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from crcm.pipeline import Pipeline
from crcm.runtime import Runtime
from crcm.sampling import SamplerConfig, consistency_times

# Dense bf16 peak FLOP/s used for MFU (vendor figures, no sparsity).
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def machine() -> dict[str, object]:
    """What the numbers were measured on (every benchmark records this)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    info: dict[str, object] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        # Other work on the machine skews CPU timings; the load average says how much there was.
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def machine_slug(info: dict[str, object] | None = None) -> str:
    """A short file-name tag: the GPU's name, or the CPU's with its core count (``amd-epyc-2c``)."""
    info = info or machine()
    if info.get("gpu"):
        name = str(info["gpu"])
    else:
        cpu = re.sub(
            r"\(.*?\)|@.*$|\b(processor|cpu|\d+-core)\b", " ", str(info["cpu"]), flags=re.I
        )
        name = f"{cpu} {info['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def results_path(kind: str, info: dict[str, object] | None = None) -> Path:
    """``benches/results/<kind>-<machine>.json`` of the source tree (or the working directory)."""
    root = Path(__file__).resolve().parents[2]
    folder = (
        root / "benches" / "results" if (root / "benches").is_dir() else Path("benches/results")
    )
    return folder / f"{kind}-{machine_slug(info)}.json"


CONTEXTS = ("noisy", "clean", "clean-unfused")


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
    compile: bool = False,
) -> dict[str, object]:
    """One row: ``streams`` sessions generating ``frames`` frames each after a warm-up.

    ``compile``: the runtime's forwards under ``torch.compile``. Before anything is timed,
    :meth:`Runtime.warm_up` runs the row's batch shapes once; its wall clock is ``warmup_s``,
    which holds the compilation when compiled. So ``first_frame_ms`` is a new stream's first
    frame on a running runtime.
    """
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, got {context!r}")
    sampler = replace(
        pipeline.sampler,
        chunk_frames=chunk,
        steps_per_chunk=(steps,),
        times=tuple(consistency_times(4)),
        kind="consistency",
        cfg_scale=1.0,
        cache_update=context != "noisy",
    )
    total = warmup_frames + frames + chunk
    runtime = Runtime(
        pipeline,
        max_streams=streams + 1,
        context_frames=sampler.sink_frames + (sampler.window_frames or total) + chunk,
        compile=compile,
        fuse_cache_update=context != "clean-unfused",
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

    warmup_s = runtime.warm_up(streams, sampler)

    # First-frame latency of a lone session (its first chunk: `steps` forwards + cache update).
    first = open_session(streams)
    t0 = time.perf_counter()
    while first.stats()["frames_emitted"] == 0:
        runtime.step()
    first_frame_ms = 1e3 * (time.perf_counter() - t0)
    first.close()

    # Where a tick's time goes: the executor's page layout (the attention backend's prepare)
    # and decode (its emit) are timed by wrapping them; the forward is the rest of its run.
    phase = {"scheduler": 0.0, "layout": 0.0, "forward": 0.0, "decode": 0.0, "buffer": 0.0}
    inner = {"layout": 0.0, "decode": 0.0}

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inner[name] += time.perf_counter() - t

        return wrapper

    executor = runtime.executor
    executor._emit = timed("decode", executor._emit)
    executor.attention.prepare = timed("layout", executor.attention.prepare)

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
        inner["layout"] = inner["decode"] = 0.0
        t_run = time.perf_counter()
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
        t_read = time.perf_counter()
        for s in sessions:
            s.read()
        if t_start is not None:
            tick_s += tick_s_one
            plans += 1
            phase["scheduler"] += tick_s_one
            phase["layout"] += inner["layout"]
            phase["decode"] += inner["decode"]
            phase["forward"] += (t_done - t_run) - inner["layout"] - inner["decode"]
            phase["buffer"] += time.perf_counter() - t_read
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
        # Per plan, in µs: the Rust scheduler (tick + complete), the page layout, the batched
        # forward, the decode, and the frame buffer reads — what the runtime adds beside the
        # forward itself.
        "phase_us": {k: round(1e6 * v / max(plans, 1), 1) for k, v in phase.items()},
        "mfu": None if mfu is None else round(mfu, 4),
        "compiled": runtime.executor.compiled,
        "warmup_s": round(warmup_s, 2),
    }


@torch.inference_mode()
def plain_pytorch_fps(
    pipeline: Pipeline, *, steps: int, context: str, frames: int = 32, seed: int = 0
) -> float:
    """Frames/s of a plain PyTorch streaming loop, the way research code streams one video.

    One stream, frame by frame (c1-1): a dense K/V cache per layer grown with ``torch.cat`` and
    trimmed to the sink + window, the same model, sampler times and context mode as crcm. It is
    the baseline of ``speedup`` (crcm's aggregate frames/s over this loop's, measured in the
    same process); N streams through this loop run one after another, at the same total rate.
    """
    model = pipeline.model
    sampler = pipeline.sampler
    times = consistency_times(4)[:steps]
    c, h, w = pipeline.latent_chw
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tpf = model.tokens_per_frame(h, w)
    keep_sink = sampler.sink_frames * tpf
    keep_window = (sampler.window_frames or frames) * tpf
    gen = torch.Generator().manual_seed(seed)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    write = [False]

    def attn_fn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if layer in cache:
            k_all = torch.cat([cache[layer][0], k], dim=1)
            v_all = torch.cat([cache[layer][1], v], dim=1)
        else:
            k_all, v_all = k, v
        if write[0]:
            if k_all.shape[1] > keep_sink + keep_window:  # sink + rolling window
                k_all = torch.cat([k_all[:, :keep_sink], k_all[:, -keep_window:]], dim=1)
                v_all = torch.cat([v_all[:, :keep_sink], v_all[:, -keep_window:]], dim=1)
            cache[layer] = (k_all, v_all)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2)
        )
        return o.transpose(1, 2)

    actions = None
    history = None  # the last finished frames, for a model that reads its previous frames
    start = 0.0
    for f in range(frames + 4):
        if f == 4:  # warm-up frames are not timed
            start = time.perf_counter()
        if model.cfg.num_actions:
            actions = torch.zeros(1, 1, dtype=torch.long, device=device)
        pos = torch.full((1, 1), f, device=device)
        x = torch.randn((1, 1, c, h, w), generator=gen).to(device, dtype)
        prev = model.next_frame_previous(history, x)
        for k, s in enumerate(times):
            last = k + 1 == len(times)
            write[0] = last and context == "noisy"
            s_t = torch.full((1, 1), s, device=device)
            v = model(
                x,
                s_t,
                frame_pos_B_T=pos,
                actions_B_T=actions,
                attention=attn_fn,
                prev_B_T_C_H_W=prev,
            )
            x0 = x - s * v
            if not last:
                x = (1 - times[k + 1]) * x0 + times[k + 1] * torch.randn(x.shape, generator=gen).to(
                    device, dtype
                )
        pipeline.codec.decode(x0)
        if model.cfg.prev_frames:
            history = x0 if history is None else torch.cat([history, x0], dim=1)
            history = history[:, -model.cfg.prev_frames :]
        if context == "clean":
            write[0] = True
            model(
                x0,
                torch.zeros(1, 1, device=device),
                frame_pos_B_T=pos,
                actions_B_T=actions,
                attention=attn_fn,
                prev_B_T_C_H_W=prev,
            )
    return frames / (time.perf_counter() - start)


def run_suite(
    pipeline: Pipeline,
    *,
    steps: Sequence[int] = (1, 2, 4),
    chunks: Sequence[int] = (1,),
    streams: Sequence[int] = (1, 8),
    contexts: Sequence[str] = ("noisy", "clean"),
    compiles: Sequence[bool] = (False,),
    frames: int = 64,
    repeats: int = 1,
    progress: bool = True,
) -> list[dict[str, object]]:
    """Rows of :func:`bench_streaming` over every combination. Chunk-1 rows carry the plain
    PyTorch loop's frames/s (``baseline_fps``: eager, the pipeline's weights and dtype) and
    crcm's ratio to it (``speedup``). With ``repeats`` > 1 each row and its baseline run that
    many times in turn (row, baseline, row, …), so that both see the same moments of a shared
    machine; the row keeps the medians, and every run in ``fps_runs`` / ``baseline_runs``."""
    rows = []
    dtype = str(next(pipeline.model.parameters()).dtype).removeprefix("torch.")
    grid = itertools.product(compiles, chunks, streams, contexts, steps)
    for compile, chunk, n_streams, context, n_steps in grid:
        runs, bases = [], []
        for _ in range(repeats):
            runs.append(
                bench_streaming(
                    pipeline,
                    steps=n_steps,
                    chunk=chunk,
                    streams=n_streams,
                    context=context,
                    frames=frames,
                    compile=compile,
                )
            )
            if chunk == 1:
                bases.append(
                    plain_pytorch_fps(
                        pipeline,
                        steps=n_steps,
                        context="noisy" if context == "noisy" else "clean",
                        frames=frames,
                    )
                )
        fps_runs = [float(r["fps"]) for r in runs]
        median = float(np.median(fps_runs))
        # The run closest to the median supplies the latency fields.
        row = min(runs, key=lambda r: abs(float(r["fps"]) - median))
        row["fps"] = round(median, 2)
        row["warmup_s"] = runs[0]["warmup_s"]  # the run that compiled, if any
        row["dtype"] = dtype
        if repeats > 1:
            row["fps_runs"] = fps_runs
        if bases:
            base = float(np.median(bases))
            row["baseline_fps"] = round(base, 2)
            row["speedup"] = round(median / base, 2)
            if repeats > 1:
                row["baseline_runs"] = [round(b, 2) for b in bases]
        rows.append(row)
        if progress:
            print(format_row(row), flush=True)
    return rows


def run_wan_suite(
    frames: int = 48,
    progress: bool = True,
    *,
    budget_s: float | None = None,
    out: str | os.PathLike[str] | None = None,
) -> list[dict[str, object]]:
    """On CUDA: ``wan2.1-1.3b`` shapes in bf16 (random weights) streamed end to end and DiT-only,
    crcm against the research loop, with MFU: the rows of ``benches/bench_wan.py``, most
    important first, within ``budget_s`` seconds (default 480; 120 when ``frames`` < 21), also
    written to ``out`` (default ``benches/results/wan-e2e-<machine>.json``) after every row.
    ``frames``: latent frames per stream, at most 21 (an 81-frame video), in whole chunks of 3.
    Without the source tree's ``benches/`` (an installed wheel): c3-3 DiT-only rows at 4, 2 and
    1 steps, one stream, through :func:`run_suite`. Empty without a GPU."""
    if not torch.cuda.is_available():
        return []
    bench_wan = _load_bench_wan()
    if bench_wan is None:
        wan = Pipeline.from_config(
            "wan2.1-1.3b",
            sampler=SamplerConfig(chunk_frames=3, window_frames=18),
            name="wan2.1-1.3b",
        )
        wan.model.to("cuda", torch.bfloat16)
        return run_suite(
            wan, steps=(4, 2, 1), chunks=(3,), streams=(1,), frames=frames, progress=progress
        )
    latent = max(3, min(21, frames) // 3 * 3)
    if budget_s is None:
        budget_s = 480.0 if frames >= 21 else 120.0
    record = bench_wan.run_benchmark(frames=latent, budget_s=budget_s, out=out, progress=progress)
    return list(record["rows"])


_SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout, for an editable install


def _load_bench_wan():
    """``benches/bench_wan.py`` of the source tree (an editable install's, else the checkout
    this is run from), imported, or None where there is none (a wheel used elsewhere)."""
    import importlib.util
    import sys

    scripts = [root / "benches" / "bench_wan.py" for root in (_SOURCE_ROOT, Path.cwd())]
    path = next((p for p in scripts if p.is_file()), None)
    if path is None:
        return None
    name = "crcm_bench_wan"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def format_row(row: dict[str, object]) -> str:
    if "first_chunk_ms" in row:  # a row of run_wan_suite (benches/bench_wan.py)
        return _format_wan_row(row)
    return (
        f"{row['model']:>12} steps={row['steps']} chunk={row['chunk']} {row['context']:>5} "
        f"streams={row['streams']:>2} {'compiled' if row.get('compiled') else 'eager':>8} "
        f"{row.get('dtype', '')}  {row['fps']:>8} frames/s  first frame "
        f"{row['first_frame_ms']} ms  p99 {row['p99_frame_ms']} ms  tick {row['tick_us']} µs"
        + (f"  MFU {row['mfu']:.1%}" if row.get("mfu") is not None else "")
        + (f"  {row['speedup']}x plain PyTorch" if "speedup" in row else "")
        + (
            "\n"
            + " " * 14
            + "per plan (µs): "
            + ", ".join(f"{k} {v}" for k, v in row["phase_us"].items())
            if row.get("phase_us")
            else ""
        )
    )


def _format_wan_row(row: dict[str, object]) -> str:
    return (
        f"{row['model']:>12} steps={row['steps']} chunk={row['chunk']} {row['context']:>5} "
        f"streams={row['streams']:>2} {'e2e' if row['vae'] else 'dit'}"
        f"{' compiled' if row.get('compiled') else ''}  {row['fps']:>8} "
        f"frames/s  first chunk {row['first_chunk_ms']} ms  p99 {row['p99_chunk_ms']} ms"
        + (f"  MFU {row['mfu']:.1%}" if row.get("mfu") is not None else "")
        + (f"  {row['speedup']}x research loop" if row.get("speedup") is not None else "")
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
