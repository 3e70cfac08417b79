"""The quantization report as one self-contained HTML file: tables and inline SVG plots, nothing fetched at view time.

The plots are drawn here as SVG elements (no plotting library): every coordinate is a linear map
``x ↦ left + (x − x₀)/(x₁ − x₀)·width`` of the data range onto the plot box, the y axis flipped so that larger
values are higher. Each plot is an ``<svg class="plot" data-plot="KIND">`` with a ``<title>`` (a tooltip and a name
for screen readers), so a browser test can find every plot in the rendered page:

- ``layer-sqnr``: per-layer SQNR bars (quantized activation vs FP32, dB);
- ``histogram``: one per quantized tensor, its values on the report batches with the chosen range ``[low, high]``
  marked (values outside it are clipped by the quantizer);
- ``sensitivity``: output SQNR with only that layer quantized, most damaging first, the layers that fell back red;
- ``size`` and ``latency``: FP32 against quantized;
- ``parity``: the deploy-parity steps per tensor (see :mod:`qgraph.parity`), with the tolerance line;
- ``tuning``: score against latency of every tuning trial, the chosen one marked (see :mod:`qgraph.tuning`);
- ``qat``: QAT training loss per step and validation metric per epoch.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence

WIDTH, HEIGHT = 640, 220
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 56, 16, 24, 40
_BLUE, _RED, _GREY, _GREEN = "#3b6ea5", "#c0392b", "#888888", "#2e8b57"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
svg.plot { display: block; margin: 0.5em 0; background: #fafafa; border: 1px solid #ddd; }
svg.plot text { font-size: 10px; fill: #333; }
.histograms { display: flex; flex-wrap: wrap; gap: 0.5em; }
.histograms figure { margin: 0; font-size: 0.8em; }
.flag { color: #c0392b; font-weight: bold; }
"""


def _escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def _number(value: float, digits: int = 1) -> str:
    if value is None:
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}f}"


class _Scale:
    """The linear map of ``[low, high]`` onto ``[start, end]`` pixels."""

    def __init__(self, low: float, high: float, start: float, end: float) -> None:
        if not high > low:
            low, high = low - 0.5, high + 0.5
        self.low, self.high, self.start, self.end = low, high, start, end

    def __call__(self, value: float) -> float:
        return self.start + (value - self.low) / (self.high - self.low) * (self.end - self.start)


def _finite(values: Iterable[float], cap: float | None = None) -> list[float]:
    """Values with ±inf replaced by ``cap`` (or dropped) and NaN dropped."""
    finite = []
    for value in values:
        if value is None or math.isnan(value):
            continue
        if math.isinf(value):
            if cap is None:
                continue
            value = cap if value > 0 else 0.0
        finite.append(float(value))
    return finite


def _svg(kind: str, title: str, body: list[str], width: int = WIDTH, height: int = HEIGHT) -> str:
    return (f'<svg class="plot" data-plot="{_escape(kind)}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img"><title>{_escape(title)}</title>'
            + "".join(body) + "</svg>")


def _axes(x: _Scale, y: _Scale, x_label: str, y_label: str, height: int = HEIGHT) -> list[str]:
    body = [f'<line x1="{x.start}" y1="{y.start}" x2="{x.end}" y2="{y.start}" stroke="#444"/>',
            f'<line x1="{x.start}" y1="{y.start}" x2="{x.start}" y2="{y.end}" stroke="#444"/>']
    for fraction in (0.0, 0.5, 1.0):
        value = y.low + fraction * (y.high - y.low)
        position = y(value)
        body.append(f'<text x="{x.start - 4}" y="{position + 3:.1f}" text-anchor="end">{value:.3g}</text>')
    body.append(f'<text x="{(x.start + x.end) / 2:.1f}" y="{height - 6}" text-anchor="middle">'
                f'{_escape(x_label)}</text>')
    body.append(f'<text x="12" y="{(y.start + y.end) / 2:.1f}" text-anchor="middle" '
                f'transform="rotate(-90 12 {(y.start + y.end) / 2:.1f})">{_escape(y_label)}</text>')
    return body


