"""The weight-only flow: find the layers, collect their inputs, run RTN / GPTQ / AWQ, write and lower the result.

1. The model is brought to opset 21 (blocked DequantizeLinear, int4).
2. *Layers*: every MatMul, and Gemm without transA and with alpha = beta = 1, whose weight is a constant 2-D
   initializer (attention projections, MLP, LM head), and with ``quantize_embeddings`` every Gather of a constant
   2-D table on axis 0; nodes in ``exclude`` stay float. Layers reading one tensor form a group (q, k, v).
3. *Statistics* (GPTQ, AWQ): one streaming pass of the calibration prompts (prefill with an empty past) gives each
   group input's Hessian ``2XᵀX`` and ``mean |x|`` (:mod:`.statistics`). With ``sequential`` (GPTQ) the groups are
   taken in rounds: a round collects the inputs of the groups whose every upstream layer is already quantized, from
   the model in which those layers compute with their quantized weights, then quantizes them.
4. *AWQ* groups are scaled from the last to the first (a fold into an earlier layer's weight, the up projection
   before the gating product, must happen before that layer's own scales are searched), each fold written at once
   by ``ApplyInputChannelScales``; the Hessians follow the scaling (``H' = diag(s)⁻¹ H diag(s)⁻¹``).
5. Each weight is rounded (RTN, for AWQ with the clipping searched on the output error, or GPTQ with its
   group's Hessian factor, computed once per group), written by ``QuantizeWeightsBlockwise`` as blocked
   DequantizeLinear → MatMul, and, for format ``matmulnbits``, lowered by ``LowerMatMulNBits`` (4 bits); an
   embedding table's lookup reads its codes and dequantizes only the rows it looks up (``LowerQuantizedGather``,
   the codes held in 8 bits: no Gather reads a 4-bit type, and a DequantizeLinear of the whole table ran on every
   call, 49 ms for a 32000 × 1024 table against 0.14 ms for the float lookup).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from qgraph.errors import QGraphError, UnsupportedModelError
from qgraph.ir.values import constant_array, default_opset, is_op
from qgraph.passes.canonicalize.eliminate_dead_code import EliminateDeadCode
from qgraph.passes.infrastructure import PassManager, PassRecord
from qgraph.passes.lower.lower_matmul_nbits import LowerMatMulNBits
from qgraph.passes.lower.lower_quantized_gather import LowerQuantizedGather
from qgraph.passes.quantize.apply_input_channel_scales import ApplyInputChannelScales
from qgraph.passes.quantize.quantize_weights_blockwise import MINIMUM_OPSET, QuantizeWeightsBlockwise
from qgraph.ptq import ensure_opset
from qgraph.quant.blockwise import BlockQuantizedWeight, BlockSpec
from qgraph.weight_only.awq import clip_search, scaled_hessian, search_scales
from qgraph.weight_only.gptq import HessianAccumulator, HessianFactor, factor_hessian, quantize_gptq
from qgraph.weight_only.options import WeightOnlyOptions
from qgraph.weight_only.rtn import quantize_rtn
from qgraph.weight_only.statistics import collect_statistics
from qgraph.weight_only.streaming import SpillFile, check_streamable, has_external_data, release, run_by_segments

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Layer:
    """A node whose constant weight is quantized; ``weight`` in MatMul orientation ``[K, N]``."""

    node: ir.Node
    #: The tensor whose channels are the weight's K rows (None for an embedding table).
    input_name: str | None
    weight_name: str
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N), read from the weight's shape (a memory-mapped weight is not touched)."""
        rows, columns = constant_array(self.weight_value).shape
        return (columns, rows) if self.transposed else (rows, columns)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def weight_value(self) -> ir.Value:
        return self.node.inputs[0 if is_op(self.node, "Gather") else 1]

    def weight(self, columns: slice | None = None) -> np.ndarray:
        """A float32 copy of the weight ``[K, N]``, or of its ``columns`` only (read from a memory mapping, the
        rest is not touched)."""
        index = 0 if is_op(self.node, "Gather") else 1
        array = constant_array(self.node.inputs[index])
        if columns is not None:
            array = array[columns] if self.transposed else array[:, columns]
        array = array.astype(np.float32)
        return array.T if self.transposed else array


