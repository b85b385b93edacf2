"""benches/bench_wan.py on CPU: its ``--tiny`` path end to end, and that its research loop does
the same work as crcm's runtime (same noise → the same latents)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load():
    name = "crcm_bench_wan"  # the name crcm.bench's run_wan_suite loads it under
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benches" / "bench_wan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench_wan = _load()
RowSpec = bench_wan.RowSpec


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes run fastest on one thread (as ``run_benchmark(tiny=True)`` runs them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ROW_FIELDS = {
    "model", "steps", "chunk", "context", "streams", "vae", "fps", "first_chunk_ms",
    "p50_chunk_ms", "p99_chunk_ms", "mfu", "peak_mem_gb", "baseline_fps", "speedup", "graphs",
    "compiled", "baseline", "latent_max_abs_diff",
}  # fmt: skip


def test_tiny_rows_write_json_and_match_the_research_loop(tmp_path):
    out = tmp_path / "wan.json"
    rows = [
        RowSpec(3, 2, "clean", 1, True),  # c3-3, cache-update pass, streaming VAE decode
        RowSpec(1, 2, "noisy", 1, False),  # c1-1, noisy context, DiT only
        RowSpec(3, 1, "clean", 2, False),  # two batched streams against 2 sequential runs
        RowSpec(1, 2, "noisy", 1, False, compiled=True),  # Runtime(compile=True)
    ]
    record = bench_wan.run_benchmark(
        tiny=True, frames=6, budget_s=900, out=out, rows=rows, progress=False
    )
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(record))
    assert written["complete"] and not written["skipped"]
    machine = written["machine"]
    assert {"torch", "triton", "cpu"} <= set(machine) and written["date"]
    assert written["peak_bf16_tflops_measured"] is None  # no GPU: no peak, no MFU
    assert written["flops_formula"].startswith("One DiT forward")

    got = written["rows"]
    assert [(r["chunk"], r["steps"], r["context"], r["streams"], r["vae"]) for r in got] == [
        (3, 2, "clean", 1, True),
        (1, 2, "noisy", 1, False),
        (3, 1, "clean", 2, False),
        (1, 2, "noisy", 1, False),
    ]
    assert [r["compiled"] for r in got] == [False, False, False, True]
    for row in got:
        assert set(row) >= ROW_FIELDS, ROW_FIELDS - set(row)
        assert row["fps"] > 0 and row["baseline_fps"] > 0
        assert row["speedup"] == pytest.approx(row["fps"] / row["baseline_fps"], rel=0.02)
        assert row["first_chunk_ms"] > 0 and row["p99_chunk_ms"] >= row["p50_chunk_ms"] > 0
        assert row["mfu"] is None and row["peak_mem_gb"] is None
        assert row["graphs"] is False
        assert row["dit_tflop"] >= 0
    # Decoded frames actually emitted: Wan's VAE gives 1 + 4·5 frames for 6 latent frames.
    assert got[0]["video_frames_per_stream"] == 21
    assert got[1]["video_frames_per_stream"] == 6
    # Same weights, noise and steps: crcm's latents are the research loop's (fp32), compiled
    # or not.
    for row in got[:2] + got[3:]:
        assert row["latent_max_abs_diff"] is not None
        assert row["latent_max_abs_diff"] <= 1e-4
    assert got[0]["baseline"] == bench_wan.RESEARCH
    assert "2 sequential runs" in got[2]["baseline"]
    assert got[2]["latent_max_abs_diff"] is None


def test_research_loop_latents_equal_crcm_with_a_nonzero_head():
    """The check is not vacuous: the latents depend on the network (its head is not zero)."""
    setup = bench_wan.build_setup(tiny=True, vae=False)
    spec = RowSpec(3, 2, "noisy", 1, False)
    crcm = bench_wan.run_crcm(setup, spec, 6, seed=3, record=True)
    research = bench_wan.run_research(setup, spec, 6, seed=3, record=True)
    assert len(crcm.latents) == len(research.latents) == 2
    assert bench_wan.latent_diff(crcm.latents, research.latents) <= 1e-4
    other = bench_wan.run_research(setup, RowSpec(3, 2, "clean", 1, False), 6, seed=3, record=True)
    # Noisy context and the clean pass give different second chunks (the attention matters).
    assert bench_wan.latent_diff(research.latents[1:], other.latents[1:]) > 1e-3


def test_flops_formula_counts_what_the_forward_runs():
    """``forward_flops`` against torch's FLOP counter over one cached-context forward."""
    from torch.utils.flop_counter import FlopCounterMode

    setup = bench_wan.build_setup(tiny=True, vae=False)
    cfg, model = setup.cfg, setup.model
    frames, context = 3, 2
    tpf = cfg.tokens_per_frame
    ctx = torch.randn(2, 1, context * tpf, cfg.num_heads, cfg.head_dim)

    def attn_fn(layer, q, k, v):
        k_all = torch.cat([ctx[0], k], dim=1)
        v_all = torch.cat([ctx[1], v], dim=1)
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2)
        ).transpose(1, 2)

    x = torch.randn(1, frames, cfg.in_channels, *cfg.frame_hw)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x, torch.full((1, frames), 0.5), cond=setup.tokens[None], attention=attn_fn)
    assert bench_wan.forward_flops(cfg, frames, context) == pytest.approx(
        counter.get_total_flops(), rel=1e-6
    )


