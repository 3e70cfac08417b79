"""The self-contained HTML report (qgraph.report_html), rendered in headless Chromium."""

from __future__ import annotations

import dataclasses
import html.parser
import re
import shutil
import subprocess

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from qgraph.cli.main import cli
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions
from qgraph.report import build_report
from qgraph.train.trainer import ProgressEvent
from tests.ptq.small_models import calibration_batches, residual_cnn

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PLOT = re.compile(r'<svg[^>]*class="plot"[^>]*data-plot="([a-z-]+)"')


def _plots(text: str) -> list[str]:
    return PLOT.findall(text)


def _rendered_dom(path) -> str:
    completed = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True)
    return completed.stdout


class _Collector(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.sources += [value for name, value in attrs if name in ("src", "href") and value]


def _report(batches, **replacements):
    model = residual_cnn()
    result = optimize(ir.serde.deserialize_model(model), None,
                      OptimizeOptions(quantization=QuantizeOptions(sensitivity_table=True)), calibration_data=batches)
    report = build_report(result.float_model, ir.serde.serialize_model(result.model), result.quantization,
                          batches[:2], latency=True)
    return dataclasses.replace(report, **replacements) if replacements else report


QAT_HISTORY = tuple(dataclasses.asdict(event) for event in (
    ProgressEvent("step", 1, 1, 4, 1.2, 1e-4, 100.0), ProgressEvent("step", 1, 2, 4, 0.9, 1e-4, 100.0),
    ProgressEvent("epoch", 1, 2, 4, 1.0, 1e-4, 100.0, "top1", 0.81),
    ProgressEvent("step", 2, 3, 4, 0.7, 1e-4, 100.0), ProgressEvent("step", 2, 4, 4, 0.6, 1e-4, 100.0),
    ProgressEvent("epoch", 2, 4, 4, 0.65, 1e-4, 100.0, "top1", 0.84),
))
TUNING = {"fp32_score": 0.9, "bound_text": "drop at most 0.01 (higher is better)", "chosen": 1, "trials": [
    {"description": "method=minmax", "score": 0.86, "latency_ms": 0.5, "size_bytes": 20000, "meets_bound": False},
    {"description": "method=entropy", "score": 0.895, "latency_ms": 0.52, "size_bytes": 20000, "meets_bound": True},
]}


def test_every_section_has_its_plot_and_nothing_is_fetched(tmp_path):
    report = _report(calibration_batches(count=3), qat_history=QAT_HISTORY, tuning=TUNING)
    path = report.write(tmp_path / "r.html")
    text = path.read_text()
    plots = _plots(text)
    assert {"layer-sqnr", "histogram", "sensitivity", "size", "latency", "parity", "tuning", "qat"} <= set(plots)
    assert plots.count("histogram") == len(report.histograms) == len(report.layers)
    collector = _Collector()
    collector.feed(text)
    assert collector.sources == [] and "script" not in collector.tags  # self-contained, no network at view time
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    # the chosen trial is marked, and every histogram draws its range as two lines
    assert text.count('class="chosen"') == 1
    assert "Deploy parity" in text and "All " in text
    # the markdown report carries the parity table too
    assert "## Deploy parity" in report.to_markdown()


def test_histograms_count_every_value_and_cover_the_chosen_range():
    batches = calibration_batches(count=2)
    report = _report(batches)
    for item in report.histograms:
        assert sum(item.counts) == 2 * 8 * _elements(item.tensor, report)
        assert item.edges[0] <= item.low and item.edges[-1] >= item.high


def test_histograms_bin_every_batch_as_one_array_would():
    """The histograms stream over the batches (span first, then counts); they equal numpy's histogram of all the
    values at once over the same span."""
    from qgraph import runtime
    from qgraph.calibrate.driver import build_probe
    from qgraph.report import HISTOGRAM_BINS, tensor_histograms

    batches = calibration_batches(count=3)
    model = residual_cnn()
    result = optimize(ir.serde.deserialize_model(model), None, OptimizeOptions(quantization=QuantizeOptions()),
                      calibration_data=batches)
    ranges = result.quantization.calibration.ranges
    histograms = tensor_histograms(result.float_model, result.quantization.plan, ranges, batches)
    names = [item.tensor for item in histograms]
    session = runtime.create_session(build_probe(ir.serde.deserialize_model(result.float_model), names), optimize=True)
    runs = [session.run(names, {"input": batch["input"]}) for batch in batches]
    assert len(histograms) > 5
    for index, item in enumerate(histograms):
        data = np.concatenate([np.asarray(run[index], np.float64).ravel() for run in runs])
        low, high = ranges[item.tensor]
        span = (min(low, data.min()), max(high, data.max()))
        counts, edges = np.histogram(data, bins=HISTOGRAM_BINS, range=span)
        assert item.counts == tuple(int(count) for count in counts), item.tensor
        np.testing.assert_allclose(item.edges, edges, rtol=1e-12)


def _elements(tensor: str, report) -> int:
    sizes = {"input": 3 * 16 * 16, "c1": 8 * 16 * 16, "r1": 8 * 16 * 16, "p1": 8 * 8 * 8, "c2": 8 * 8 * 8,
             "r2": 8 * 8 * 8, "c3": 8 * 8 * 8, "sum": 8 * 8 * 8, "r3": 8 * 8 * 8, "gap": 8, "flat": 8, "logits": 5}
    return sizes[tensor]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_renders_every_plot(tmp_path):
    onnx.save(residual_cnn(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", input=np.concatenate([batch["input"] for batch in calibration_batches(count=3)]))
    result = CliRunner().invoke(cli, ["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                                      "--calib", str(tmp_path / "calib.npz"), "--report", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    written = _plots((tmp_path / "r.html").read_text())
    assert {"layer-sqnr", "histogram", "sensitivity", "size", "latency", "parity"} <= set(written)
    rendered = _rendered_dom(tmp_path / "r.html")
    assert sorted(_plots(rendered)) == sorted(written)
    assert rendered.count("<rect") > 10 and "</svg>" in rendered


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_renders_the_tuning_and_qat_plots(tmp_path):
    path = _report(calibration_batches(count=2), qat_history=QAT_HISTORY, tuning=TUNING).write(tmp_path / "r.html")
    rendered = _plots(_rendered_dom(path))
    assert rendered.count("tuning") == 1 and rendered.count("qat") == 2


def test_resnet18_report_is_under_five_megabytes(tmp_path):
    from qgraph.models.resnet import build_resnet

    model = build_resnet("resnet18", input_shape=(3, 32, 32), num_classes=10)
    generator = np.random.default_rng(0)
    batches = [{"input": generator.standard_normal((2, 3, 32, 32)).astype(np.float32)} for _ in range(2)]
    result = optimize(ir.serde.deserialize_model(model), None,
                      OptimizeOptions(quantization=QuantizeOptions(min_sqnr=None)), calibration_data=batches)
    report = build_report(result.float_model, ir.serde.serialize_model(result.model), result.quantization,
                          batches, latency=False)
    path = report.write(tmp_path / "resnet18.html")
    assert len(report.histograms) > 30
    assert path.stat().st_size < 5_000_000
    assert _plots(path.read_text()).count("histogram") == len(report.histograms)
