"""The quantization report: how close, how covered, how small and how fast.

- **Per-layer SQNR**: for each quantized activation ``t``, ``10·log10(Σ t² / Σ (t − t̂)²)`` in dB between the FP32
  model's ``t`` and the value the quantized graph's consumers see (the DequantizeLinear output of ``t`` in the QDQ
  graph), on a few calibration batches. Errors accumulate along the graph, so a sudden drop marks the layer that
  hurts; 30 dB is about 3% relative error.
- **Output SQNR** of every graph output, FP32 vs the final (lowered) model.
- **Coverage**: which nodes stayed FP32 and why.
- **Sensitivity** (automatic fallback, :mod:`qgraph.sensitivity`): each layer's single-layer output SQNR (the
  model with only that layer quantized), the output SQNR before and after fallback against the bound, and the layers
  that went back to FP32, most damaging first.
- **Size** of the serialized model before and after; **latency**: median batch-1 run time in onnxruntime with full
  graph optimisation, both models measured in the same process, alternating, to keep machine noise out of the ratio.
- **Deploy parity** (:mod:`qgraph.parity`): the lowered model on the integer kernels against the QDQ simulation.
- **Histograms** of each quantized activation on the report batches (64 bins) with the chosen range, for the HTML
  report (:mod:`qgraph.report_html`), which also shows tuning trials and QAT curves where the caller adds them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from qgraph import runtime
from qgraph.calibrate.driver import build_probe
from qgraph.errors import QGraphError
from qgraph.parity import ParityResult, check_parity
from qgraph.passes.quantize.insert_quantize_dequantize import dequantized_tensors
from qgraph.quant.numerics import power_ratio_db, sqnr_db
from qgraph.range_check import RangeCheck
from qgraph.sensitivity import SensitivityResult

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LayerError:
    tensor: str
    producer: str
    sqnr_db: float


@dataclasses.dataclass(frozen=True)
class TensorHistogram:
    """A quantized activation's values on the report batches: ``counts[i]`` values in ``[edges[i], edges[i+1])``,
    and the range ``[low, high]`` its quantization parameters cover."""

    tensor: str
    counts: tuple[int, ...]
    edges: tuple[float, ...]
    low: float
    high: float


#: Bins of a report histogram.
HISTOGRAM_BINS = 64


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    target: str
    layers: tuple[LayerError, ...]
    outputs: dict[str, float]
    fp32_nodes: dict[str, str]
    quantized_nodes: int
    size_before: int
    size_after: int
    latency_before_ms: float | None
    latency_after_ms: float | None
    #: Sensitivity analysis and automatic fallback (None when --min-sqnr is off).
    sensitivity: SensitivityResult | None = None
    #: Deploy parity of the lowered model (None for a model that was not lowered).
    parity: ParityResult | None = None
    histograms: tuple[TensorHistogram, ...] = ()
    #: Accuracy-driven tuning (see qgraph.tuning: fp32_score, bound_text, trials, chosen), when it ran.
    tuning: Mapping | None = None
    #: QAT progress events as mappings (kind, epoch, step, loss, metric_name, metric), when QAT ran.
    qat_history: tuple[Mapping, ...] = ()
    #: The check of a histogram method's ranges at the output (qgraph.range_check), when it ran.
    range_check: RangeCheck | None = None

    @property
    def speedup(self) -> float | None:
        if not self.latency_before_ms or not self.latency_after_ms:
            return None
        return self.latency_before_ms / self.latency_after_ms

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["speedup"] = self.speedup
        return json.dumps(data, indent=2)

    def to_markdown(self) -> str:
        lines = [f"# qgraph quantization report ({self.target})", ""]
        lines += ["| | FP32 | quantized | ratio |", "| --- | ---: | ---: | ---: |"]
        lines.append(
            f"| size | {self.size_before / 1e6:.2f} MB | {self.size_after / 1e6:.2f} MB | "
            f"{self.size_before / max(self.size_after, 1):.2f}× smaller |"
        )
        if self.speedup is not None:
            lines.append(
                f"| latency (batch 1) | {self.latency_before_ms:.2f} ms | {self.latency_after_ms:.2f} ms | "
                f"{self.speedup:.2f}× faster |"
            )
        lines += ["", "## Outputs", "", "| output | SQNR (dB) |", "| --- | ---: |"]
        lines += [f"| {name} | {value:.1f} |" for name, value in self.outputs.items()]
        lines += ["", f"## Coverage: {self.quantized_nodes} nodes quantized, {len(self.fp32_nodes)} kept FP32", ""]
        if self.fp32_nodes:
            lines += ["| node | why it stays FP32 |", "| --- | --- |"]
            lines += [f"| {name} | {reason} |" for name, reason in self.fp32_nodes.items()]
        if self.range_check is not None:
            lines += ["", *self.range_check.to_markdown()]
        if self.sensitivity is not None:
            lines += ["", *sensitivity_markdown(self.sensitivity)]
        if self.parity is not None:
            lines += ["", *self.parity.to_markdown()]
        lines += ["", "## Per-layer SQNR (quantized activation vs FP32)", "", "| tensor | producer | SQNR (dB) |",
                  "| --- | --- | ---: |"]
        lines += [f"| {layer.tensor} | {layer.producer} | {layer.sqnr_db:.1f} |" for layer in self.layers]
        return "\n".join(lines) + "\n"

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix not in (".md", ".json", ".html"):
            raise QGraphError(f"{path}: the report must be a .md, .json or .html file")
        if path.suffix == ".html":
            from qgraph.report_html import render

            path.write_text(render(self), encoding="utf-8")
        else:
            path.write_text(self.to_json() if path.suffix == ".json" else self.to_markdown())
        return path


def sensitivity_markdown(sensitivity: SensitivityResult) -> list[str]:
    """The automatic-fallback section: bound, output SQNR before and after, what fell back and the per-layer table."""
    lines = [
        f"## Sensitivity and automatic fallback (bound {sensitivity.min_sqnr_db:g} dB)",
        "",
        f"Output SQNR on {sensitivity.batches} calibration batches: "
        f"fully quantized {sensitivity.output_sqnr_db:.1f} dB, "
        f"as written {sensitivity.final_output_sqnr_db:.1f} dB"
        + ("" if sensitivity.bound_met else " (still below the bound)") + ".",
        "",
    ]
    if sensitivity.fell_back:
        count = len(sensitivity.fell_back)
        lines += [f"{count} layer{'s' if count != 1 else ''} fell back to FP32, most damaging first: "
                  + ", ".join(sensitivity.fell_back) + ".", ""]
    else:
        lines += ["No layer fell back to FP32.", ""]
    if sensitivity.layers:
        lines += ["| layer | op | output SQNR with only this layer quantized (dB) | fell back |",
                  "| --- | --- | ---: | :---: |"]
        lines += [f"| {layer.node} | {layer.op_type} | {layer.output_sqnr_db:.1f} | "
                  f"{'yes' if layer.fell_back else 'no'} |"
                  for layer in sensitivity.layers]
    return lines


def _producers(proto: onnx.ModelProto) -> dict[str, str]:
    return {output: node.name or node.op_type for node in proto.graph.node for output in output_names(node)}


def output_names(node: onnx.NodeProto) -> list[str]:
    return [name for name in node.output if name]


def layer_errors(
    float_model: onnx.ModelProto, qdq_model: onnx.ModelProto, plan, batches: list[Mapping]
) -> tuple[LayerError, ...]:
    """SQNR of each planned activation's dequantized value in ``qdq_model`` against its value in ``float_model``."""
    import onnx_ir as ir

    qdq = ir.serde.deserialize_model(qdq_model)
    dequantized = {tensor: node.outputs[0].name for node, tensor in dequantized_tensors(qdq, plan).items()
                   if node.graph is qdq.graph and tensor in plan.activations}
    pairs = [(tensor, dequantized[tensor]) for tensor in plan.activations if tensor in dequantized]
    float_names = {output for node in float_model.graph.node for output in node.output} | {
        value.name for value in float_model.graph.input
    }
    pairs = [(tensor, dequantized) for tensor, dequantized in pairs if tensor in float_names]
    if not pairs:
        return ()

    float_probe = build_probe(ir.serde.deserialize_model(float_model), [tensor for tensor, _ in pairs])
    qdq_probe = build_probe(qdq, [dequantized for _, dequantized in pairs])
    float_session = runtime.create_session(float_probe, optimize=True)
    qdq_session = runtime.create_session(qdq_probe)
    signal = np.zeros(len(pairs))
    noise = np.zeros(len(pairs))
    for batch in batches:
        feeds = {model_input.name: batch[model_input.name] for model_input in float_session.get_inputs()}
        references = float_session.run([tensor for tensor, _ in pairs], feeds)
        approximations = qdq_session.run([dequantized for _, dequantized in pairs], feeds)
        for index, (reference, approximation) in enumerate(zip(references, approximations)):
            reference = reference.astype(np.float64)
            signal[index] += float(np.sum(reference**2))
            noise[index] += float(np.sum((reference - approximation) ** 2))
    producers = _producers(float_model)
    return tuple(
        LayerError(tensor, producers.get(tensor, "graph input"), power_ratio_db(signal[index], noise[index]))
        for index, (tensor, _) in enumerate(pairs)
    )




