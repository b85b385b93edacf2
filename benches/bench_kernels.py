"""Time crcm's attention kernels against PyTorch on the same shapes (design §6).

    python benches/bench_kernels.py [--quick] [--configs] [--threads N] [--out PATH]

PATH defaults to benches/results/kernels-<machine>.json.

- Paged attention (streaming: every stream's chunk over its paged cache plus itself) against
  SDPA over K/V already gathered into contiguous per-stream tensors (flash backend on CUDA; the
  gather is not timed, so this is the best case for SDPA) and FlexAttention over the packed
  streams with a per-stream block mask. Ratio = baseline time / kernel time (higher is better;
  target on GPU ≥ 0.9 against SDPA-flash). ``paged_unsplit_ms`` is the kernel with its context
  split turned off (``kv_splits=1``), against the default, which splits when few streams would
  leave SMs idle.
- Attention JVP (O and tO) against the primal attention O alone with the same mask: FlexAttention
  with a block mask, plus SDPA-flash for the full mask. Ratio = JVP time / fastest primal time
  (lower is better; target on GPU ≤ 1.6). "tf-scm" is the TF mask as TF-sCM calls it, with the
  clean half static (zero tangents, skipped); "tf" lets every token move. Each row also gives
  the JVP's matrix-product work over the primal's: the ratio a kernel as efficient per product
  as the primal would reach.
- With ``--configs`` (CUDA only) every case is also timed under each of the kernel's launch
  configurations, to order the ladders in ``crcm.kernels`` from measurements.

On CUDA the Triton kernels run on `wan2.1-1.3b` streaming shapes (1,560 tokens per latent frame,
12 heads × 128, bf16). Without CUDA, small fp32 shapes run through the torch reference path
only, with FlexAttention in eager mode: those numbers describe the CPU fallback, not the kernels.
Each result records the largest difference between the outputs compared, as a sanity check.
"""

import argparse
import contextlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from crcm.bench import machine, results_path
from crcm.kernels import PagedLayout, attention_jvp, paged_attention
from crcm.kernels._common import LaunchConfig, LaunchLadder, forced_launch_config
from crcm.kernels.attention_jvp import _LADDER as JVP_LADDER
from crcm.kernels.paged_attention import _LADDER as PAGED_LADDER
from crcm.masks import Mask, block_causal_mask, full_mask, teacher_forcing_mask

CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Geometry:
    """Model-side shape: tokens per latent frame, heads, head dim, dtype, page size in tokens."""

    name: str
    tokens_per_frame: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    page_tokens: int  # one page per frame, padded to a multiple of the kernel's key tile


WAN = Geometry("wan2.1-1.3b", 1560, 12, 128, torch.bfloat16, 1600)
SMALL = Geometry("small-cpu", 64, 4, 64, torch.float32, 64)


def warm_up_gpu(seconds: float = 1.0) -> None:
    """Keep the GPU busy for a while before the first timing: an idle GPU runs at low clocks,
    and on an H200 the first case timed (0.08 ms of work) came out 1.8× slower than the same
    launch timed right after it."""
    if not CUDA:
        return
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Fastest of ``iters`` timed calls of ``fn`` in milliseconds (CUDA events on GPU). The minimum,
    not the median: on a shared machine the slow calls measure the neighbours, not the code."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def flex() -> Callable:
    """FlexAttention as users run it: compiled on CUDA; eager on CPU (compiling it there needs a
    C++ toolchain and says nothing about the GPU)."""
    if CUDA:
        # Each shape and block mask can recompile; past dynamo's default limit of 8 it would
        # silently run FlexAttention eagerly, which materialises the scores (48 GiB at 21 frames).
        torch._dynamo.config.recompile_limit = 64
        return torch.compile(flex_attention)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    return flex_attention


def block_mask(mask_mod: Callable, q_len: int, kv_len: int, device: str) -> BlockMask:
    """Compiled on CUDA so that Wan-sized masks are never materialised element by element."""
    build = torch.compile(create_block_mask) if CUDA else create_block_mask
    return build(mask_mod, None, None, q_len, kv_len, device=device)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# Configurations outside the ladders, timed with --configs beside the rungs (named with a
# "candidate " prefix) so that a GPU session can find better rungs, not only reorder them. On an
# H200 (benches/results/kernels-nvidia-h200.json) none beat the first rungs: BM128-BN64-w8-s4
# tied the paged kernel's at 1.25× its shared memory; BM64-BN64-w8-s2, the JVP's former first
# rung, ran the TF-sCM JVP 1.8× slower than the new one.
CANDIDATES = {
    "paged": (
        LaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=4),
        LaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),
    ),
    "jvp": (
        LaunchConfig(block_m=128, block_n=64, num_warps=8, num_stages=1),
        LaunchConfig(block_m=64, block_n=64, num_warps=8, num_stages=2),
        LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    ),
}


