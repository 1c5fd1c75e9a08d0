"""A standalone HTML evaluation report: metrics with CIs, association tests, edge cases, decision, limits."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from html import escape
from pathlib import Path

import pandas as pd

from st_assets.steps.evaluate import MIN_INTERVAL_ROWS
from st_assets.steps.models import fsync_path

LIMITS_NOTE = (
    "Association tests (SEAT/WEAT) can show bias; a small or non-significant effect size does not prove "
    "its absence, only that these probes did not find it. Counterfactual invariance covers English "
    "gendered words in the eval texts only. Confidence intervals resample the held-out eval examples; "
    "they do not cover training randomness or data unlike the eval split. The edge-case probes are a "
    "small bundled set, meant to flag regressions rather than certify robustness."
)

ROLE_ORDER: tuple[str, ...] = ("base", "challenger", "champion")
_ROLE_COLOURS = {"base": "#8c8c8c", "challenger": "#2f6db5", "champion": "#d9822b"}
_OTHER_COLOUR = "#5a9e6f"

# Chart geometry in px: label column, plot area, value column, one row per model.
_LABEL_WIDTH, _PLOT_WIDTH, _VALUE_WIDTH, _ROW_HEIGHT, _TOP = 170, 260, 150, 24, 26

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
       color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem;
     margin-top: 2.2rem; } h3 { font-size: 1.05rem; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: .88rem; }
th, td { border: 1px solid #ddd; padding: .25rem .55rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
td.pass { color: #1d7a3a; font-weight: 600; } td.fail { color: #b3261e; font-weight: 600; }
.charts { display: flex; flex-wrap: wrap; gap: 1rem; }
.chart { border: 1px solid #e5e5e5; border-radius: 4px; padding: .3rem; background: #fff; }
.legend span { display: inline-block; margin-right: 1rem; font-size: .85rem; }
.legend i { display: inline-block; width: .8rem; height: .8rem; margin-right: .3rem; vertical-align: -1px; }
.limits { background: #fff8e1; border-left: 4px solid #e0a800; padding: .6rem 1rem; }
ul.reasons li { margin: .2rem 0; }
"""