def output_errors(float_model: onnx.ModelProto, quantized: onnx.ModelProto, batches: list[Mapping]) -> dict[str, float]:
    float_session = runtime.create_session(float_model, optimize=True)
    quantized_session = runtime.create_session(quantized, optimize=True)
    names = [output.name for output in float_session.get_outputs()]
    collected: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in names}
    for batch in batches:
        feeds = {model_input.name: batch[model_input.name] for model_input in float_session.get_inputs()}
        for name, reference, approximation in zip(
            names, float_session.run(names, feeds), quantized_session.run(names, feeds)
        ):
            collected[name].append((reference, approximation))
    # flattened: an output such as a [layers, batch, hidden] state has its batch on another axis than 0
    return {
        name: sqnr_db(np.concatenate([r.ravel() for r, _ in pairs]), np.concatenate([a.ravel() for _, a in pairs]))
        for name, pairs in collected.items()
    }


def measure_latency(
    models: Mapping[str, onnx.ModelProto], feeds: Mapping[str, np.ndarray], *, runs: int = 50, threads: int = 2
) -> dict[str, float]:
    """Median milliseconds per run of each model, measured alternately in one process."""
    sessions = {name: runtime.create_session(model, optimize=True, threads=threads) for name, model in models.items()}
    timings: dict[str, list[float]] = {name: [] for name in models}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, dict(feeds))
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, dict(feeds))
            timings[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in timings.items()}


