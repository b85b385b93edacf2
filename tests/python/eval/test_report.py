"""Tests of crcm.eval.report: merging ``crcm eval`` reports, the Markdown table and the SVG plot."""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from crcm.errors import ConfigError
from crcm.eval.report import (
    BASELINE,
    load_reports,
    markdown_table,
    nearest_horizon,
    svg_plot,
)

SVG = "{http://www.w3.org/2000/svg}"
HORIZONS = (1, 8, 32, 128)


def _stats(base: float, horizons=HORIZONS, missing: dict[int, set[str]] | None = None) -> dict:
    """Per-horizon stats whose values are distinct functions of ``base`` and the horizon."""
    out = {}
    for i, h in enumerate(horizons):
        s = {
            "psnr": base + 10 - i,
            "psnr_dynamic": base + i * 0.5,
            "ssim": 0.5,
            "ssim_dynamic": 0.25,
            "paddle_error_px": base + 2 * h,
            "ball_error_px": base + h + 0.25,
            "ball_found": 1.0,
            "bricks_error": 0.0,
            "paddle_found": 1.0,
        }
        for k in (missing or {}).get(h, set()):
            s[k] = None
        out[str(h)] = {**s, **{f"{k}_n": 4 for k in s}}
    return out


def _model(base: float, sampler, agree=0.5, horizons=HORIZONS, missing=None, seconds=1.0) -> dict:
    """A model entry; its control metrics are functions of ``base`` (``agree``: direction
    agreement, None for not measured) and it is judged against made-up targets."""
    ctrl_hs = [h for h in (1, 2, 4, 8, 16, 32) if h <= max(horizons)]
    entry = {
        "sampler": sampler,
        "horizons": _stats(base, horizons, missing),
        "control": {
            "horizons": ctrl_hs,
            "paddle_error_px": {"all": {str(h): base / 10 + h for h in ctrl_hs}},
            "sensitivity": base / 100,
            "direction_agree": agree,
            "direction_agree_shuffled": 0.5,
        },
        "objects": {
            "paddle_found": 0.96,
            "paddle_max_jump_px": 30.0,
            "ball_found": 0.5,
            "ball_error_px": {"1": 3.25},
            "ball_close_h1": 0.75,
            "brick_hit_disappears": None,
        },
        "context_check": {"pass": base > 15},
        "seconds": seconds,
    }
    from crcm.eval.targets import check_targets

    entry["targets"] = check_targets(entry, {str(h): 0.0 for h in horizons})
    return entry


def _report(name: str, model: dict, *, copy_base=10.0, fps=20.0, horizons=HORIZONS, **over):
    """A synthetic ``crcm eval`` report: ``name`` plus the copy-last-frame baseline."""
    report = {
        "game": "breakout",
        "frame_hw": [64, 64],
        "frameskip": 4,
        "context_frames": 8,
        "horizons": list(horizons),
        "control_horizon": 32,
        "eval_seeds": [100, 101],
        "episodes": [
            {"seed": 100, "policy": "tracker", "frames": 800, "starts": [150, 500]},
            {"seed": 101, "policy": "tracker", "frames": 600, "starts": [130, 380]},
        ],
        "skipped_episodes": [],
        "windows": 4,
        "models": {
            name: model,
            BASELINE: _model(copy_base, None, agree=0.0, horizons=horizons, seconds=copy_base),
        },
        "drift": {
            "seed": 100,
            "models": {
                name: {
                    "frames": 200,
                    "psnr_static": {"0-100": 15.6, "100-200": 13.44},
                    "paddle_found": 1.0,
                    "frames_per_s": fps,
                },
                BASELINE: {
                    "frames": 200,
                    "psnr_static": {"0-100": 100.0, "100-200": 100.0},
                    "paddle_found": 1.0,
                    "frames_per_s": 1e6,
                },
            },
        },
        "model": name,
    }
    report.update(over)
    return report