@dataclass(frozen=True)
class _Bar:
    """One model's value on one chart, with an optional CI (NaN bounds draw no whisker)."""

    label: str
    role: str
    value: float
    low: float = math.nan
    high: float = math.nan


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _number(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _role_rank(role: str) -> tuple[int, str]:
    return (ROLE_ORDER.index(role), role) if role in ROLE_ORDER else (len(ROLE_ORDER), role)


def _models(*frames: pd.DataFrame) -> list[tuple[str, str]]:
    """Distinct (role, model_version) across frames, base first, then challenger, then champion."""
    found = {
        (str(role), str(version))
        for frame in frames
        if not frame.empty
        for role, version in zip(frame["role"], frame["model_version"], strict=True)
    }
    return sorted(found, key=lambda model: (_role_rank(model[0]), model[1]))


def _model_label(role: str, version: str) -> str:
    return role if role == version else f"{role} ({version})"


def _colour(role: str) -> str:
    return _ROLE_COLOURS.get(role, _OTHER_COLOUR)


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _bar_chart(title: str, bars: list[_Bar]) -> str:
    """A horizontal bar chart as inline SVG: one bar per model from zero, a whisker for its CI."""
    extent = _finite([v for bar in bars for v in (bar.value, bar.low, bar.high)])
    low, high = min([0.0, *extent]), max([0.0, *extent])
    # Scores bounded by 1 are drawn up to 1, so charts of different metrics share one scale.
    if low >= -1.0 and high <= 1.0:
        high = 1.0
    if high - low == 0:
        high = low + 1.0
    pad = (high - low) * 0.04
    low, high = low - (pad if low < 0 else 0.0), high + pad

    def x(value: float) -> float:
        return _LABEL_WIDTH + (value - low) / (high - low) * _PLOT_WIDTH

    width = _LABEL_WIDTH + _PLOT_WIDTH + _VALUE_WIDTH
    height = _TOP + _ROW_HEIGHT * len(bars) + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
        f'<text x="4" y="16" font-size="13" font-weight="600">{_e(title)}</text>',
        f'<line x1="{x(0):.1f}" y1="{_TOP - 4}" x2="{x(0):.1f}" y2="{height - 4}" stroke="#999" />',
    ]
    for i, bar in enumerate(bars):
        top = _TOP + i * _ROW_HEIGHT
        middle = top + _ROW_HEIGHT / 2
        parts.append(
            f'<text x="{_LABEL_WIDTH - 6}" y="{middle + 4:.1f}" font-size="11" text-anchor="end">'
            f"{_e(bar.label)}</text>"
        )
        if not math.isnan(bar.value):
            left, right = sorted((x(0), x(bar.value)))
            parts.append(
                f'<rect x="{left:.1f}" y="{top + 4}" width="{max(right - left, 1):.1f}" '
                f'height="{_ROW_HEIGHT - 8}" fill="{_colour(bar.role)}" />'
            )
        if not (math.isnan(bar.low) or math.isnan(bar.high)):
            x_low, x_high = x(bar.low), x(bar.high)
            parts += [
                f'<line x1="{x_low:.1f}" y1="{middle:.1f}" x2="{x_high:.1f}" y2="{middle:.1f}" '
                'stroke="#222" stroke-width="1.2" />',
                *(
                    f'<line x1="{end:.1f}" y1="{middle - 5:.1f}" x2="{end:.1f}" y2="{middle + 5:.1f}" '
                    'stroke="#222" stroke-width="1.2" />'
                    for end in (x_low, x_high)
                ),
            ]
        text = _number(bar.value)
        if not (math.isnan(bar.low) or math.isnan(bar.high)):
            text += f" [{bar.low:.3f}, {bar.high:.3f}]"
        parts.append(
            f'<text x="{_LABEL_WIDTH + _PLOT_WIDTH + 6}" y="{middle + 4:.1f}" font-size="11">{_e(text)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(header: list[str], rows: list[list[object]]) -> str:
    """An HTML table; floats to three places, booleans as a pass/fail cell, everything escaped."""
    cells = []
    for row in rows:
        rendered = []
        for value in row:
            if isinstance(value, bool):
                css = "pass" if value else "fail"
                rendered.append(f'<td class="{css}">{"pass" if value else "fail"}</td>')
            elif isinstance(value, int | float):
                rendered.append(f'<td class="number">{_e(_number(value))}</td>')
            else:
                rendered.append(f"<td>{_e(_number(value))}</td>")
        cells.append("<tr>" + "".join(rendered) + "</tr>")
    head = "".join(f"<th>{_e(name)}</th>" for name in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(cells)}</tbody></table>"


def _plain(value: object) -> object:
    """NumPy scalars as Python ones, so the table formats them by type."""
    return value.item() if hasattr(value, "item") else value


def _legend(models: list[tuple[str, str]]) -> str:
    items = "".join(
        f'<span><i style="background:{_colour(role)}"></i>{_e(_model_label(role, version))}</span>'
        for role, version in models
    )
    return f'<p class="legend">{items}</p>'


def _models_section(models: pd.DataFrame) -> str:
    if models.empty:
        return ""
    columns = list(models.columns)
    rows = [[_plain(value) for value in record] for record in models.itertuples(index=False)]
    return "<h2>Models compared</h2>" + _table(columns, rows)


def _with_interval(value: float, low: float, high: float) -> str:
    """A value with its CI in brackets, or alone when the CI is not known."""
    return _number(value) + ("" if math.isnan(low) or math.isnan(high) else f" [{low:.3f}, {high:.3f}]")


def _evaluation_section(evaluation: pd.DataFrame) -> str:
    if evaluation.empty:
        return "<h2>Held-out evaluation</h2><p>No evaluation rows.</p>"
    models = _models(evaluation)
    labels = [_model_label(role, version) for role, version in models]
    charts, rows = [], []
    for (dataset, metric), group in evaluation.groupby(["dataset", "metric"], sort=True):
        by_model = {(str(r.role), str(r.model_version)): r for r in group.itertuples()}
        bars, row = [], [dataset, metric]
        for model, label in zip(models, labels, strict=True):
            record = by_model.get(model)
            value, low, high = (
                (float(record.value), float(record.ci_low), float(record.ci_high))
                if record is not None
                else (math.nan, math.nan, math.nan)
            )
            bars.append(_Bar(label, model[0], value, low, high))
            row.append(_with_interval(value, low, high))
        charts.append(f'<div class="chart">{_bar_chart(f"{dataset} · {metric}", bars)}</div>')
        rows.append(row)
    return (
        "<h2>Held-out evaluation</h2>"
        "<p>Each metric on the eval split with its 95% bootstrap confidence interval (whiskers).</p>"
        + _legend(models)
        + f'<div class="charts">{"".join(charts)}</div>'
        + _table(["dataset", "metric", *labels], rows)
    )


def _fairness_section(fairness: pd.DataFrame) -> str:
    if fairness.empty:
        return "<h2>Association tests and counterfactual invariance</h2><p>No fairness rows.</p>"
    models = _models(fairness)
    labels = [_model_label(role, version) for role, version in models]
    effects = fairness[fairness["metric"] == "effect_size"]
    charts = []
    for test, group in effects.groupby("test", sort=True):
        by_model = {(str(r.role), str(r.model_version)): float(r.value) for r in group.itertuples()}
        bars = [
            _Bar(label, model[0], by_model.get(model, math.nan))
            for model, label in zip(models, labels, strict=True)
        ]
        charts.append(f'<div class="chart">{_bar_chart(f"{test} · effect size", bars)}</div>')
    rows = []
    for (test, metric), group in fairness.groupby(["test", "metric"], sort=True):
        by_model = {(str(r.role), str(r.model_version)): float(r.value) for r in group.itertuples()}
        rows.append([test, metric, *(by_model.get(model, math.nan) for model in models)])
    return (
        "<h2>Association tests and counterfactual invariance</h2>"
        "<p>Effect sizes further from zero mean a stronger association between the target and "
        "attribute sets, in either direction; p-values are two-sided permutation p-values.</p>"
        + _legend(models)
        + f'<div class="charts">{"".join(charts)}</div>'
        + _table(["test", "metric", *labels], rows)
    )


def _group_section(groups: pd.DataFrame) -> str:
    if groups.empty:
        return ""
    models = _models(groups)
    labels = [_model_label(role, version) for role, version in models]
    rows = []
    for (dataset, metric, group_name), group in groups.groupby(
        ["dataset", "metric", "group_name"], sort=True
    ):
        by_model = {(str(r.role), str(r.model_version)): r for r in group.itertuples()}
        cells = [
            _with_interval(float(r.value), float(r.ci_low), float(r.ci_high)) if r is not None else ""
            for r in (by_model.get(model) for model in models)
        ]
        rows.append([dataset, metric, group_name, int(group["eval_rows"].iloc[0]), *cells])
    return (
        "<h2>Metrics per group</h2>"
        "<p>Each metric on the eval rows of one group, with its 95% bootstrap CI. The largest gap between "
        "groups appears above as <code>&lt;metric&gt;_group_gap</code>. Small groups give wide intervals, "
        f"and a group of fewer than {MIN_INTERVAL_ROWS} eval rows none.</p>"
        + _table(["dataset", "metric", "group", "eval rows", *labels], rows)
    )


def _edge_case_section(edge_cases: pd.DataFrame) -> str:
    if edge_cases.empty:
        return "<h2>Edge cases</h2><p>No edge-case rows.</p>"
    columns = [c for c in edge_cases.columns if c not in ("model_version", "role")]
    parts = ["<h2>Edge cases</h2><p>Cosine between each probe text and its variant, per kind of change.</p>"]
    for role, version in _models(edge_cases):
        chosen = edge_cases[
            (edge_cases["role"].astype(str) == role) & (edge_cases["model_version"].astype(str) == version)
        ]
        rows = [[_plain(value) for value in record] for record in chosen[columns].itertuples(index=False)]
        parts.append(f"<h3>{_e(_model_label(role, version))}</h3>" + _table(columns, rows))
    return "".join(parts)


def render_html_report(
    title: str,
    evaluation: pd.DataFrame,
    fairness: pd.DataFrame,
    edge_cases: pd.DataFrame,
    decision_reasons: list[str],
    limits_note: str = LIMITS_NOTE,
    groups: pd.DataFrame | None = None,
    models: pd.DataFrame | None = None,
) -> str:
    """One self-contained HTML page (inline CSS and SVG, no scripts or external assets).

    ``evaluation``: model_version, role, dataset, metric, value, ci_low, ci_high.
    ``groups`` (optional): model_version, role, dataset, group_name, metric, value, ci_low, ci_high, eval_rows.
    ``models`` (optional): one row per compared model, any columns (role, version, how it was trained).
    ``fairness``: model_version, role, test, metric, value.
    ``edge_cases``: ``edge_case_report`` rows plus model_version and role.
    Every string from the frames, the reasons and the note is HTML-escaped.
    """
    reasons = "".join(f"<li>{_e(reason)}</li>" for reason in decision_reasons) or "<li>No decision yet.</li>"
    body = (
        f"<h1>{_e(title)}</h1>"
        f'<h2>Promotion decision</h2><ul class="reasons">{reasons}</ul>'
        + _models_section(models if models is not None else pd.DataFrame())
        + _evaluation_section(evaluation)
        + _group_section(groups if groups is not None else pd.DataFrame())
        + _fairness_section(fairness)
        + _edge_case_section(edge_cases)
        + f'<h2>Limits</h2><div class="limits"><p>{_e(limits_note)}</p></div>'
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


def write_html_report(path: Path, html: str) -> Path:
    """Write ``html`` to ``path`` atomically (readers see the old file or the whole new one); returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file sits beside the target so os.replace stays a same-filesystem rename.
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(html)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp makes the file private (0600); a report is meant to be read by others.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
        fsync_path(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
