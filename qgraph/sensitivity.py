"""Sensitivity analysis and automatic fallback: find the quantized layers that break the outputs, put them back to FP32.

**Layers.** A *layer* is a node of ``plan.quantized_nodes`` (a Conv/ConvTranspose/Gemm/MatMul, an Add/Mul, a Concat,
a pass-through or an own-range op, in the main graph or an If branch) with the quantization it is responsible for; a
Relu/Clip fused into its producer belongs to its producer's layer. A layer ``N`` owns

- its weight and its bias (the ``WeightPlan``/``BiasPlan`` whose consumer is ``N``),
- the annotated activations it reads (its quantized inputs) and writes (its output; for a fused Conv+Relu, the
  Relu's output).

An activation read or written by several layers (a residual branch, a Concat input) is owned by each of them and is
quantized — for every reader, as in the QDQ graph — when any owner is. "Only layer ``N`` quantized" is then the plan
with every other layer excluded: ``N``'s inputs, weight, bias and output as the plan says, everything else FP32, scale
groups with their shared (scale, zero point). Excluding ``N`` (``AnnotationOverrides.exclude``) likewise leaves one of
its tensors quantized exactly when another layer still owns it.

**One switchable graph.** ONNX has no switch, so the enable flags become a graph input ``e ∈ {0,1}^L`` (bool) and the
QDQ graph that ``InsertQuantizeDequantize`` writes gets a selection after every DequantizeLinear::

    x̃ = Where(e_a ∨ e_b ∨ …, DQ(Q(x; s, z)), x)     activation x owned by layers a, b, …
    W̃ = Where(e_N, DQ(W_q; s_w, z_w), W)            weight (and likewise bias) of layer N

``Where`` selects without arithmetic, so ``e = 1`` is the QDQ model bit for bit and ``e = 0`` the FP32 model bit for
bit (``x + e·(DQ(Q(x)) − x)`` would be off by an ulp). With outputs ``y_o`` (FP32) and ``ŷ_o(e)`` over ``B``
calibration batches, the output SQNR is the worst float output::

    SQNR(e) = min_o 10·log10( Σ y_o² / Σ (y_o − ŷ_o(e))² )      (sums over the B batches, float64)

and the sensitivity of layer ``k`` is ``S_k = SQNR(one_hot(k))``. (LSTMs planned for DynamicQuantizeLSTM are not
Q/DQ and stay FP32 in the analysis.)

**Cost.** One graph copy, one onnxruntime session, and ``(L + 2)·B`` runs (reference, fully quantized, one per layer)
of a graph that costs about as much as the QDQ model (every Q/DQ and Where is computed whatever the flags). One QDQ
model per layer would need ``L`` graph copies, serialisations and session initialisations for the same runs. When
the fully quantized model already meets the bound the per-layer runs are skipped (``2·B`` runs in all) unless the
table is asked for (a report).

**Fallback.** When ``SQNR(1) < bound``: order the layers by ``S_k`` ascending (most damaging first), then

1. *estimate* in the same session: disable them one at a time, cumulatively, until ``SQNR(e) ≥ bound`` (``≤ L·B`` runs);
2. *verify*: re-annotate with those nodes excluded, reuse the calibrated ranges (a tensor that stays annotated keeps
   its range; a scale group keeps the union of its former ranges, which still contains every member's values; a
   tensor the new plan annotates for the first time is calibrated on the retained batches), recompute parameters,
   write the real QDQ graph and measure it; while it misses the bound, exclude the next layer and measure again.

This module measures and decides, the PTQ driver (:mod:`qgraph.ptq`) plans: :func:`analyse` returns the per-layer
table and the candidates in exclusion order with the estimated count (step 1); for step 2 the driver re-plans
with :meth:`SensitivityAnalysis.excluded`, measures with :func:`verify` and asks
:meth:`SensitivityAnalysis.settled`; :func:`conclude` writes the :class:`SensitivityResult` and the FP32 reasons.

Layers without a name (or sharing one) cannot be excluded by name and are never candidates.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from qgraph import runtime
from qgraph.errors import QGraphError
from qgraph.ir.edit import new_initializer
from qgraph.ir.naming import NameScope
from qgraph.passes.quantize.insert_quantize_dequantize import InsertQuantizeDequantize, dequantized_tensors
from qgraph.quant.plan import QuantPlan

logger = logging.getLogger(__name__)

#: Default bound on the output SQNR (dB). A model whose quantization works keeps its outputs well above it (int8:
#: 29 dB for the small ResNet, 34 dB for the test CNN; even 4-bit per-tensor weights give 11–13 dB on them, see
#: tools/bench_sensitivity.py), while a layer that destroys the output brings it to about 0 dB. 10 dB (noise power a
#: tenth of the signal's, ~32% RMS error: the outputs are mostly noise below it) sits between the two, so the default
#: changes nothing on healthy models and rescues a model that one layer breaks. Ask for more (``--min-sqnr 25``) to
#: trade coverage for accuracy.
DEFAULT_MIN_SQNR_DB = 10.0
#: Calibration batches kept for the analysis.
DEFAULT_SENSITIVITY_BATCHES = 4
#: Largest accepted bound: int8 cannot reach it, so a higher value only means "everything FP32".
MAXIMUM_MIN_SQNR_DB = 100.0

ENABLE_INPUT = "qgraph_sensitivity_enable"
_FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
_FLOAT_OUTPUT_TYPES = frozenset({"tensor(float)", "tensor(double)", "tensor(float16)"})


def validate_min_sqnr(value: float | None) -> float | None:
    """``value`` as a bound in dB, or None (off); refuses NaN, infinities and values outside (0, 100]."""
    if value is None:
        return None
    try:
        bound = float(value)
    except (TypeError, ValueError):
        raise QGraphError(f"--min-sqnr must be a number of dB or 'off', got {value!r}") from None
    if not math.isfinite(bound) or not 0.0 < bound <= MAXIMUM_MIN_SQNR_DB:
        raise QGraphError(
            f"--min-sqnr must be a finite bound in (0, {MAXIMUM_MIN_SQNR_DB:g}] dB or 'off', got {value!r}"
        )
    return bound


@dataclasses.dataclass(frozen=True)
class Layer:
    """A quantized node and the quantization it owns (see the module docstring)."""

    node: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    constants: tuple[str, ...]

    @property
    def tensors(self) -> tuple[str, ...]:
        return self.inputs + self.constants + self.outputs


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    node: str
    op_type: str
    tensors: tuple[str, ...]
    #: Output SQNR (dB) of the model with only this layer quantized.
    output_sqnr_db: float
    fell_back: bool


@dataclasses.dataclass(frozen=True)
class SensitivityResult:
    min_sqnr_db: float
    #: Output SQNR (dB) of the fully quantized model (before any fallback).
    output_sqnr_db: float
    #: Output SQNR (dB) of the model as finally quantized (after fallback).
    final_output_sqnr_db: float
    #: Per-layer sensitivity in graph order (empty when the bound was met and no table was asked for).
    layers: tuple[LayerSensitivity, ...]
    #: Nodes put back to FP32, most damaging first.
    fell_back: tuple[str, ...]
    batches: int
    seconds: float

    @property
    def bound_met(self) -> bool:
        return self.final_output_sqnr_db >= self.min_sqnr_db

    def reason(self, node: str) -> str:
        sqnr = next(layer.output_sqnr_db for layer in self.layers if layer.node == node)
        return (
            f"fell back to FP32: alone it brought output SQNR to {sqnr:.1f} dB (bound {self.min_sqnr_db:g} dB; "
            f"fully quantized {self.output_sqnr_db:.1f} dB)"
        )


@dataclasses.dataclass(frozen=True)
class SensitivityAnalysis:
    """What the switchable graph measured: the per-layer table and the layers to exclude, most damaging first.

    The caller re-plans with :meth:`excluded` nodes, measures the real QDQ graph with :func:`verify` and asks
    :meth:`settled` whether to stop or to exclude one layer more; :func:`conclude` then writes the result.
    """

    layers: tuple[Layer, ...]
    #: Output SQNR (dB) with only layer ``k`` quantized, per layer (empty when the bound was met and no table was
    #: asked for).
    single_layer_sqnr_db: tuple[float, ...]
    min_sqnr_db: float
    #: Output SQNR (dB) of the fully quantized model.
    output_sqnr_db: float
    #: The FP32 outputs on the retained batches (the flags all off), the reference of every measurement.
    reference: list[list[np.ndarray]]
    #: Indices of the layers that can be excluded, most damaging first.
    candidates: tuple[int, ...]
    #: How many candidates the estimate excludes (0 when the bound is met).
    estimated_count: int
    batches: int
    #: ``time.perf_counter()`` when the analysis started.
    started: float

    @property
    def needed(self) -> bool:
        return self.output_sqnr_db < self.min_sqnr_db

    def excluded(self, count: int) -> frozenset[str]:
        """The nodes of the ``count`` most damaging candidates."""
        return frozenset(self.layers[index].node for index in self.candidates[:count])

    def settled(self, count: int, final_sqnr_db: float) -> bool:
        """Whether the fallback stops with ``count`` layers excluded: the bound is met or no candidate is left."""
        return final_sqnr_db >= self.min_sqnr_db or count == len(self.candidates)


def retain_batches(batches: Iterable[Mapping[str, np.ndarray]], count: int, kept: list) -> Iterator:
    """Yield ``batches`` unchanged, appending copies of the first ``count`` to ``kept`` (calibration streams once)."""
    for index, batch in enumerate(batches):
        if index < count:
            kept.append({name: np.array(array) for name, array in batch.items()})
        yield batch


def find_layers(model: ir.Model, plan: QuantPlan) -> tuple[Layer, ...]:
    """The layers of ``plan`` in graph order (fused activations folded into their producer)."""
    quantized = set(plan.quantized_nodes)
    annotated = set(plan.activations)
    fused_into: dict[int, ir.Node] = {}
    for node in model.graph.all_nodes():
        if node.op_type in _FUSED_ACTIVATIONS and node.name in quantized and node.inputs and node.inputs[0] is not None:
            producer = node.inputs[0].producer()
            if producer is not None and producer.name in quantized and producer.op_type not in _FUSED_ACTIVATIONS:
                fused_into[id(producer)] = node
    fused_nodes = {id(node) for node in fused_into.values()}
    constants: dict[str, list[str]] = {}
    for entry in (*plan.weights, *plan.biases):
        constants.setdefault(entry.consumer, []).append(entry.name)
    layers = []
    for node in model.graph.all_nodes():
        if node.name not in quantized or id(node) in fused_nodes:
            continue
        inputs = _unique(value.name for value in node.inputs if value is not None and value.name in annotated)
        produced = list(node.outputs)
        if id(node) in fused_into:
            produced += list(fused_into[id(node)].outputs)
        outputs = _unique(value.name for value in produced if value.name in annotated)
        layers.append(Layer(node.name, node.op_type, inputs, outputs, tuple(constants.get(node.name, ()))))
    return tuple(layers)


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def copy_model(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def build_qdq(model: ir.Model, plan: QuantPlan, parameters: Mapping[str, object]) -> ir.Model:
    """A copy of the float ``model`` with ``plan`` written as QDQ (the original is left untouched)."""
    working = copy_model(model)
    InsertQuantizeDequantize(plan=plan, parameters=parameters)(working)
    return working


def build_switchable_model(
    model: ir.Model, plan: QuantPlan, parameters: Mapping[str, object], layers: Sequence[Layer]
) -> onnx.ModelProto:
    """The QDQ graph of ``plan`` whose quantization is selected per layer by the bool input ``ENABLE_INPUT``."""
    working = build_qdq(model, plan, parameters)
    graph = working.graph
    names = NameScope(working)
    owners: dict[str, set[int]] = {}
    for index, layer in enumerate(layers):
        for tensor in layer.tensors:
            owners.setdefault(tensor, set()).add(index)

    names.reserve([ENABLE_INPUT])
    enable = ir.Value(name=ENABLE_INPUT, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([len(layers)]))
    graph.inputs.append(enable)
    flags: dict[frozenset[int], ir.Value] = {}
    flag_nodes: list[ir.Node] = []

    def flag(members: frozenset[int]) -> ir.Value:
        if members in flags:
            return flags[members]
        ordered = sorted(members)
        if len(ordered) == 1:
            index = new_initializer(
                graph, names, f"qgraph_sensitivity_index_{ordered[0]}", np.array(ordered[0], np.int64)
            )
            node = ir.node(
                "Gather", [enable, index], {"axis": 0}, name=names.fresh(f"qgraph_sensitivity_flag_{ordered[0]}")
            )
        else:
            node = ir.node("Or", [flag(frozenset(ordered[:-1])), flag(frozenset(ordered[-1:]))],
                           name=names.fresh("qgraph_sensitivity_flag_" + "_".join(map(str, ordered))))
        node.outputs[0].name = node.name
        node.outputs[0].type = ir.TensorType(ir.DataType.BOOL)
        node.outputs[0].shape = ir.Shape([])
        flag_nodes.append(node)
        flags[members] = node.outputs[0]
        return node.outputs[0]

    constant_names = {entry.name for entry in (*plan.weights, *plan.biases)}
    planned = dequantized_tensors(working, plan)
    unowned = []
    # Every graph: If branches hold quantized tensors too; the flags, computed in the main graph, reach them as
    # outer-scope values.
    for dequantize in [node for node in graph.all_nodes() if node.op_type == "DequantizeLinear"]:
        dequantized = dequantize.outputs[0]
        name = planned.get(dequantize)
        if name in constant_names:
            float_value = _float_constant(dequantize.graph, model, name)
        elif name in plan.activations:
            quantize = dequantize.inputs[0].producer()
            if quantize is None or quantize.op_type != "QuantizeLinear":
                continue
            float_value = quantize.inputs[0]
        else:
            continue
        if not owners.get(name):
            unowned.append(name)  # stays quantized in every run, like in the QDQ model
            continue
        uses = list(dequantized.uses())
        where = ir.node("Where", [flag(frozenset(owners[name])), dequantized, float_value],
                        name=names.fresh(f"{dequantized.name}_switch"))
        where.outputs[0].name = where.name
        where.outputs[0].type = float_value.type
        where.outputs[0].shape = float_value.shape
        dequantize.graph.insert_after(dequantize, where)
        for user, index in uses:
            user.replace_input_with(index, where.outputs[0])
    if unowned:
        logger.warning("%d quantized tensors belong to no layer and stay quantized in the analysis: %s",
                       len(unowned), ", ".join(unowned[:5]))
    if flag_nodes:
        graph.insert_before(graph[0], flag_nodes)
    logger.debug("switchable model: %d layers, %d flags", len(layers), len(flags))
    return ir.serde.serialize_model(working)


def _float_constant(graph: ir.Graph, model: ir.Model, name: str) -> ir.Value:
    """The float weight/bias ``name`` in ``graph``, registered again from ``model`` when QDQ dropped it."""
    if name in graph.initializers:
        return graph.initializers[name]
    original = next(initializers[name] for initializers in (each.initializers for each in model.graphs())
                    if name in initializers)
    value = ir.Value(name=name, const_value=original.const_value)
    value.type = original.type
    value.shape = original.shape
    graph.register_initializer(value)
    return value


class OutputComparison:
    """Float outputs of a session on fixed batches, compared with reference outputs as one SQNR (worst output)."""

    def __init__(self, proto: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]], *,
                 threads: int | None = None, extra_feeds: Mapping[str, np.ndarray] | None = None) -> None:
        self.session = runtime.create_session(proto, threads=threads)
        self.output_names = [output.name for output in self.session.get_outputs() if output.type in _FLOAT_OUTPUT_TYPES]
        names = [model_input.name for model_input in self.session.get_inputs()]
        self.feeds = [{name: batch[name] for name in names if name in batch} for batch in batches]
        self.extra_feeds = dict(extra_feeds or {})

    def outputs(self, extra: Mapping[str, np.ndarray] | None = None) -> list[list[np.ndarray]]:
        return [self.session.run(self.output_names, {**feeds, **self.extra_feeds, **(extra or {})})
                for feeds in self.feeds]

    def sqnr(self, reference: list[list[np.ndarray]], extra: Mapping[str, np.ndarray] | None = None) -> float:
        return output_sqnr(reference, self.outputs(extra))


def output_sqnr(reference: list[list[np.ndarray]], approximation: list[list[np.ndarray]]) -> float:
    """The worst float output's SQNR (dB), each output's signal and noise summed over all batches."""
    if not reference or not reference[0]:
        return float("inf")
    signal = np.zeros(len(reference[0]))
    noise = np.zeros(len(reference[0]))
    for expected_batch, actual_batch in zip(reference, approximation):
        for index, (expected, actual) in enumerate(zip(expected_batch, actual_batch)):
            expected = np.asarray(expected, dtype=np.float64)
            error = expected - np.asarray(actual, dtype=np.float64)
            signal[index] += float(np.sum(np.square(expected)))
            noise[index] += float(np.sum(np.square(error))) if np.all(np.isfinite(error)) else float("inf")
    values = [_ratio_db(s, n) for s, n in zip(signal, noise)]
    return min(values)


def _ratio_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return float("inf")
    if signal == 0.0 or math.isinf(noise):
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


def analyse(
    model: ir.Model,
    plan: QuantPlan,
    parameters: Mapping[str, object],
    batches: Sequence[Mapping[str, np.ndarray]],
    *,
    min_sqnr: float,
    full_table: bool = False,
    threads: int | None = None,
) -> SensitivityAnalysis:
    """Measure ``plan`` against ``min_sqnr`` and, when it misses, rank the layers and estimate how many go back.

    With ``full_table`` the per-layer sensitivity is measured even when the fully quantized model meets the bound.
    """
    start = time.perf_counter()
    if not batches:
        raise QGraphError("sensitivity analysis needs at least one calibration batch")
    layers = find_layers(model, plan)
    switchable = build_switchable_model(model, plan, parameters, layers)
    comparison = OutputComparison(switchable, batches, threads=threads)

    def run_with(enabled: np.ndarray) -> dict[str, np.ndarray]:
        return {ENABLE_INPUT: enabled.astype(bool)}

    reference = comparison.outputs(run_with(np.zeros(len(layers), bool)))
    whole = comparison.sqnr(reference, run_with(np.ones(len(layers), bool)))
    needed = whole < min_sqnr
    logger.info("output SQNR of the fully quantized model: %.1f dB (bound %g dB)", whole, min_sqnr)
    single: list[float] = []
    if needed or full_table:
        for index in range(len(layers)):
            one_hot = np.zeros(len(layers), bool)
            one_hot[index] = True
            single.append(comparison.sqnr(reference, run_with(one_hot)))
    candidates: list[int] = []
    count = 0
    if needed:
        names = [layer.node for layer in layers]
        candidates = sorted(
            (index for index, layer in enumerate(layers)
             if layer.tensors and layer.node and names.count(layer.node) == 1),
            key=lambda index: (single[index], index),
        )
        enabled = np.ones(len(layers), bool)
        for index in candidates:
            enabled[index] = False
            count += 1
            estimate = comparison.sqnr(reference, run_with(enabled))
            logger.debug("estimate without %d most damaging layers: %.1f dB", count, estimate)
            if estimate >= min_sqnr:
                break
    return SensitivityAnalysis(layers, tuple(single), min_sqnr, whole, reference, tuple(candidates), count,
                               len(batches), start)


def verify(
    model: ir.Model,
    plan: QuantPlan,
    parameters: Mapping[str, object],
    batches: Sequence[Mapping[str, np.ndarray]],
    analysis: SensitivityAnalysis,
    *,
    threads: int | None = None,
) -> float:
    """Output SQNR (dB) of the real QDQ graph of ``plan`` (a fallback plan) against the analysis's reference."""
    qdq = ir.serde.serialize_model(build_qdq(model, plan, parameters))
    return OutputComparison(qdq, batches, threads=threads).sqnr(analysis.reference)