def single_sample_feeds(model: onnx.ModelProto, batch: Mapping[str, np.ndarray],
                        batch_axes: Mapping[str, int | None] | None = None) -> dict[str, np.ndarray]:
    """One sample of ``batch`` per input: each input cut to 1 along its batch axis where ``batch_axes`` (the data
    layout's) is known; otherwise the first axis is cut to 1 only where it is a symbolic batch dimension (a
    time-major sequence input keeps its fixed first axis)."""
    if batch_axes is not None:
        from qgraph.calibrate.driver import first_samples

        return first_samples({name: np.asarray(array) for name, array in batch.items()}, 1, batch_axes)
    symbolic_batch = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        symbolic_batch[value.name] = bool(dims) and not dims[0].HasField("dim_value")
    return {
        name: np.asarray(array)[:1] if symbolic_batch.get(name, False) else np.asarray(array)
        for name, array in batch.items()
    }


def _departures(result) -> str | None:
    """Why the lowered model leaves the QDQ simulation on purpose: the fast transformer kernels' passes that ran."""
    from qgraph.targets.ort_cpu import FAST_TRANSFORMER_PASSES

    fast = {pass_class.__name__ for pass_class in FAST_TRANSFORMER_PASSES}
    ran = sorted({record.name for record in result.records if record.modified} & fast)
    if not ran:
        return None
    return (f"the fast transformer kernels ran ({', '.join(ran)}; --transformer-kernels fast, or auto where they held "
            f"against FP32), which leave the simulation by design (QAttention's float attention core, FastGelu's "
            f"tanh form, residuals read in float); --transformer-kernels exact keeps the simulation's steps")