def bar_chart(kind: str, title: str, labels: Sequence[str], values: Sequence[float], *, y_label: str,
              colors: Sequence[str] | None = None, line: float | None = None, cap: float = 100.0) -> str:
    """Vertical bars (``values`` with ±inf shown at ``cap``), one per label; ``line`` draws a horizontal bound."""
    shown = [cap if value is not None and math.isinf(value) and value > 0 else
             (0.0 if value is None or math.isnan(value) or math.isinf(value) else float(value)) for value in values]
    top = max([*shown, line or 0.0, 1e-9])
    bottom = min([*shown, 0.0])
    x = _Scale(0, max(len(shown), 1), _MARGIN_LEFT, WIDTH - _MARGIN_RIGHT)
    y = _Scale(bottom, top * 1.05, HEIGHT - _MARGIN_BOTTOM, _MARGIN_TOP)
    body = _axes(x, y, "" if len(shown) <= 12 else f"{len(shown)} entries", y_label)
    width = max((x.end - x.start) / max(len(shown), 1) - 1, 1)
    for index, (label, value, raw) in enumerate(zip(labels, shown, values)):
        color = colors[index] if colors else _BLUE
        top_pixel, base = y(max(value, 0.0)), y(min(value, 0.0))
        body.append(f'<rect x="{x(index):.1f}" y="{top_pixel:.1f}" width="{width:.1f}" '
                    f'height="{max(base - top_pixel, 0.5):.1f}" fill="{color}"><title>{_escape(label)}: '
                    f'{_number(raw, 2)}</title></rect>')
        if len(shown) <= 12:  # few bars: name each under its bar
            body.append(f'<text x="{x(index) + width / 2:.1f}" y="{y.start + 12:.1f}" text-anchor="middle">'
                        f'{_escape(label[:16])}</text>')
    if line is not None:
        body.append(f'<line x1="{x.start}" x2="{x.end}" y1="{y(line):.1f}" y2="{y(line):.1f}" stroke="{_RED}" '
                    f'stroke-dasharray="4 3"/>')
    return _svg(kind, title, body)


def histogram_plot(tensor: str, counts: Sequence[int], edges: Sequence[float], low: float, high: float) -> str:
    """A tensor's value histogram (log counts) with the chosen quantization range as two red lines."""
    width, height = 300, 150
    x = _Scale(min(edges[0], low), max(edges[-1], high), 40, width - 8)
    peak = max(math.log10(1 + count) for count in counts) if counts else 1.0
    y = _Scale(0.0, max(peak, 1e-9), height - 28, 16)
    body = _axes(x, y, "value", "log10(1+count)", height)
    for count, left, right in zip(counts, edges[:-1], edges[1:]):
        if count:
            top = y(math.log10(1 + count))
            body.append(f'<rect x="{x(left):.1f}" y="{top:.1f}" width="{max(x(right) - x(left), 0.5):.1f}" '
                        f'height="{y.start - top:.1f}" fill="{_BLUE}"/>')
    for bound in (low, high):
        body.append(f'<line x1="{x(bound):.1f}" x2="{x(bound):.1f}" y1="{y.start}" y2="{y.end}" stroke="{_RED}" '
                    f'stroke-width="1.5"/>')
    body.append(f'<text x="{x.start}" y="11">[{low:.3g}, {high:.3g}]</text>')
    return _svg("histogram", f"{tensor}: values and chosen range [{low:.4g}, {high:.4g}]", body, width, height)


def scatter_plot(kind: str, title: str, points: Sequence[tuple[float, float, str]], chosen: int | None, *,
                 x_label: str, y_label: str, reference: float | None = None) -> str:
    """Points ``(x, y, label)``; ``chosen`` (an index) is drawn larger and green; ``reference`` a dashed y line."""
    xs = _finite([point[0] for point in points])
    ys = _finite([point[1] for point in points] + ([reference] if reference is not None else []))
    x = _Scale(min(xs, default=0.0), max(xs, default=1.0), _MARGIN_LEFT + 6, WIDTH - _MARGIN_RIGHT - 6)
    y = _Scale(min(ys, default=0.0), max(ys, default=1.0), HEIGHT - _MARGIN_BOTTOM - 6, _MARGIN_TOP + 6)
    body = _axes(x, y, x_label, y_label)
    if reference is not None and math.isfinite(reference):
        body.append(f'<line x1="{x.start}" x2="{x.end}" y1="{y(reference):.1f}" y2="{y(reference):.1f}" '
                    f'stroke="{_GREY}" stroke-dasharray="4 3"/>')
    for index, (px, py, label) in enumerate(points):
        if not (math.isfinite(px) and math.isfinite(py)):
            continue
        is_chosen = index == chosen
        body.append(f'<circle cx="{x(px):.1f}" cy="{y(py):.1f}" r="{7 if is_chosen else 4}" '
                    f'fill="{_GREEN if is_chosen else _BLUE}" class="{"chosen" if is_chosen else "trial"}">'
                    f'<title>{_escape(label)}</title></circle>')
    return _svg(kind, title, body)