@dataclasses.dataclass(frozen=True)
class LayerReport:
    name: str
    op_type: str
    shape: tuple[int, int]
    algorithm: str
    #: Output error ``tr(ΔᵀHΔ)`` relative to ``tr(WᵀHW)`` on the calibration inputs (None without statistics).
    relative_error: float | None = None
    #: AWQ's chosen exponent α.
    awq_alpha: float | None = None


@dataclasses.dataclass(frozen=True)
class WeightOnlyResult:
    model: ir.Model
    records: tuple[PassRecord, ...]
    layers: tuple[LayerReport, ...]
    seconds: float


def find_layers(model: ir.Model, options: WeightOnlyOptions) -> list[Layer]:
    layers = []
    for node in model.graph:
        if node.name in options.exclude or node.op_type in options.exclude:
            continue
        if is_op(node, "MatMul") or (is_op(node, "Gemm") and _plain_gemm(node)):
            array = constant_array(node.inputs[1])
            if array is None or array.ndim != 2 or node.inputs[0] is None or constant_array(node.inputs[0]) is not None:
                continue
            transposed = is_op(node, "Gemm") and bool(node.attributes.get_int("transB", 0))
            layers.append(Layer(node, node.inputs[0].name, node.inputs[1].name, transposed))
        elif options.quantize_embeddings and is_op(node, "Gather") and not node.attributes.get_int("axis", 0):
            array = constant_array(node.inputs[0])
            if array is not None and array.ndim == 2 and array.dtype == np.float32:
                layers.append(Layer(node, None, node.inputs[0].name, True))
    names = [layer.node.name for layer in layers]
    if len(set(names)) != len(names) or not all(names):
        raise UnsupportedModelError("weight-only quantization needs unique node names on the quantized layers")
    return layers


def _plain_gemm(node: ir.Node) -> bool:
    attributes = node.attributes
    return (not attributes.get_int("transA", 0) and attributes.get_float("alpha", 1.0) == 1.0
            and attributes.get_float("beta", 1.0) == 1.0)


def open_batches(data, options: WeightOnlyOptions) -> list[Mapping[str, np.ndarray]]:
    """Calibration prompts as a list of batches (a path readable by :func:`qgraph.data.open_dataset`, a dataset,
    or an iterable of ``{name: array}`` batches), at most ``options.samples`` samples."""
    from qgraph.data import open_dataset

    if isinstance(data, (str, os.PathLike)):
        data = open_dataset(data)
    if hasattr(data, "iter_batches"):
        return list(data.iter_batches(options.batch_size, limit=options.samples, include_labels=False))
    return list(data)


