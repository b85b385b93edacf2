"""Comparison tables and plots from several ``crcm eval`` reports.

Each ``crcm eval --model M --name LABEL --out FILE.json`` report holds one world model and the
copy-last-frame baseline, measured on the same held-out windows. :func:`load_reports` merges
several such reports into one :class:`EvalTable` (refusing reports made on different episodes,
since their numbers would not be comparable), :func:`markdown_table` renders one row per model
(a fidelity table, then issue 16's control and object metrics with their targets met or not)
and :func:`svg_plot` draws metrics against the horizon, without any plotting library.

Pixel errors are in native Atari pixels (160 wide × 210 high), as the reports store them; a
frame without the object counts as 160 px (``crcm.eval.control.MISS_PX``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from crcm.errors import ConfigError

__all__ = [
    "BASELINE",
    "METRIC_LABELS",
    "EvalTable",
    "load_reports",
    "markdown_table",
    "nearest_horizon",
    "svg_plot",
]

BASELINE = "copy-last-frame"
"""The label of the baseline every ``crcm eval`` report includes."""

# Keys that define the evaluation windows: reports that differ in any of them did not measure
# the same frames, so putting them in one table would compare different tests.
_SAME_KEYS = ("eval_seeds", "horizons", "frame_hw", "frameskip", "context_frames")

MISSING = "—"

METRIC_LABELS: dict[str, tuple[str, str]] = {
    # metric key -> (axis title, unit); the unit is "" for ratios and scores.
    "psnr": ("whole-frame PSNR", "dB"),
    "psnr_dynamic": ("dynamic-region PSNR", "dB"),
    "ssim": ("whole-frame SSIM", ""),
    "ssim_dynamic": ("dynamic-region SSIM", ""),
    "paddle_error_px": ("paddle x error", "native px"),
    "ball_error_px": ("ball position error", "native px"),
    "ball_found": ("ball found", "fraction"),
    "bricks_error": ("brick count error", "bricks"),
    "paddle_found": ("paddle found", "fraction"),
}
"""Axis titles and units of the per-horizon metrics, for :func:`svg_plot`."""


@dataclass(frozen=True)
class EvalTable:
    """Several ``crcm eval`` reports merged: every model measured on the same windows.

    Attributes:
        horizons: the horizons (frames ahead) every model was measured at, ascending.
        eval_seeds: the held-out episode seeds the reports share.
        frame_hw: frame size (height, width) the models generated.
        frameskip: emulator frames per step.
        context_frames: ground-truth context frames k given to each model.
        windows: evaluation windows (start points) per model.
        episodes: held-out episodes that gave windows (long enough for every horizon).
        models: label -> the report's entry for that model (``sampler``, ``horizons``,
            ``control``, ``objects``, ``context_check``, ``targets``, ``seconds``, …),
            copy-last-frame first, then in file order.
        drift: label -> the model's long-rollout entry (``frames``, ``psnr_static``,
            ``paddle_found``, ``frames_per_s``); models of reports without a drift rollout are
            absent.
        sources: label -> the report file the model was read from.
    """

    horizons: tuple[int, ...]
    eval_seeds: tuple[int, ...]
    frame_hw: tuple[int, int]
    frameskip: int
    context_frames: int
    windows: int
    episodes: int
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    drift: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: dict[str, Path] = field(default_factory=dict)

    def metric(self, model: str, horizon: int, key: str) -> float | None:
        """The mean of ``key`` for ``model`` at ``horizon``, or None where it was not measured."""
        stats = self.models[model].get("horizons", {}).get(str(horizon), {})
        return _number(stats.get(key))


def _number(value: Any) -> float | None:
    """``value`` as a float, or None for missing, non-numeric or non-finite values.

    Reports may hold NaN (e.g. PSNR over an empty mask); treating it as missing keeps it out of
    the table and breaks the plotted line instead of drawing nonsense.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _read(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the report ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    missing = [
        k for k in (*_SAME_KEYS, "models") if not isinstance(report, dict) or k not in report
    ]
    if missing:
        raise ConfigError(
            f"{path}: not a crcm eval report (missing {', '.join(missing)}); "
            "make one with `crcm eval --out FILE.json`"
        )
    return report


def _episode_windows(report: Mapping[str, Any]) -> list[tuple[Any, Any]] | None:
    """The (seed, start points) of the report's episodes, or None if it does not list them."""
    episodes = report.get("episodes")
    if not isinstance(episodes, list):
        return None
    return [(e.get("seed"), e.get("starts")) for e in episodes if isinstance(e, dict)]


def load_reports(paths: Sequence[str | Path]) -> EvalTable:
    """Reads ``crcm eval`` JSON reports and merges their models into one table.

    The reports must share ``eval_seeds``, ``horizons``, ``frame_hw``, ``frameskip`` and
    ``context_frames`` (and, where both list them, the episodes' start points), i.e. they
    measured the same windows. The copy-last-frame baseline, which every report holds, is kept
    once (from the first report that has it) and put first; the other models follow in file
    order, then in each file's order.

    Raises:
        ConfigError: no paths, an unreadable or malformed file, reports made on different
            windows (the message names the file and the differing keys), or the same model
            label in two files (the fix is distinct ``crcm eval --name`` labels).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConfigError("no eval reports given")
    seen_paths: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen_paths:
            raise ConfigError(f"{p}: the same report is listed twice")
        seen_paths[key] = p

    first_path, first = paths[0], _read(paths[0])
    baseline: tuple[dict[str, Any], dict[str, Any] | None, Path] | None = None
    models: dict[str, dict[str, Any]] = {}
    drift: dict[str, dict[str, Any]] = {}
    sources: dict[str, Path] = {}
    for path in paths:
        report = first if path is first_path else _read(path)
        differ = [
            f"{k}: {report[k]!r} vs {first[k]!r}" for k in _SAME_KEYS if report[k] != first[k]
        ]
        ours, theirs = _episode_windows(report), _episode_windows(first)
        if ours is not None and theirs is not None and ours != theirs:
            differ.append("the episodes' start points differ")
        if differ:
            raise ConfigError(
                f"{path} was not made on the same evaluation windows as {first_path} "
                f"({'; '.join(differ)}); run `crcm eval` with the same --episodes/--seed/"
                "--horizons/--context/--frameskip/--size/--max-steps settings"
            )
        report_drift = report.get("drift", {}).get("models", {}) if report.get("drift") else {}
        for name, entry in report["models"].items():
            if name == BASELINE:
                if baseline is None:  # every report repeats it; they agree on the same windows
                    baseline = (entry, report_drift.get(name), path)
                continue
            if name in models:
                raise ConfigError(
                    f"model {name!r} is in both {sources[name]} and {path}; give each model a "
                    "distinct label with `crcm eval --name LABEL`"
                )
            models[name] = entry
            sources[name] = path
            if name in report_drift:
                drift[name] = report_drift[name]

    if baseline is not None:
        entry, base_drift, path = baseline
        models = {BASELINE: entry, **models}
        sources = {BASELINE: path, **sources}
        if base_drift is not None:
            drift = {BASELINE: base_drift, **drift}
    return EvalTable(
        horizons=tuple(sorted(int(h) for h in first["horizons"])),
        eval_seeds=tuple(int(s) for s in first["eval_seeds"]),
        frame_hw=(int(first["frame_hw"][0]), int(first["frame_hw"][1])),
        frameskip=int(first["frameskip"]),
        context_frames=int(first["context_frames"]),
        windows=int(first.get("windows") or 0),
        episodes=len(first["episodes"])
        if isinstance(first.get("episodes"), list)
        else len(first["eval_seeds"]),
        models=models,
        drift=drift,
        sources=sources,
    )


def nearest_horizon(horizons: Sequence[int], target: int) -> int:
    """The horizon closest to ``target`` on a log scale (ties go to the shorter horizon).

    Horizons are usually spaced geometrically (1, 8, 32, 128), so the log distance is the one
    that matches how far apart they are; a shorter horizon wins ties because it has more
    comparable data (fewer windows are skipped for it).
    """
    if not horizons:
        raise ConfigError("the reports have no horizons")
    return min(sorted(horizons), key=lambda h: abs(math.log2(h) - math.log2(target)))


def _sampler_text(sampler: Mapping[str, Any] | None) -> str:
    """``"1 step"``, ``"4 steps"``, ``"Euler 16 + CFG 3"``, ``"1 step, still < 16 grey"`` (a
    still threshold, in grey levels of a pixel codec); ``"—"`` for copy-last-frame."""
    if not sampler:
        return MISSING
    steps = sampler.get("steps")
    kind = sampler.get("kind")
    cfg = _number(sampler.get("cfg_scale"))
    if kind == "euler":
        text = f"Euler {steps}" if steps is not None else "Euler"
    else:
        text = f"{steps} step{'' if steps == 1 else 's'}" if steps is not None else str(kind)
    if cfg is not None and cfg != 1.0:
        text += f" + CFG {cfg:g}"
    still = _number(sampler.get("still_threshold"))
    if still:
        text += f", still < {still * 127.5:.0f} grey"
    return text


def _fmt(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    value = _number(value)
    return MISSING if value is None else f"{value * scale:.{digits}f}"


def _cell(text: str) -> str:
    # A '|' in a model label would split the Markdown cell.
    return text.replace("|", "\\|")


def _drift_last(entry: Mapping[str, Any] | None) -> tuple[str, float | None] | None:
    """(span, static PSNR) of the last span of a drift rollout, or None without one."""
    spans = (entry or {}).get("psnr_static") or {}
    if not spans:
        return None
    span = list(spans)[-1]  # spans are written in rollout order
    return span, _number(spans[span])


def _get(entry: Mapping[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(entry, Mapping) or key not in entry:
            return None
        entry = entry[key]
    return entry


def _marked(text: str, entry: Mapping[str, Any], target: str | None) -> str:
    """``text`` with ✓ or ✗ after it when the report judged ``target`` (issue 16's)."""
    passed = _get(entry, "targets", target, "pass") if target else None
    if text == MISSING or passed is None:
        return text
    return f"{text} {'✓' if passed else '✗'}"


def _fidelity_table(table: EvalTable) -> list[str]:
    hs = table.horizons
    lo, hi = hs[0], hs[-1]
    last = {name: _drift_last(table.drift.get(name)) for name in table.models}
    spans = {v[0] for v in last.values() if v is not None}
    # One shared span goes in the header; rollouts of different lengths name theirs per cell.
    span_header = f"frames {next(iter(spans))}" if len(spans) == 1 else "last span"

    header = ["model", "sampler"]
    header += [f"dyn PSNR h{h} (dB)" for h in hs]
    header += [f"PSNR h{h} (dB)" for h in dict.fromkeys((lo, hi))]
    header += [f"drift static PSNR, {span_header} (dB)", "drift frames/s"]
    rows = []
    for name, entry in table.models.items():
        row = [_cell(name), _sampler_text(entry.get("sampler"))]
        row += [_fmt(table.metric(name, h, "psnr_dynamic")) for h in hs]
        row += [_fmt(table.metric(name, h, "psnr")) for h in dict.fromkeys((lo, hi))]
        if last[name] is None:
            row.append(MISSING)
        else:
            span, value = last[name]
            text = _fmt(value)
            row.append(text if len(spans) == 1 or value is None else f"{text} ({span})")
        fps = None if name == BASELINE else _number(table.drift.get(name, {}).get("frames_per_s"))
        row.append(_fmt(fps))
        rows.append(row)
    return _render(header, rows, text_columns=2)


def _control_table(table: EvalTable) -> list[str]:
    """Issue 16's metrics, each with its target in the header and ✓/✗ where it was judged."""
    ctrl_hs = sorted(
        {
            int(h)
            for m in table.models.values()
            for h in (_get(m, "control", "paddle_error_px", "all") or {})
        }
    )
    h8 = nearest_horizon(ctrl_hs, 8) if ctrl_hs else 8
    h32 = nearest_horizon(ctrl_hs, 32) if ctrl_hs else 32
    header = [
        "model",
        f"paddle err h{h8} (px, ≤4 at h8)",
        f"paddle err h{h32} (px, ≤8 at h32)",
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
    rows = []
    for name, e in table.models.items():
        err = _get(e, "control", "paddle_error_px", "all") or {}
        ctx = _get(e, "context_check", "pass")
        targets = _get(e, "targets") or {}
        met = sum(_get(t, "pass") is True for t in targets.values())
        row = [
            _cell(name),
            _marked(_fmt(err.get(str(h8))), e, "paddle_h8" if h8 == 8 else None),
            _marked(_fmt(err.get(str(h32))), e, "paddle_h32" if h32 == 32 else None),
            _marked(_fmt(_get(e, "control", "sensitivity"), 2), e, "sensitivity"),
            _marked(_fmt(_get(e, "control", "direction_agree"), 0, 100.0), e, "direction"),
            # The shuffled control is part of the direction target (judged in that cell).
            _fmt(_get(e, "control", "direction_agree_shuffled"), 0, 100.0),
            _marked(_fmt(_get(e, "objects", "paddle_found"), 0, 100.0), e, "paddle_found"),
            _marked(_fmt(_get(e, "objects", "paddle_max_jump_px")), e, "paddle_jump"),
            _marked(_fmt(_get(e, "objects", "ball_found"), 0, 100.0), e, "ball_found"),
            _fmt(_get(e, "objects", "ball_error_px", "1")),
            _marked(_fmt(_get(e, "objects", "ball_close_h1"), 0, 100.0), e, "ball_h1"),
            _fmt(_get(e, "objects", "brick_hit_disappears"), 0, 100.0),
            MISSING if ctx is None else ("pass ✓" if ctx else "fail ✗"),
            f"{met}/{len(targets)}" if targets else MISSING,
        ]
        rows.append(row)
    return _render(header, rows, text_columns=1)


def _render(header: list[str], rows: list[list[str]], text_columns: int) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines.append("|" + "|".join(align) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def markdown_table(table: EvalTable) -> str:
    """Two Markdown tables with a row per model (copy-last-frame first), each after a line of
    what it measured.

    The first is fidelity: model, sampler, dynamic-region PSNR at every horizon, whole-frame
    PSNR at the shortest and longest horizons, the drift rollout's static-region PSNR over its
    last span and its frames/s. The second is issue 16's control and object metrics with each
    target in its column header and ✓/✗ where the report judged it: paddle x error under the
    scripted actions near h8 and h32 (the nearest control horizons), action sensitivity,
    direction agreement and its shuffled-action control, paddle found and its largest jump,
    ball found at h ≤ 8, ball error at h1 and the share within 4 px, the share of knocked-out
    bricks that disappear, the teacher-forced context check and the number of targets met.
    Values that were not measured print as "—".
    """
    h, w = table.frame_hw
    note = (
        f"Paddle/ball errors in native Atari pixels (160×210), PSNR in dB; {table.windows} "
        f"windows of {table.episodes} held-out episodes, {h}x{w} frames, "
        f"{table.context_frames} context frames; copy-last-frame is the baseline."
    )
    control_note = (
        "Scripted actions (LEFT held, RIGHT held, LEFT/RIGHT alternating) from the same "
        "windows, played by the emulator from its snapshot and by the model; errors are "
        "medians and count a frame without the object as 160 px; rates are shares of frames "
        "or steps; ✓/✗: the target in the header met or not (docs/atari.md)."
    )
    lines = [note, "", *_fidelity_table(table), "", control_note, "", *_control_table(table)]
    return "\n".join(lines) + "\n"


# --- SVG ---------------------------------------------------------------------------------------

_PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
)
_BASELINE_COLOR = "#888888"
_PANEL_W, _PANEL_H = 270, 340
_MARGIN = {"left": 58, "right": 14, "top": 34, "bottom": 52}
_FONT = 'font-family="sans-serif"'


def _nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About ``target`` round tick values (steps of 1, 2 or 5 × 10^k) covering [lo, hi]."""
    if hi <= lo:
        pad = max(abs(lo) * 0.1, 1.0)
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(target - 1, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    last = math.ceil(hi / step - 1e-9) * step
    count = round((last - first) / step)
    # Rounding to the step's decimals keeps labels like 0.30000000000000004 out of the SVG.
    digits = max(0, -math.floor(math.log10(step)))
    return [round(first + i * step, digits) for i in range(count + 1)]


def _tick_label(value: float, ticks: Sequence[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    digits = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return f"{value:.{digits}f}"


def _num(v: float) -> str:
    """A coordinate with one decimal: short, and identical for identical input."""
    return f"{v:.1f}"


def _panel(
    table: EvalTable, metric: str, x0: float, colors: Mapping[str, str], out: list[str]
) -> None:
    """Appends one panel (axes, ticks, titles and one series per model) at x offset ``x0``."""
    m = _MARGIN
    left, top = x0 + m["left"], m["top"]
    width = _PANEL_W - m["left"] - m["right"]
    height = _PANEL_H - m["top"] - m["bottom"]
    bottom = top + height
    title, unit = METRIC_LABELS.get(metric, (metric.replace("_", " "), ""))
    hs = table.horizons

    # x: log2 of the horizon; a single horizon sits in the middle.
    lx = [math.log2(h) for h in hs]
    span_x = (lx[-1] - lx[0]) or 1.0
    inset = 0.06 * width  # keeps the end markers off the frame

    def xpos(h: int) -> float:
        if len(hs) == 1:
            return left + width / 2
        return left + inset + (math.log2(h) - lx[0]) / span_x * (width - 2 * inset)

    values = {name: [table.metric(name, h, metric) for h in hs] for name in table.models}
    finite = [v for vs in values.values() for v in vs if v is not None]

    out.append(f'<g class="panel" data-metric={quoteattr(metric)}>')
    out.append(
        f'<text x="{_num(left + width / 2)}" y="{_num(top - 14)}" text-anchor="middle" '
        f'font-size="14" font-weight="bold" {_FONT}>{escape(title)}</text>'
    )
    out.append(
        f'<rect x="{_num(left)}" y="{_num(top)}" width="{_num(width)}" height="{_num(height)}" '
        'fill="none" stroke="#333333" stroke-width="1"/>'
    )
    # x ticks at the horizons
    for h in hs:
        x = xpos(h)
        out.append(
            f'<line x1="{_num(x)}" y1="{_num(bottom)}" x2="{_num(x)}" y2="{_num(bottom + 4)}" '
            'stroke="#333333"/>'
        )
        out.append(
            f'<text x="{_num(x)}" y="{_num(bottom + 17)}" text-anchor="middle" font-size="11" '
            f"{_FONT}>{h}</text>"
        )
    out.append(
        f'<text x="{_num(left + width / 2)}" y="{_num(bottom + 38)}" text-anchor="middle" '
        f'font-size="12" {_FONT}>horizon (frames ahead, log scale)</text>'
    )
    y_title = f"{title} ({unit})" if unit else title
    cy = top + height / 2
    out.append(
        f'<text x="{_num(x0 + 14)}" y="{_num(cy)}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 {_num(x0 + 14)} {_num(cy)})" {_FONT}>{escape(y_title)}</text>'
    )
    if not finite:
        out.append(
            f'<text x="{_num(left + width / 2)}" y="{_num(cy)}" text-anchor="middle" '
            f'font-size="12" fill="#888888" {_FONT}>no data</text>'
        )
        out.append("</g>")
        return

    ticks = _nice_ticks(min(finite), max(finite))
    y_lo, y_hi = ticks[0], ticks[-1]

    def ypos(v: float) -> float:
        return bottom - (v - y_lo) / (y_hi - y_lo) * height

    for t in ticks:
        y = ypos(t)
        out.append(
            f'<line x1="{_num(left)}" y1="{_num(y)}" x2="{_num(left + width)}" y2="{_num(y)}" '
            'stroke="#e0e0e0"/>'
        )
        out.append(
            f'<text x="{_num(left - 5)}" y="{_num(y + 4)}" text-anchor="end" font-size="11" '
            f"{_FONT}>{_tick_label(t, ticks)}</text>"
        )
    # Baseline drawn first so the models' lines sit on top of it.
    order = [n for n in values if n == BASELINE] + [n for n in values if n != BASELINE]
    for name in order:
        color = colors[name]
        dash = ' stroke-dasharray="6 4"' if name == BASELINE else ""
        out.append(
            f'<g class="series" data-model={quoteattr(name)} data-metric={quoteattr(metric)}>'
        )
        out.append(f"<title>{escape(name)}</title>")
        # A missing value ends the current piece: the line is broken rather than bridged.
        pieces: list[list[tuple[float, float]]] = [[]]
        for h, v in zip(hs, values[name], strict=True):
            if v is None:
                if pieces[-1]:
                    pieces.append([])
                continue
            pieces[-1].append((xpos(h), ypos(v)))
        for piece in (p for p in pieces if p):
            pts = " ".join(f"{_num(x)},{_num(y)}" for x, y in piece)
            out.append(
                f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"{dash}/>'
            )
            for x, y in piece:
                out.append(f'<circle cx="{_num(x)}" cy="{_num(y)}" r="3.5" fill="{color}"/>')
        out.append("</g>")
    out.append("</g>")


def svg_plot(
    table: EvalTable,
    metrics: Sequence[str] = ("psnr_dynamic", "paddle_error_px", "ball_error_px"),
) -> str:
    """A self-contained SVG: one panel per metric, the metric against the horizon per model.

    The x axis is log2 of the horizon with ticks at the measured horizons; each model is a
    polyline with markers (copy-last-frame dashed grey), broken where a value is missing; a
    legend on the right names the models. About 1000×340 px for three metrics; the output is
    a pure function of the input (no timestamps, fixed number formatting).
    """
    if not metrics:
        raise ConfigError("svg_plot needs at least one metric")
    names = list(table.models)
    colors: dict[str, str] = {}
    others = iter(_PALETTE * (len(names) // len(_PALETTE) + 1))
    for name in names:
        colors[name] = _BASELINE_COLOR if name == BASELINE else next(others)

    labels = {n: f"{n} (baseline)" if n == BASELINE else n for n in names}
    legend_x = len(metrics) * _PANEL_W + 10
    # Legend width from the longest label (about 7 px per character at 12 px).
    legend_w = 40 + 7 * max((len(t) for t in labels.values()), default=8)
    width = legend_x + legend_w
    height = max(_PANEL_H, _MARGIN["top"] + 20 * len(names) + 10)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        "<title>World models against the Breakout emulator, by horizon</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    for i, metric in enumerate(metrics):
        _panel(table, metric, i * _PANEL_W, colors, out)

    out.append('<g class="legend">')
    for i, name in enumerate(names):
        y = _MARGIN["top"] + 10 + 20 * i
        dash = ' stroke-dasharray="6 4"' if name == BASELINE else ""
        out.append(
            f'<line x1="{legend_x}" y1="{y}" x2="{legend_x + 24}" y2="{y}" '
            f'stroke="{colors[name]}" stroke-width="2"{dash}/>'
        )
        out.append(f'<circle cx="{legend_x + 12}" cy="{y}" r="3.5" fill="{colors[name]}"/>')
        out.append(
            f'<text x="{legend_x + 30}" y="{y + 4}" font-size="12" {_FONT}>'
            f"{escape(labels[name])}</text>"
        )
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