def test_vae_rows_are_skipped_with_a_note_without_diffusers(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers → ImportError
    codec, note = bench_wan.load_vae_codec(True, (64, 64), torch.device("cpu"), torch.float32)
    assert codec is None and "diffusers" in note and "pip download diffusers" in note
    record = bench_wan.run_benchmark(
        tiny=True,
        frames=3,
        budget_s=300,
        out=tmp_path / "w.json",
        rows=[RowSpec(3, 1, "clean", 1, True), RowSpec(3, 1, "clean", 1, False)],
        progress=False,
    )
    assert [r["vae"] for r in record["rows"]] == [False]
    assert record["skipped"][0]["vae"] is True and "diffusers" in record["skipped"][0]["reason"]
    assert any("diffusers" in n for n in record["notes"])


def test_row_plan_puts_the_headline_first_and_cli_lists_it(capsys):
    plan = bench_wan.plan_rows()
    assert plan[0] == RowSpec(3, 4, "clean", 1, True)
    assert plan[2] == RowSpec(3, 2, "clean", 1, True)
    assert plan[4] == RowSpec(1, 1, "clean", 1, True)
    assert len(plan) == len(set(plan)) == 2 * 3 * 2 * 4 * 2 * 2
    # Each headline row's compiled twin right after it: the change beside its baseline.
    assert plan[1] == RowSpec(3, 4, "clean", 1, True, compiled=True)
    argv = ["--list", "--streams", "1", "--vae", "off", "--chunks", "3", "--compile", "off"]
    assert bench_wan.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[0].endswith("c3-3 4-step clean  1 stream  dit")


def test_crcm_bench_runs_this_module_as_its_wan_suite():
    from crcm import bench

    assert bench._load_bench_wan() is bench_wan  # the source tree's script, loaded once
    row = {
        "model": "wan2.1-1.3b", "steps": 4, "chunk": 3, "context": "clean", "streams": 1,
        "vae": True, "fps": 20.5, "first_chunk_ms": 700.0, "p99_chunk_ms": 500.0, "mfu": 0.41,
        "speedup": 1.2,
    }  # fmt: skip
    text = bench.format_row(row)
    assert "e2e" in text and "20.5 frames/s" in text and "1.2x research loop" in text
    if not torch.cuda.is_available():
        assert bench.run_wan_suite() == []


def test_cpu_mode_streams_the_36m_wan_shaped_model_like_the_research_loop(tmp_path):
    setup = bench_wan.build_setup(cpu=True, vae=False)
    params = sum(p.numel() for p in setup.model.parameters())
    assert 30e6 < params < 40e6 and setup.tokens_per_frame == 64 and setup.dtype == torch.float32
    rows = [RowSpec(3, 1, "clean", 1, False), RowSpec(3, 1, "clean", 1, True)]
    record = bench_wan.run_benchmark(
        cpu=True, frames=3, budget_s=120, out=tmp_path / "cpu.json", rows=rows, progress=False
    )
    [row] = record["rows"]
    assert record["mode"] == "cpu" and row["model"] == "wan-shaped-36m"
    assert row["latent_max_abs_diff"] <= 1e-4 and row["speedup"] > 0
    [skipped] = record["skipped"]  # the end-to-end row: --cpu measures the DiT only
    assert skipped["vae"] and "DiT only" in skipped["reason"]