def quantize_weight_only(model: ir.Model, calibration_data=None, options: WeightOnlyOptions | None = None, *,
                         progress: Callable[[int], None] | None = None) -> WeightOnlyResult:
    """Weight-only quantization of a canonical float ``model`` (see the module docstring); the model is edited in
    place unless its opset had to be converted (the result's ``model`` is the one to use)."""
    options = options or WeightOnlyOptions()
    started = time.perf_counter()
    if options.needs_calibration and calibration_data is None:
        raise QGraphError(f"--algorithm {options.algorithm} needs calibration data: add --calib DATA "
                          "(prompts as input_ids; the empty past is built for KV-cache graphs)")
    streamed = options.streaming if options.streaming is not None else has_external_data(model)
    if streamed:
        check_streamable(options)
        if default_opset(model) < MINIMUM_OPSET:
            raise UnsupportedModelError(f"a model with external data is quantized at opset {MINIMUM_OPSET} or later "
                                        f"(the opset converter would read every weight into memory); this one has "
                                        f"opset {default_opset(model)}")
    model = ensure_opset(model, MINIMUM_OPSET)
    layers = find_layers(model, options)
    if not layers:
        raise UnsupportedModelError("no MatMul/Gemm with a constant 2-D weight to quantize")
    spec = BlockSpec(options.bits, options.block_size, options.symmetric)
    batches = open_batches(calibration_data, options) if options.needs_calibration else []
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        if layer.input_name is not None:
            groups.setdefault(layer.input_name, []).append(layer)
    logger.info("weight-only %s, %d bits, blocks of %d: %d layers in %d input groups", options.algorithm,
                options.bits, options.block_size, len(layers), len(groups))

    if streamed:
        reports_list, records = _streamed(model, layers, groups, batches, spec, options, progress)
        seconds = time.perf_counter() - started
        logger.info("streamed weight-only quantization of %d layers took %.1f s", len(layers), seconds)
        return WeightOnlyResult(model, tuple(records), tuple(reports_list), seconds)

    statistics: dict[str, HessianAccumulator] = {}
    quantized: dict[str, BlockQuantizedWeight] = {}
    reports: dict[str, LayerReport] = {}
    alphas: dict[str, float] = {}
    if options.algorithm == "gptq" and options.sequential:
        _sequential_gptq(model, layers, groups, batches, spec, options, quantized, reports, progress)
    else:
        if options.needs_calibration:
            proto = ir.serde.serialize_model(model)
            sizes = {name: members[0].weight().shape[0] for name, members in groups.items()}
            statistics = collect_statistics(proto, sizes, batches, progress=progress)
        if options.algorithm == "awq":
            alphas = _apply_awq(model, groups, statistics, spec, options)
            layers = find_layers(model, options)  # the scaled weights are new initializers
        factors = GPTQFactors(layers, options)
        for layer in layers:
            accumulator = statistics.get(layer.input_name) if layer.input_name else None
            method = _method(options, layer)
            quantized[layer.node.name] = _round(layer, accumulator, spec, options, method,
                                                factor=factors.take(layer, accumulator))
            reports[layer.node.name] = _report(layer, quantized[layer.node.name], accumulator, method,
                                               alphas.get(layer.input_name or ""))
    records = list(PassManager([QuantizeWeightsBlockwise(weights=quantized)]).run(model).records)
    if options.format == "matmulnbits":
        records += PassManager([LowerMatMulNBits(accuracy_level=options.accuracy_level)]).run(model).records
    records += PassManager([LowerQuantizedGather()]).run(model).records
    records += PassManager([EliminateDeadCode()]).run(model).records
    seconds = time.perf_counter() - started
    logger.info("weight-only quantization of %d layers took %.1f s", len(layers), seconds)
    return WeightOnlyResult(model, tuple(records), tuple(reports[layer.node.name] for layer in layers), seconds)