def line_plot(kind: str, title: str, series: Mapping[str, Sequence[tuple[float, float]]], *, x_label: str,
              y_label: str) -> str:
    """One polyline per named series of ``(x, y)`` points, with a legend."""
    xs = _finite([point[0] for points in series.values() for point in points])
    ys = _finite([point[1] for points in series.values() for point in points])
    x = _Scale(min(xs, default=0.0), max(xs, default=1.0), _MARGIN_LEFT, WIDTH - _MARGIN_RIGHT)
    y = _Scale(min(ys, default=0.0), max(ys, default=1.0), HEIGHT - _MARGIN_BOTTOM, _MARGIN_TOP)
    body = _axes(x, y, x_label, y_label)
    for index, (name, points) in enumerate(series.items()):
        color = (_BLUE, _RED, _GREEN)[index % 3]
        finite = [(px, py) for px, py in points if math.isfinite(px) and math.isfinite(py)]
        path = " ".join(f"{x(px):.1f},{y(py):.1f}" for px, py in finite)
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        body.extend(f'<circle cx="{x(px):.1f}" cy="{y(py):.1f}" r="2" fill="{color}"/>' for px, py in finite)
        body.append(f'<text x="{x.end - 120}" y="{_MARGIN_TOP + 12 * index}" fill="{color}">{_escape(name)}</text>')
    return _svg(kind, title, body)


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{_escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(report) -> str:
    """The HTML page of a :class:`qgraph.report.QuantizationReport` (its optional sections where present)."""
    parts = [f"<h1>qgraph quantization report ({_escape(report.target)})</h1>"]
    parts += _overview(report)
    if report.layers:
        parts.append("<h2>Per-layer SQNR (quantized activation vs FP32)</h2>")
        parts.append(bar_chart("layer-sqnr", "per-layer SQNR (dB)", [layer.tensor for layer in report.layers],
                               [layer.sqnr_db for layer in report.layers], y_label="SQNR (dB)"))
        parts.append(_table(["tensor", "producer", "SQNR (dB)"],
                            ((_escape(layer.tensor), _escape(layer.producer), _number(layer.sqnr_db))
                             for layer in report.layers)))
    if report.histograms:
        parts.append("<h2>Quantized tensors: values and chosen range</h2><div class=\"histograms\">")
        for item in report.histograms:
            parts.append(f"<figure>{histogram_plot(item.tensor, item.counts, item.edges, item.low, item.high)}"
                         f"<figcaption>{_escape(item.tensor)}</figcaption></figure>")
        parts.append("</div>")
    if report.sensitivity is not None:
        parts += _sensitivity(report.sensitivity)
    if report.parity is not None:
        parts += _parity(report.parity)
    if report.tuning:
        parts += _tuning(report.tuning)
    if report.qat_history:
        parts += _qat(report.qat_history)
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>qgraph report ({_escape(report.target)})</title><style>{_STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def _overview(report) -> list[str]:
    parts = ["<h2>Size and latency</h2>"]
    rows = [("size (MB)", _number(report.size_before / 1e6, 2), _number(report.size_after / 1e6, 2),
             f"{report.size_before / max(report.size_after, 1):.2f}× smaller")]
    parts.append(bar_chart("size", "model size (MB), FP32 vs quantized", ["FP32", "quantized"],
                           [report.size_before / 1e6, report.size_after / 1e6], y_label="MB",
                           colors=[_GREY, _BLUE]))
    if report.speedup is not None:
        rows.append(("latency, batch 1 (ms)", _number(report.latency_before_ms, 2),
                     _number(report.latency_after_ms, 2), f"{report.speedup:.2f}× faster"))
        parts.append(bar_chart("latency", "latency at batch 1 (ms), FP32 vs quantized", ["FP32", "quantized"],
                               [report.latency_before_ms, report.latency_after_ms], y_label="ms",
                               colors=[_GREY, _BLUE]))
    parts.append(_table(["", "FP32", "quantized", "ratio"], rows))
    parts.append(_table(["output", "SQNR (dB)"], ((_escape(name), _number(value))
                                                  for name, value in report.outputs.items())))
    parts.append(f"<p>{report.quantized_nodes} nodes quantized, {len(report.fp32_nodes)} kept FP32.</p>")
    if report.fp32_nodes:
        parts.append(_table(["node", "why it stays FP32"], ((_escape(name), _escape(reason))
                                                           for name, reason in report.fp32_nodes.items())))
    return parts


def _sensitivity(sensitivity) -> list[str]:
    parts = [f"<h2>Sensitivity and automatic fallback (bound {sensitivity.min_sqnr_db:g} dB)</h2>",
             f"<p>Output SQNR: fully quantized {_number(sensitivity.output_sqnr_db)} dB, as written "
             f"{_number(sensitivity.final_output_sqnr_db)} dB. Fell back to FP32: "
             f"{_escape(', '.join(sensitivity.fell_back) or 'none')}.</p>"]
    layers = sorted(sensitivity.layers, key=lambda layer: layer.output_sqnr_db)
    if layers:
        parts.append(bar_chart("sensitivity", "output SQNR with only this layer quantized (dB), most damaging first",
                               [layer.node for layer in layers], [layer.output_sqnr_db for layer in layers],
                               y_label="output SQNR (dB)", line=sensitivity.min_sqnr_db,
                               colors=[_RED if layer.fell_back else _BLUE for layer in layers]))
        parts.append(_table(["layer", "op", "output SQNR alone (dB)", "fell back"],
                            ((_escape(layer.node), _escape(layer.op_type), _number(layer.output_sqnr_db),
                              '<span class="flag">yes</span>' if layer.fell_back else "no") for layer in layers)))
    return parts


def _parity(parity) -> list[str]:
    flagged = parity.flagged
    parts = [f"<h2>Deploy parity: integer kernels vs QDQ simulation (tolerance {parity.tolerance_steps} step)</h2>",
             f'<p class="{"flag" if flagged else ""}">' + (
                 f"{len(flagged)} tensor(s) off by more than {parity.tolerance_steps} step: "
                 + _escape(", ".join(tensor.tensor for tensor in flagged)) if flagged else
                 f"All {len(parity.tensors)} compared tensors within {parity.tolerance_steps} step.") + "</p>"]
    if parity.expected_reason:
        parts.append(f"<p>Departures expected: {_escape(parity.expected_reason)}.</p>")
    if parity.tensors:
        parts.append(bar_chart("parity", "largest difference in quantization steps per tensor (in isolation)",
                               [tensor.tensor for tensor in parity.tensors],
                               [tensor.max_steps for tensor in parity.tensors], y_label="steps",
                               line=parity.tolerance_steps,
                               colors=[_RED if tensor.flagged else _BLUE for tensor in parity.tensors]))
        parts.append(_table(
            ["tensor", "written by", "max steps", "differing", "SQNR (dB)", "end to end: max steps", "SQNR (dB)",
             "flagged"],
            ((_escape(t.tensor), _escape(t.producer), t.max_steps, f"{t.mismatch_fraction:.3%}", _number(t.sqnr_db),
              t.end_to_end_max_steps, _number(t.end_to_end_sqnr_db),
              '<span class="flag">yes</span>' if t.flagged else "no") for t in parity.tensors)))
    return parts


def _tuning(tuning: Mapping) -> list[str]:
    trials = tuning["trials"]
    chosen = tuning.get("chosen")
    points = [(trial["latency_ms"] if trial.get("latency_ms") is not None else float("nan"), trial["score"],
               f"#{index}: {trial['description']} score {trial['score']:.4g}") for index, trial in enumerate(trials)]
    parts = [f"<h2>Accuracy-driven tuning ({len(trials)} trials)</h2>",
             f"<p>FP32 score {tuning['fp32_score']:.4g}; bound {_escape(tuning['bound_text'])}; "
             + (f"chosen trial #{chosen}." if chosen is not None else "no trial met the bound.") + "</p>",
             scatter_plot("tuning", "tuning trials: score vs latency (chosen point marked)", points, chosen,
                          x_label="latency at batch 1 (ms)", y_label="score", reference=tuning["fp32_score"]),
             _table(["#", "configuration", "score", "latency (ms)", "size (MB)", "meets bound"],
                    ((f"<b>{index}</b>" if index == chosen else index, _escape(trial["description"]),
                      f"{trial['score']:.4g}", _number(trial.get("latency_ms"), 2),
                      _number(trial["size_bytes"] / 1e6, 2), "yes" if trial["meets_bound"] else "no")
                     for index, trial in enumerate(trials)))]
    return parts


def _qat(history: Sequence[Mapping]) -> list[str]:
    steps = [(event["step"], event["loss"]) for event in history if event["kind"] == "step"]
    epochs = [(event["epoch"], event["loss"]) for event in history if event["kind"] == "epoch"]
    metrics = [(event["epoch"], event["metric"]) for event in history
               if event["kind"] == "epoch" and event.get("metric") is not None]
    metric_name = next((event["metric_name"] for event in history if event.get("metric_name")), "validation")
    parts = ["<h2>Quantization-aware training</h2>"]
    if steps:
        parts.append(line_plot("qat", "QAT training loss per step", {"training loss": steps}, x_label="step",
                               y_label="loss"))
    if epochs or metrics:
        series = {"epoch loss": epochs}
        if metrics:
            series[f"validation {metric_name}"] = metrics
        parts.append(line_plot("qat", "QAT loss and validation per epoch", series, x_label="epoch", y_label="value"))
    return parts