def time_configs(
    ladder: LaunchLadder,
    candidates: tuple[LaunchConfig, ...],
    head_dim: int,
    fn: Callable[[], object],
    timing: tuple[int, int],
) -> dict[str, float | str]:
    """``fn``'s time under each launch configuration of ``ladder`` and each of ``candidates``
    (ms; the refusal if the device cannot load it)."""
    times: dict[str, float | str] = {}
    rungs = list(ladder.rungs(head_dim))
    extra = [c for c in candidates if c not in rungs]
    for prefix, config in [("", c) for c in rungs] + [("candidate ", c) for c in extra]:
        name = (
            f"{prefix}BM{config.block_m}-BN{config.block_n}"
            f"-w{config.num_warps}-s{config.num_stages}"
        )
        try:
            with forced_launch_config(config):
                times[name] = time_ms(fn, *timing)
        except Exception as error:  # a refusal is a result here, not a failure
            times[name] = f"{type(error).__name__}: {error}"
    return times


def jvp_matmul_work(mask: Mask, static_q: int, static_k: int) -> float:
    """Matrix-product work of the JVP over the primal's, per allowed score (rectangles assumed
    disjoint, as the masks built here are): the primal does Q·Kᵀ and P·V; the JVP adds tQ·Kᵀ
    and (P ⊙ tS)·V where the query moves, Q·tKᵀ, P·tV and (P ⊙ tS)·V where the key moves."""
    primal = jvp = 0
    for q0, q1, k0, k1 in mask.rects:
        q_moving = q1 - max(q0, min(q1, static_q))
        k_moving = k1 - max(k0, min(k1, static_k))
        q_static, k_static = q1 - q0 - q_moving, k1 - k0 - k_moving
        primal += 2 * (q1 - q0) * (k1 - k0)
        jvp += (
            6 * q_moving * k_moving + 4 * q_moving * k_static + 5 * q_static * k_moving
            + 2 * q_static * k_static
        )  # fmt: skip
    return jvp / primal


def bench_paged(geo: Geometry, streams: int, chunk_frames: int, context_frames: int,
                timing: tuple[int, int], configs: bool) -> dict:  # fmt: skip
    """Every stream: a chunk of ``chunk_frames`` frames over ``context_frames`` cached frames."""
    device = "cuda" if CUDA else "cpu"
    tpf, heads, dim = geo.tokens_per_frame, geo.heads, geo.head_dim
    len_q, len_k = chunk_frames * tpf, (context_frames + chunk_frames) * tpf

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=geo.dtype)

    q, k_new, v_new = (randn(streams * len_q, heads, dim) for _ in range(3))
    num_pages = streams * context_frames
    k_pages, v_pages = (randn(max(num_pages, 1), geo.page_tokens, heads, dim) for _ in range(2))
    # Scatter the pages like a pool after many allocations and evictions.
    page_ids = torch.randperm(max(num_pages, 1), device=device)[:num_pages]
    # Built once per streaming step and shared by every layer, so not timed (like the gather
    # of the baselines' K/V).
    layout = PagedLayout(
        torch.arange(streams + 1) * len_q,
        torch.arange(streams + 1) * context_frames,
        page_ids.cpu(),
        torch.full((num_pages,), tpf),
        num_pages=max(num_pages, 1),
        page_tokens=geo.page_tokens,
        device=device,
    )
    args = (q, k_new, v_new, k_pages, v_pages, layout)

    # Baselines get each stream's K/V gathered once, outside the timing: [S, H, L, D].
    def gather(pages: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        cached = pages[page_ids.long(), :tpf].reshape(streams, context_frames * tpf, heads, dim)
        return torch.cat([cached, new.reshape(streams, len_q, heads, dim)], 1).transpose(1, 2)

    k, v = gather(k_pages, k_new).contiguous(), gather(v_pages, v_new).contiguous()
    q_b = q.reshape(streams, len_q, heads, dim).transpose(1, 2).contiguous()
    # FlexAttention packs the streams into one sequence and masks keys of other streams.
    same_stream = block_mask(
        lambda b, h, qi, ki: qi // len_q == ki // len_k, streams * len_q, streams * len_k, device
    )
    packed = [x.transpose(0, 1).reshape(1, heads, -1, dim) for x in (q_b, k, v)]
    flex_fn = flex()

    def sdpa() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if CUDA else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q_b, k, v)

    ours = paged_attention(*args)
    o_sdpa = sdpa().transpose(1, 2).reshape_as(q)
    o_flex = flex_fn(*packed, block_mask=same_stream)[0].transpose(0, 1)
    result = {
        "streams": streams,
        "chunk_frames": chunk_frames,
        "context_frames": context_frames,
        "paged_ms": time_ms(lambda: paged_attention(*args), *timing),
        "paged_unsplit_ms": time_ms(lambda: paged_attention(*args, kv_splits=1), *timing),
        "sdpa_ms": time_ms(sdpa, *timing),
        "flex_ms": time_ms(lambda: flex_fn(*packed, block_mask=same_stream), *timing),
        "max_diff_vs_sdpa": max_diff(ours, o_sdpa),
        "max_diff_vs_flex": max_diff(ours, o_flex),
    }
    result["sdpa_over_paged"] = result["sdpa_ms"] / result["paged_ms"]
    result["flex_over_paged"] = result["flex_ms"] / result["paged_ms"]
    if configs:
        result["paged_ms_by_config"] = time_configs(
            PAGED_LADDER, CANDIDATES["paged"], dim, lambda: paged_attention(*args), timing
        )
    return result