def _streamed(model: ir.Model, layers: list[Layer], groups: Mapping[str, list[Layer]], batches, spec: BlockSpec,
              options: WeightOnlyOptions, progress) -> tuple[list[LayerReport], list[PassRecord]]:
    """The streamed flow of :mod:`.streaming`: each layer read, rounded, rewritten and spilled on its own."""
    spill = SpillFile(model)
    model.meta["qgraph.streamed_external_data"] = "true"  # save_model keeps it external (see qgraph.ir.save)
    reports: dict[str, LayerReport] = {}
    records: list[PassRecord] = []
    by_node = {layer.node: layer for layer in layers}
    factors = GPTQFactors(layers, options)

    def quantize_layer(layer: Layer, accumulator: HessianAccumulator | None) -> None:
        method = _method(options, layer)
        factor = factors.take(layer, accumulator)  # before the weight is read: the K×K temporaries come first
        old_weight = layer.weight_value
        # one column slice at a time is copied out of the mapping, whose touched pages go after each slice
        result = _round(layer, accumulator, spec, options, method, factor=factor, streamed=True)
        del factor
        reports[layer.node.name] = _report(layer, result, accumulator, method, None, streamed=True)
        release(old_weight)
        records.extend(PassManager([QuantizeWeightsBlockwise(weights={layer.node.name: result})]).run(model).records)
        if options.format == "matmulnbits":
            records.extend(PassManager([LowerMatMulNBits(accuracy_level=options.accuracy_level)]).run(model).records)
        records.extend(PassManager([LowerQuantizedGather()]).run(model).records)
        release(old_weight)
        spill.spill(model.graph)

    if options.needs_calibration:
        sizes = {name: members[0].rows for name, members in groups.items()}
        remaining = {name: len(members) for name, members in groups.items()}

        def on_segment(nodes: list[ir.Node], accumulators: dict[str, HessianAccumulator]) -> None:
            for node in nodes:
                layer = by_node.get(node)
                if layer is None:
                    continue
                quantize_layer(layer, accumulators.get(layer.input_name) if layer.input_name else None)
                if layer.input_name is not None:
                    remaining[layer.input_name] -= 1
                    if not remaining[layer.input_name]:
                        accumulators.pop(layer.input_name, None)  # the Hessian's last reader is done

        run_by_segments(model, sizes, batches, on_segment, progress=progress)
    else:
        for layer in layers:
            quantize_layer(layer, None)
    records.extend(PassManager([EliminateDeadCode()]).run(model).records)
    logger.info("spilled %.1f MB of quantized weights to %s", spill.bytes / 1e6, spill.folder)
    return [reports[layer.node.name] for layer in layers], records


def _method(options: WeightOnlyOptions, layer: Layer) -> str:
    if layer.input_name is None:
        return "rtn"  # embedding tables have no layer input to calibrate on
    if options.algorithm == "awq":
        return options.awq_then
    return options.algorithm


#: Columns quantized together: every column of a weight is rounded independently (RTN per block column, GPTQ's
#: columns are separate quadratic problems sharing H), so a wide weight (an LM head of 32000 columns) is rounded in
#: slices of at most this many elements, which bounds the float64 working copies of GPTQ.
COLUMN_SLICE_ELEMENTS = 1 << 22