def conclude(
    analysis: SensitivityAnalysis, plan: QuantPlan, count: int, final_sqnr_db: float
) -> tuple[QuantPlan, SensitivityResult]:
    """The result of a fallback that excluded ``count`` candidates, and ``plan`` with their FP32 reasons."""
    fallen = tuple(analysis.layers[index].node for index in analysis.candidates[:count])
    rows = tuple(
        LayerSensitivity(layer.node, layer.op_type, layer.tensors, value, layer.node in fallen)
        for layer, value in zip(analysis.layers, analysis.single_layer_sqnr_db)
    )
    result = SensitivityResult(analysis.min_sqnr_db, analysis.output_sqnr_db, final_sqnr_db, rows, fallen,
                               analysis.batches, time.perf_counter() - analysis.started)
    if not analysis.needed:
        return plan, result
    if final_sqnr_db < analysis.min_sqnr_db:
        logger.warning("output SQNR %.1f dB is still below the bound of %g dB with every layer candidate in FP32",
                       final_sqnr_db, analysis.min_sqnr_db)
    reasons = dict(plan.fp32_nodes)
    for node in fallen:
        reasons[node] = result.reason(node)
    logger.info("%d layers fell back to FP32 (%s): output SQNR %.1f -> %.1f dB",
                len(fallen), ", ".join(fallen), analysis.output_sqnr_db, final_sqnr_db)
    return dataclasses.replace(plan, fp32_nodes=reasons), result