def build_report(
    float_model: onnx.ModelProto,
    quantized_model: onnx.ModelProto,
    result,
    batches: list[Mapping],
    *,
    latency: bool = True,
    batch_axes: Mapping[str, int | None] | None = None,
    parity: bool = True,
) -> QuantizationReport:
    """The report for a ``qgraph.ptq.QuantizeResult`` on a few calibration ``batches`` (whose inputs hold their
    samples along ``batch_axes``, axis 0 by default); ``parity`` compares the lowered model with the QDQ simulation
    (skipped when nothing was lowered)."""
    layers = layer_errors(float_model, result.qdq_model, result.plan, batches) if result.qdq_model else ()
    deploy_parity = None
    if parity and result.qdq_model is not None and _is_lowered(quantized_model):
        deploy_parity = check_parity(result.qdq_model, quantized_model, batches,
                                     expected_reason=_departures(result))
    outputs = output_errors(float_model, quantized_model, batches)
    before = after = None
    if latency and batches:
        first = batches[0]
        single = single_sample_feeds(float_model, first, batch_axes)
        timings = measure_latency({"fp32": float_model, "quantized": quantized_model}, single)
        before, after = timings["fp32"], timings["quantized"]
    return QuantizationReport(
        target=result.plan.target,
        layers=layers,
        outputs=outputs,
        fp32_nodes=dict(result.plan.fp32_nodes),
        quantized_nodes=len(result.plan.quantized_nodes),
        size_before=float_model.ByteSize(),
        size_after=quantized_model.ByteSize(),
        latency_before_ms=before,
        latency_after_ms=after,
        sensitivity=getattr(result, "sensitivity", None),
        parity=deploy_parity,
        histograms=tensor_histograms(float_model, result.plan, result.calibration.ranges, batches),
        range_check=getattr(result, "range_check", None),
    )


def _is_lowered(model: onnx.ModelProto) -> bool:
    """Whether the lowering wrote integer kernels (a QDQ-format model is its own simulation)."""
    return any(node.op_type in _INTEGER_KERNELS for node in model.graph.node)


_INTEGER_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd",
                              "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool",
                              "QLinearSigmoid", "QLinearLeakyRelu", "MatMulNBits", "MatMulIntegerToFloat"})


def tensor_histograms(float_model: onnx.ModelProto, plan, ranges: Mapping[str, tuple[float, float]],
                      batches: list[Mapping]) -> tuple[TensorHistogram, ...]:
    """Each planned activation's values in the FP32 model on ``batches``, binned over the union of the values'
    span and the chosen range (so the range lines always fall inside the plot).

    Two passes over the batches, the span first and then the counts, holding one batch's outputs and one float64
    copy at a time: binning every value at once held 1.7 GB on BERT-base's report (134 tensors, two batches of
    4 × 128 tokens) and took 8.2 s, the two passes 0.47 GB and 4.6 s."""
    import onnx_ir as ir

    produced = {output for node in float_model.graph.node for output in node.output} | {
        value.name for value in float_model.graph.input}
    tensors = [tensor for tensor in plan.activations if tensor in ranges and tensor in produced]
    if not tensors or not batches:
        return ()
    session = runtime.create_session(build_probe(ir.serde.deserialize_model(float_model), tensors), optimize=True)
    input_names = [model_input.name for model_input in session.get_inputs()]

    def finite_values():
        """Each batch's tensors in turn, their finite values flattened to float64, one tensor's copy at a time."""
        for batch in batches:
            arrays = session.run(tensors, {name: batch[name] for name in input_names})
            for index, tensor in enumerate(tensors):
                data = np.asarray(arrays[index], dtype=np.float64).ravel()
                arrays[index] = None  # the batch's outputs go as they are read
                yield tensor, data[np.isfinite(data)]

    spans = {tensor: [float(bound) for bound in ranges[tensor]] for tensor in tensors}
    for tensor, data in finite_values():
        spans[tensor] = [min(spans[tensor][0], float(data.min(initial=spans[tensor][0]))),
                         max(spans[tensor][1], float(data.max(initial=spans[tensor][1])))]
    for span in spans.values():
        if span[1] <= span[0]:
            span[:] = [span[0] - 0.5, span[1] + 0.5]
    counts = {tensor: np.zeros(HISTOGRAM_BINS, np.int64) for tensor in tensors}
    for tensor, data in finite_values():
        counts[tensor] += np.histogram(data, bins=HISTOGRAM_BINS, range=tuple(spans[tensor]))[0]
    histograms = []
    for tensor in tensors:
        low, high = (float(bound) for bound in ranges[tensor])
        edges = np.histogram_bin_edges(np.empty(0), bins=HISTOGRAM_BINS, range=tuple(spans[tensor]))
        histograms.append(TensorHistogram(tensor, tuple(int(count) for count in counts[tensor]),
                                          tuple(float(edge) for edge in edges), low, high))
    return tuple(histograms)