def _write(tmp_path: Path, name: str, report: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return path


EULER = {"kind": "euler", "steps": 16, "cfg_scale": 3.0}
ONE_STEP = {"kind": "consistency", "steps": 1, "cfg_scale": 1.0}


@pytest.fixture
def two_reports(tmp_path: Path) -> list[Path]:
    a = _write(tmp_path, "a.json", _report("teacher", _model(20.0, EULER), copy_base=10.0))
    # The student's ball error at h8 and its left/right agreement are missing (None).
    student = _model(30.0, ONE_STEP, agree=None, missing={8: {"ball_error_px"}})
    b = _write(tmp_path, "b.json", _report("student", student, copy_base=11.0, fps=22.14))
    return [a, b]


def _rows(markdown: str) -> list[dict[str, str]]:
    """The table's rows as header -> cell dicts."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").replace("-", "").replace(":", "")) == set()
    return [
        dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True))
        for ln in lines[2:]
    ]


def test_merge_keeps_one_baseline_first(two_reports: list[Path]) -> None:
    table = load_reports(two_reports)
    assert list(table.models) == [BASELINE, "teacher", "student"]
    # The baseline comes from the first file (its copy_base was 10, the second's 11).
    assert table.models[BASELINE]["seconds"] == 10.0
    assert table.metric(BASELINE, 1, "psnr") == 20.0
    assert table.sources == {
        BASELINE: two_reports[0],
        "teacher": two_reports[0],
        "student": two_reports[1],
    }
    assert list(table.drift) == [BASELINE, "teacher", "student"]
    assert table.drift["student"]["frames_per_s"] == 22.14
    assert table.horizons == HORIZONS and table.eval_seeds == (100, 101)
    assert (table.frame_hw, table.frameskip, table.context_frames) == ((64, 64), 4, 8)
    assert (table.windows, table.episodes) == (4, 2)
    assert table.metric("student", 8, "ball_error_px") is None


def test_file_order_is_kept(two_reports: list[Path]) -> None:
    table = load_reports(list(reversed(two_reports)))
    assert list(table.models) == [BASELINE, "student", "teacher"]
    assert table.models[BASELINE]["seconds"] == 11.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("eval_seeds", [100, 102]),
        ("horizons", [1, 8, 32]),
        ("frame_hw", [96, 96]),
        ("frameskip", 2),
        ("context_frames", 4),
    ],
)
def test_different_windows_raise(tmp_path: Path, key: str, value: Any) -> None:
    a = _write(tmp_path, "a.json", _report("teacher", _model(20.0, EULER)))
    other = _report("student", _model(30.0, ONE_STEP))
    other[key] = value
    b = _write(tmp_path, "b.json", other)
    with pytest.raises(ConfigError, match=rf"b\.json.*{key}"):
        load_reports([a, b])


def test_different_start_points_raise(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.json", _report("teacher", _model(20.0, EULER)))
    other = _report("student", _model(30.0, ONE_STEP))
    other["episodes"][1]["starts"] = [131, 380]  # e.g. another --max-steps
    b = _write(tmp_path, "b.json", other)
    with pytest.raises(ConfigError, match=r"b\.json.*start points"):
        load_reports([a, b])


def test_duplicate_label_raises(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.json", _report("breakout", _model(20.0, EULER)))
    b = _write(tmp_path, "b.json", _report("breakout", _model(30.0, ONE_STEP)))
    with pytest.raises(ConfigError, match=r"'breakout'.*a\.json.*b\.json.*--name"):
        load_reports([a, b])


def test_bad_inputs_raise(tmp_path: Path, two_reports: list[Path]) -> None:
    with pytest.raises(ConfigError, match="no eval reports"):
        load_reports([])
    with pytest.raises(ConfigError, match="listed twice"):
        load_reports([two_reports[0], two_reports[0]])
    with pytest.raises(ConfigError, match=r"missing\.json"):
        load_reports([tmp_path / "missing.json"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"models": {}}')
    with pytest.raises(ConfigError, match=r"bad\.json: not a crcm eval report"):
        load_reports([bad])


def _tables(markdown: str) -> list[list[dict[str, str]]]:
    """Each Markdown table's rows as header -> cell dicts."""
    blocks, current = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(_rows("\n".join(current)))
            current = []
    return blocks


def test_markdown_rows_and_cells(two_reports: list[Path]) -> None:
    text = markdown_table(load_reports(two_reports))
    assert "native" in text.splitlines()[0] and "baseline" in text.splitlines()[0]
    fidelity, control = _tables(text)
    assert [r["model"] for r in fidelity] == [BASELINE, "teacher", "student"]
    assert [r["model"] for r in control] == [BASELINE, "teacher", "student"]
    copy, teacher, student = fidelity
    assert list(copy) == [
        "model",
        "sampler",
        "dyn PSNR h1 (dB)",
        "dyn PSNR h8 (dB)",
        "dyn PSNR h32 (dB)",
        "dyn PSNR h128 (dB)",
        "PSNR h1 (dB)",
        "PSNR h128 (dB)",
        "drift static PSNR, frames 100-200 (dB)",
        "drift frames/s",
    ]
    assert (copy["sampler"], teacher["sampler"], student["sampler"]) == (
        "—",
        "Euler 16 + CFG 3",
        "1 step",
    )
    # psnr_dynamic = base + 0.5 * index; psnr = base + 10 - index.
    assert [teacher[f"dyn PSNR h{h} (dB)"] for h in HORIZONS] == ["20.0", "20.5", "21.0", "21.5"]
    assert (teacher["PSNR h1 (dB)"], teacher["PSNR h128 (dB)"]) == ("30.0", "27.0")
    assert teacher["drift static PSNR, frames 100-200 (dB)"] == "13.4"
    assert copy["drift static PSNR, frames 100-200 (dB)"] == "100.0"
    assert (teacher["drift frames/s"], student["drift frames/s"]) == ("20.0", "22.1")
    assert copy["drift frames/s"] == "—"  # copying a frame has no meaningful speed

    copy, teacher, student = control
    assert list(teacher) == [
        "model",
        "paddle err h8 (px, ≤4 at h8)",
        "paddle err h32 (px, ≤8 at h32)",
        "sensitivity (≥0.8)",
        "direction agree (%, ≥95)",
        "shuffled actions (%, ≤55)",
        "paddle found (%, ≥95)",
        "max paddle jump (px, ≤32)",
        "ball found h≤8 (%, ≥90)",
        "ball err h1 (px)",
        "ball ≤4 px at h1 (%, ≥80)",
        "hit bricks gone (%)",
        "TF context check",
        "targets met",
    ]
    # paddle error = base / 10 + h; sensitivity = base / 100; each cell marked by its target.
    assert teacher["paddle err h8 (px, ≤4 at h8)"] == "10.0 ✗"
    assert teacher["paddle err h32 (px, ≤8 at h32)"] == "34.0 ✗"
    assert (teacher["sensitivity (≥0.8)"], copy["sensitivity (≥0.8)"]) == ("0.20 ✗", "0.10 ✗")
    assert teacher["direction agree (%, ≥95)"] == "50 ✗"
    assert teacher["shuffled actions (%, ≤55)"] == "50"  # judged in the direction cell
    assert teacher["paddle found (%, ≥95)"] == "96 ✓"
    assert teacher["max paddle jump (px, ≤32)"] == "30.0 ✓"
    assert teacher["ball found h≤8 (%, ≥90)"] == "50 ✗"
    assert teacher["ball err h1 (px)"] == "3.2"  # a median, no target of its own
    assert teacher["ball ≤4 px at h1 (%, ≥80)"] == "75 ✗"
    assert teacher["hit bricks gone (%)"] == "—"
    assert (teacher["TF context check"], copy["TF context check"]) == ("pass ✓", "fail ✗")
    # Met: paddle found, jump, dynamic PSNR (≥ the made-up 0 dB baseline), context check.
    assert teacher["targets met"] == "4/10"
    # None values print as a dash, without a mark.
    assert student["direction agree (%, ≥95)"] == "—"


def test_markdown_reads_reports_without_control_metrics(tmp_path: Path) -> None:
    """Reports of an older crcm eval (no control metrics) still merge; their cells are dashes."""
    old = _model(20.0, EULER)
    for key in ("control", "objects", "context_check", "targets"):
        del old[key]
    rows = _tables(markdown_table(load_reports([_write(tmp_path, "a.json", _report("m", old))])))
    m = rows[1][1]
    assert m["model"] == "m" and m["sensitivity (≥0.8)"] == "—" and m["targets met"] == "—"


def test_markdown_adapts_to_horizons(tmp_path: Path) -> None:
    hs = (2, 16, 64)
    a = _write(tmp_path, "a.json", _report("m", _model(5.0, ONE_STEP, horizons=hs), horizons=hs))
    fidelity, control = _tables(markdown_table(load_reports([a])))
    m = fidelity[1]
    assert [k for k in m if k.startswith("dyn PSNR")] == [f"dyn PSNR h{h} (dB)" for h in hs]
    assert ("PSNR h2 (dB)" in m) and ("PSNR h64 (dB)" in m) and not any("128" in k for k in m)
    # The control horizons go up to 32 here; the nearest to 8 and 32 are shown.
    c = control[1]
    assert c["paddle err h8 (px, ≤4 at h8)"] == "8.5 ✗"  # 5 / 10 + 8
    assert c["paddle err h32 (px, ≤8 at h32)"] == "32.5 ✗"


def test_markdown_names_differing_drift_spans(tmp_path: Path, two_reports: list[Path]) -> None:
    report = json.loads(two_reports[1].read_text())
    report["drift"]["models"]["student"]["psnr_static"] = {"0-100": 15.0, "100-500": 12.0}
    other = _write(tmp_path, "c.json", report)
    rows = _tables(markdown_table(load_reports([two_reports[0], other])))[0]
    cells = {r["model"]: r["drift static PSNR, last span (dB)"] for r in rows}
    assert cells == {
        BASELINE: "100.0 (100-200)",
        "teacher": "13.4 (100-200)",
        "student": "12.0 (100-500)",
    }


def test_nearest_horizon() -> None:
    assert nearest_horizon((1, 8, 32, 128), 32) == 32
    assert nearest_horizon((1, 4, 128), 32) == 128  # log distance: 2 vs 3 octaves
    assert nearest_horizon((16, 64), 32) == 16


def _series(root: ET.Element, model: str, metric: str) -> ET.Element:
    found = [
        g
        for g in root.iter(f"{SVG}g")
        if g.get("class") == "series"
        and g.get("data-model") == model
        and g.get("data-metric") == metric
    ]
    assert len(found) == 1, (model, metric)
    return found[0]


def _points(polyline: ET.Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in polyline.get("points").split()]


def test_svg_structure(two_reports: list[Path]) -> None:
    table = load_reports(two_reports)
    metrics = ("psnr_dynamic", "paddle_error_px", "ball_error_px")
    svg = svg_plot(table)
    assert svg == svg_plot(load_reports(two_reports))  # deterministic
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert 900 <= float(root.get("width")) <= 1200 and float(root.get("height")) == 340
    panels = [g.get("data-metric") for g in root.iter(f"{SVG}g") if g.get("class") == "panel"]
    assert panels == list(metrics)
    for model in table.models:
        for metric in metrics:
            lines = _series(root, model, metric).findall(f"{SVG}polyline")
            broken = model == "student" and metric == "ball_error_px"
            # The student's missing h8 ball error splits its line into h1 and h32..h128.
            assert [len(_points(p)) for p in lines] == ([1, 2] if broken else [4])
            dashed = {p.get("stroke-dasharray") for p in lines}
            assert dashed == ({"6 4"} if model == BASELINE else {None})
    # Higher values are drawn higher (smaller y): the teacher's dynamic PSNR rises with h.
    ys = [y for _, y in _points(_series(root, "teacher", "psnr_dynamic").find(f"{SVG}polyline"))]
    assert ys == sorted(ys, reverse=True) and ys[0] > ys[-1]
    xs = [x for x, _ in _points(_series(root, "teacher", "psnr_dynamic").find(f"{SVG}polyline"))]
    # log2 axis: 1 -> 8 is three octaves, 8 -> 32 and 32 -> 128 two each.
    assert xs[1] - xs[0] == pytest.approx(1.5 * (xs[2] - xs[1]), abs=0.2)
    assert xs[2] - xs[1] == pytest.approx(xs[3] - xs[2], abs=0.2)
    texts = [t.text for t in root.iter(f"{SVG}text")]
    legend = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "legend")
    legend_texts = [t.text for t in legend.iter(f"{SVG}text")]
    assert legend_texts == [f"{BASELINE} (baseline)", "teacher", "student"]
    assert texts.count("128") == 3  # horizon tick labels in each panel
    assert "dynamic-region PSNR (dB)" in texts and "paddle x error (native px)" in texts