def bench_jvp(geo: Geometry, kind: str, num_frames: int, chunk_frames: int,
              timing: tuple[int, int], configs: bool) -> dict:  # fmt: skip
    """One (batch 1) attention of a TF-sCM forward: primal vs primal + tangent."""
    device = "cuda" if CUDA else "cpu"
    tpf, heads, dim = geo.tokens_per_frame, geo.heads, geo.head_dim
    mask: Mask = {
        "full": lambda: full_mask(num_frames, tpf),
        "block-causal": lambda: block_causal_mask(num_frames, chunk_frames, tpf),
        "tf": lambda: teacher_forcing_mask(num_frames, chunk_frames, tpf),
        "tf-scm": lambda: teacher_forcing_mask(num_frames, chunk_frames, tpf),
    }[kind]()
    length = mask.num_q
    static = length // 2 if kind == "tf-scm" else 0  # the clean half does not move
    q, k, v, t_q, t_k, t_v = (
        torch.randn(1, length, heads, dim, device=device, dtype=geo.dtype) for _ in range(6)
    )
    for t in (t_q, t_k, t_v):
        t[:, :static] = 0

    def jvp() -> tuple[torch.Tensor, torch.Tensor]:
        return attention_jvp(q, k, v, t_q, t_k, t_v, mask, static_q=static, static_k=static)

    q_b, k_b, v_b = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, L, D]

    def mask_mod(b, h, qi, ki):
        allowed = qi < 0  # all False, in the index tensor's shape
        for q0, q1, k0, k1 in mask.rects:
            allowed = allowed | ((qi >= q0) & (qi < q1) & (ki >= k0) & (ki < k1))
        return allowed

    rect_mask = block_mask(mask_mod, length, length, device)
    flex_fn = flex()
    o, _ = jvp()
    o_flex = flex_fn(q_b, k_b, v_b, block_mask=rect_mask).transpose(1, 2)
    result = {
        "mask": kind,
        "num_frames": num_frames,
        "chunk_frames": chunk_frames,
        "tokens": length,
        "static_tokens": static,
        "matmul_work_over_primal": jvp_matmul_work(mask, static, static),
        "jvp_ms": time_ms(jvp, *timing),
        "primal_flex_ms": time_ms(lambda: flex_fn(q_b, k_b, v_b, block_mask=rect_mask), *timing),
        "max_diff_o_vs_flex": max_diff(o, o_flex),
    }
    primals = {"flex": result["primal_flex_ms"]}
    if kind == "full" and CUDA:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            result["primal_sdpa_flash_ms"] = time_ms(
                lambda: F.scaled_dot_product_attention(q_b, k_b, v_b), *timing
            )
        primals["sdpa-flash"] = result["primal_sdpa_flash_ms"]
    result["primal"] = min(primals, key=primals.get)
    result["jvp_over_primal"] = result["jvp_ms"] / primals[result["primal"]]
    if configs:
        result["jvp_ms_by_config"] = time_configs(JVP_LADDER, CANDIDATES["jvp"], dim, jvp, timing)
    return result