def column_slices(shape: tuple[int, int]) -> list[slice]:
    rows, columns = shape
    width = max(1, COLUMN_SLICE_ELEMENTS // max(rows, 1))
    return [slice(start, min(start + width, columns)) for start in range(0, columns, width)]


class GPTQFactors:
    """GPTQ's Hessian factor of each layer input, computed when its first GPTQ layer asks and dropped after its
    last (q, k and v share one factorization; so do the column slices of one weight)."""

    def __init__(self, layers: Iterable[Layer], options: WeightOnlyOptions) -> None:
        self.options = options
        self.remaining: dict[str, int] = {}
        for layer in layers:
            if layer.input_name is not None and _method(options, layer) == "gptq":
                self.remaining[layer.input_name] = self.remaining.get(layer.input_name, 0) + 1
        self.cache: dict[str, HessianFactor] = {}

    def take(self, layer: Layer, accumulator: HessianAccumulator | None) -> HessianFactor | None:
        """The factor for ``layer`` (None unless it is rounded by GPTQ); counts ``layer`` as done."""
        name = layer.input_name
        if name is None or accumulator is None or name not in self.remaining:
            return None
        factor = self.cache.get(name)
        if factor is None:
            factor = factor_hessian(accumulator.sum_outer, dampening=self.options.dampening,
                                    act_order=self.options.act_order, scale=2.0)
            self.cache[name] = factor
        self.remaining[name] -= 1
        if not self.remaining[name]:
            self.cache.pop(name)
        return factor


def _round(layer: Layer, accumulator: HessianAccumulator | None, spec: BlockSpec, options: WeightOnlyOptions,
           method: str, *, factor: HessianFactor | None = None, streamed: bool = False) -> BlockQuantizedWeight:
    """``layer``'s weight rounded by ``method``, read and rounded one column slice at a time (``streamed``: the
    memory mapping of the weight is closed after each slice, so its pages never all stay resident)."""
    if method == "gptq" and factor is None:
        factor = factor_hessian(accumulator.sum_outer, dampening=options.dampening, act_order=options.act_order,
                                scale=2.0)
    parts = []
    for columns in column_slices(layer.shape):
        weight = layer.weight(columns)
        if streamed:
            release(layer.weight_value)
        if method == "gptq":
            parts.append(quantize_gptq(weight, None, spec, dampening=options.dampening,
                                       act_order=options.act_order, lazy_batch=options.lazy_batch,
                                       mse_clip=options.mse_clip, factor=factor))
        elif options.algorithm == "awq" and options.awq_clip and accumulator is not None:
            parts.append(clip_search(weight, accumulator.sum_outer, spec))
        else:
            parts.append(quantize_rtn(weight, spec, mse_clip=options.mse_clip))
        del weight
    if len(parts) == 1:
        return parts[0]
    zero_points = None if parts[0].zero_points is None else np.concatenate([part.zero_points for part in parts], 1)
    return BlockQuantizedWeight(np.concatenate([part.codes for part in parts], 1),
                                np.concatenate([part.scales for part in parts], 1), zero_points, spec)


def _report(layer: Layer, quantized: BlockQuantizedWeight, accumulator: HessianAccumulator | None, method: str,
            alpha: float | None, *, streamed: bool = False) -> LayerReport:
    error = None
    if accumulator is not None:
        hessian = accumulator.sum_outer  # the ratio below is the same with H = 2XᵀX; no K×K copy
        reference = difference = 0.0
        for columns in column_slices(quantized.shape):  # float64 copies of one slice at a time
            weight = layer.weight(columns).astype(np.float64)
            if streamed:
                release(layer.weight_value)
            part = BlockQuantizedWeight(quantized.codes[:, columns], quantized.scales[:, columns],
                                        None if quantized.zero_points is None else quantized.zero_points[:, columns],
                                        quantized.spec)
            delta = weight - part.dequantize()
            reference += float(np.einsum("kn,kn->", weight, hessian @ weight))
            difference += float(np.einsum("kn,kn->", delta, hessian @ delta))
        error = difference / reference if reference > 0 else 0.0
    logger.info("%s %s %s: %s%s", layer.node.name, layer.node.op_type, quantized.shape, method,
                "" if error is None else f", relative output error {error:.2e}")
    return LayerReport(layer.node.name, layer.node.op_type, quantized.shape, method, error, alpha)


def _topological_groups(model: ir.Model, groups: Mapping[str, list[Layer]]) -> list[str]:
    order = {node: index for index, node in enumerate(model.graph)}
    return sorted(groups, key=lambda name: min(order[layer.node] for layer in groups[name]))


def _apply_awq(model: ir.Model, groups: dict[str, list[Layer]], statistics: dict[str, HessianAccumulator],
               spec: BlockSpec, options: WeightOnlyOptions) -> dict[str, float]:
    """Search and apply the scales of every group, last first; ``statistics`` follow the scaling."""
    alphas = {}
    for name in reversed(_topological_groups(model, groups)):
        current = [layer for layer in find_layers(model, options) if layer.input_name == name]
        weight = np.concatenate([layer.weight() for layer in current], axis=1)
        accumulator = statistics[name]
        scales, alpha, ratio = search_scales(weight, accumulator.mean_absolute, accumulator.hessian, spec,
                                             grid=options.awq_grid, mse_clip=options.mse_clip)
        alphas[name] = alpha
        logger.info("AWQ %s (%d layers): alpha %.2f, output error %.3f of RTN's", name, len(current), alpha, ratio)
        if alpha == 0.0:
            continue
        PassManager([ApplyInputChannelScales(scales={name: scales})]).run(model)
        scaled = HessianAccumulator(accumulator.size)
        scaled.sum_outer = scaled_hessian(accumulator.sum_outer, scales)
        scaled.sum_absolute = accumulator.sum_absolute / scales
        scaled.count = accumulator.count
        # the readers now read x ⊘ s, which the explicit Mul (if any) names differently
        new_name = next(layer.input_name for layer in find_layers(model, options)
                        if layer.node in {member.node for member in current})
        statistics[new_name] = scaled
        if new_name != name:
            groups[new_name] = groups.pop(name)
            alphas[new_name] = alpha
    return alphas


def _upstream_layers(model: ir.Model, layers: list[Layer]) -> dict[str, set[str]]:
    """For each layer input tensor, the names of the quantized layers it depends on."""
    layer_nodes = {layer.node for layer in layers}
    upstream: dict[ir.Node, set[str]] = {}
    for node in model.graph:  # graph order is topological
        depends: set[str] = set()
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer in upstream:
                depends |= upstream[producer]
                if producer in layer_nodes:
                    depends.add(producer.name)
        upstream[node] = depends
    result = {}
    for layer in layers:
        if layer.input_name is None:
            continue
        value = layer.node.inputs[0]
        producer = value.producer()
        depends = set(upstream.get(producer, set())) if producer is not None else set()
        if producer is not None and producer in layer_nodes:
            depends.add(producer.name)
        result[layer.input_name] = depends
    return result


def _sequential_gptq(model: ir.Model, layers: list[Layer], groups: dict[str, list[Layer]], batches, spec: BlockSpec,
                     options: WeightOnlyOptions, quantized: dict[str, BlockQuantizedWeight],
                     reports: dict[str, LayerReport], progress) -> None:
    """GPTQ in rounds, each layer's inputs taken from the model whose upstream layers are already quantized."""
    proto = ir.serde.serialize_model(model)
    upstream = _upstream_layers(model, layers)
    substitutions: dict[str, np.ndarray] = {}
    for layer in layers:  # embedding tables (RTN) first: every group reads through them
        if layer.input_name is None:
            quantized[layer.node.name] = quantize_rtn(layer.weight(), spec, mse_clip=options.mse_clip)
            reports[layer.node.name] = _report(layer, quantized[layer.node.name], None, "rtn", None)
            substitutions[layer.weight_name] = quantized[layer.node.name].dequantize().T
    done = {name for name in quantized}
    pending = _topological_groups(model, groups)
    round_index = 0
    while pending:
        ready = [name for name in pending if upstream[name] <= done]
        if not ready:
            raise QGraphError("sequential GPTQ found no layer whose inputs are ready (a cycle?)")
        round_index += 1
        logger.info("sequential GPTQ round %d: %d input groups", round_index, len(ready))
        sizes = {name: groups[name][0].weight().shape[0] for name in ready}
        statistics = collect_statistics(proto, sizes, batches, substitutions=substitutions,
                                        progress=progress if round_index == 1 else None)
        for name in ready:
            factor = factor_hessian(statistics[name].sum_outer, dampening=options.dampening,
                                    act_order=options.act_order, scale=2.0)
            for layer in groups[name]:
                result = _round(layer, statistics[name], spec, options, "gptq", factor=factor)
                quantized[layer.node.name] = result
                reports[layer.node.name] = _report(layer, result, statistics[name], "gptq", None)
                dequantized = result.dequantize()
                substitutions[layer.weight_name] = dequantized.T if layer.transposed else dequantized
                done.add(layer.node.name)
        pending = [name for name in pending if name not in ready]


def describe(result: WeightOnlyResult) -> Iterable[str]:
    for layer in result.layers:
        error = "" if layer.relative_error is None else f" error {layer.relative_error:.2e}"
        yield f"{layer.name} {layer.op_type} {layer.shape}: {layer.algorithm}{error}"