def test_svg_all_missing_metric_and_escaping(tmp_path: Path) -> None:
    missing = {h: {"bricks_error"} for h in HORIZONS}
    report = _report("a<&>b", _model(20.0, EULER, missing=missing))
    report["models"][BASELINE]["horizons"] = _stats(10.0, missing=missing)
    table = load_reports([_write(tmp_path, "a.json", report)])
    root = ET.fromstring(svg_plot(table, metrics=("bricks_error", "psnr")))
    assert _series_count(root, "bricks_error") == 0
    assert _series_count(root, "psnr") == 2
    assert "no data" in [t.text for t in root.iter(f"{SVG}text")]
    assert "a<&>b" in [t.text for t in root.iter(f"{SVG}text")]


def _series_count(root: ET.Element, metric: str) -> int:
    return sum(
        len(g.findall(f"{SVG}polyline"))
        for g in root.iter(f"{SVG}g")
        if g.get("class") == "series" and g.get("data-metric") == metric
    )


def test_eval_table_command_writes_files(
    tmp_path: Path, two_reports: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from crcm.cli_data import add_eval_table_parser

    parser = argparse.ArgumentParser()
    add_eval_table_parser(parser.add_subparsers())
    md, svg = tmp_path / "out" / "t.md", tmp_path / "plots" / "deep" / "p.svg"
    argv = ["eval-table", *map(str, two_reports), "--markdown", str(md), "--plot", str(svg)]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    expected = markdown_table(load_reports(two_reports))
    assert printed.startswith(expected)
    assert md.read_text() == expected
    assert svg.read_text() == svg_plot(load_reports(two_reports))
    assert "| teacher | Euler 16 + CFG 3 |" in printed

    # Without --markdown/--plot it only prints.
    args = parser.parse_args(["eval-table", str(two_reports[0])])
    assert args.func(args) == 0
    assert capsys.readouterr().out == markdown_table(load_reports(two_reports[:1]))


def test_the_sampler_column_names_a_still_threshold():
    from crcm.eval.report import _sampler_text

    one_step = {"kind": "consistency", "steps": 1, "cfg_scale": 1.0}
    assert _sampler_text({**one_step, "still_threshold": 0.0}) == "1 step"
    held = {**one_step, "still_threshold": 16 / 127.5}
    assert _sampler_text(held) == "1 step, still < 16 grey"