def shapes(quick: bool) -> tuple[Geometry, list[tuple], list[tuple]]:
    """(geometry, paged cases (streams, chunk_frames, context_frames), JVP cases (mask, frames,
    chunk_frames)). Contexts stop at 21 frames including the chunk, Wan's 81-video-frame clip."""
    if CUDA:
        streams = [1, 16] if quick else [1, 4, 16]
        contexts = {1: [20] if quick else [0, 10, 20], 3: [18] if quick else [0, 9, 18]}
        paged = [(s, c, ctx) for s in streams for c in (1, 3) for ctx in contexts[c]]
        frames = [9] if quick else [9, 21]
        kinds = ("tf-scm", "tf", "block-causal", "full")  # TF-sCM's own case first
        jvp = [(kind, n, 3) for n in frames for kind in kinds]
        return WAN, paged, jvp
    paged = [
        (s, c, ctx) for s in ([1, 4] if quick else [1, 4, 16]) for c in (1, 3) for ctx in (0, 6)
    ]
    jvp = [(kind, 6, 3) for kind in ("full", "block-causal", "tf", "tf-scm")]
    return SMALL, paged, jvp


def progress(row: dict) -> dict:
    """Print a finished case at once: a GPU run can be cut short, and the rows so far count."""
    print(json.dumps(row), flush=True)
    return row


def table(title: str, rows: list[dict], columns: list[str]) -> str:
    def cell(x: object) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = [[cell(row.get(c, "-")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([title, fmt.format(*columns), *(fmt.format(*line) for line in lines)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    parser.add_argument(
        "--configs",
        action="store_true",
        help="also time each launch configuration of the kernels (CUDA only)",
    )
    parser.add_argument(
        "--kernel",
        choices=["paged", "jvp"],
        action="append",
        help="time only this kernel (repeatable; default: both)",
    )
    parser.add_argument("--out", type=Path, help="JSON result file (default: by machine name)")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's choice); 1 keeps CPU timings stable on a "
        "shared machine, where idle-spinning worker threads otherwise dominate small ops",
    )
    opts = parser.parse_args()
    if opts.configs and not CUDA:
        parser.error("--configs times the Triton kernels' launch configurations: it needs CUDA")

    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    geo, paged_cases, jvp_cases = shapes(opts.quick)
    kernels = opts.kernel or ["paged", "jvp"]
    paged_cases = paged_cases if "paged" in kernels else []
    jvp_cases = jvp_cases if "jvp" in kernels else []
    timing = (3, 10) if opts.quick else (5, 30)  # (warmup, timed iterations)
    path = "Triton kernels" if CUDA else "torch reference path (no CUDA: the kernels did not run)"
    print(f"{geo.name}: {geo.tokens_per_frame} tokens/frame, {geo.heads} heads x {geo.head_dim}, "
          f"{str(geo.dtype).removeprefix('torch.')}; crcm runs the {path}")  # fmt: skip
    warm_up_gpu()
    paged = [progress(bench_paged(geo, *case, timing, opts.configs)) for case in paged_cases]
    if paged:
        print(table("\npaged attention (ms; ratio = baseline / paged, higher is better)", paged,
                ["streams", "chunk_frames", "context_frames", "paged_ms", "paged_unsplit_ms",
                 "sdpa_ms", "flex_ms",
                 "sdpa_over_paged", "flex_over_paged", "max_diff_vs_sdpa"]))  # fmt: skip
    jvp = [progress(bench_jvp(geo, *case, timing, opts.configs)) for case in jvp_cases]
    if jvp:
        print(table("\nattention JVP (ms; ratio = JVP / fastest primal, lower is better)", jvp,
                ["mask", "num_frames", "tokens", "jvp_ms", "primal_flex_ms",
                 "primal_sdpa_flash_ms", "jvp_over_primal", "matmul_work_over_primal",
                 "max_diff_o_vs_flex"]))  # fmt: skip
    for row in paged:
        for config, ms in row.get("paged_ms_by_config", {}).items():
            print(f"paged {row['streams']}x{row['chunk_frames']}+{row['context_frames']}: "
                  f"{config} {ms}")  # fmt: skip
    for row in jvp:
        for config, ms in row.get("jvp_ms_by_config", {}).items():
            print(f"jvp {row['mask']} {row['num_frames']}: {config} {ms}")

    info = machine()
    out = opts.out or results_path("kernels", info)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": info,
        "crcm_path": path,
        "quick": opts.quick,
        "geometry": {**geo.__dict__, "dtype": str(geo.dtype)},
        "timing": {"warmup": timing[0], "iterations": timing[1], "statistic": "min"},
        "paged_attention": paged,
        "attention_jvp": jvp,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
