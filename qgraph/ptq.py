"""Post-training quantization of a canonical model: annotate ─▶ calibrate ─▶ parameters ─▶ QDQ ─▶ lower.

This driver is what ``optimize`` runs when calibration data is given. Each phase is its own step so that QAT can
reuse the plan and the QDQ graph: QAT starts from the QDQ model this module builds, before lowering.

Parameters come from ranges: activations per tensor from the calibration observers (scale groups share the union of
their ranges), weights per output channel from the weight itself (min-max, or the MSE-optimal clipping per channel),
biases from ``s_input · s_weight`` (see :mod:`qgraph.passes.quantize.insert_quantize_dequantize`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.calibrate.driver import CalibrationConfig, CalibrationResult, calibrate, merge_group_ranges
from qgraph.errors import QGraphError, UnsupportedModelError
from qgraph.ir.versions import convert_opset
from qgraph.ir.traversal import iterate_graphs
from qgraph.ir.values import default_opset
from qgraph.passes.canonicalize.eliminate_dead_code import EliminateDeadCode
from qgraph.passes.infrastructure import PassManager, PassRecord
from qgraph.passes.quantize.insert_quantize_dequantize import InsertQuantizeDequantize
from qgraph.passes.quantize.quantize_lstm_dynamic import QuantizeLSTMDynamic
from qgraph.passes.quantize.quantize_matmul_dynamic import QuantizeMatMulDynamic
from qgraph.annotate.annotator import AnnotationOverrides, AnnotationRules, annotate, fixed_ranges
from qgraph.annotate.config_file import check_override_names, load_overrides
from qgraph.quant.plan import QuantPlan
from qgraph.ir.subgraphs import make_names_unique
from qgraph import sensitivity
from qgraph.sensitivity import (
    DEFAULT_MIN_SQNR_DB,
    DEFAULT_SENSITIVITY_BATCHES,
    SensitivityResult,
    retain_batches,
    validate_min_sqnr,
)
from qgraph.quant.spec import QuantParams, compute_quant_params
from qgraph.targets import Target, TargetOptions, get_target

logger = logging.getLogger(__name__)

#: Operators whose presence means the model is quantized already.
QUANTIZED_OPERATORS = frozenset(
    {
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
        "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat",
        "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "FakeQuant",
        "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    }
)
WEIGHT_METHODS = ("minmax", "mse")


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    target: str = "ort-cpu"
    target_options: TargetOptions = dataclasses.field(default_factory=TargetOptions)
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    weight_method: str = "minmax"
    overrides: AnnotationOverrides = dataclasses.field(default_factory=AnnotationOverrides)
    #: Quantize a model that already holds quantized operators (normally refused).
    requantize: bool = False
    #: A TOML file of per-tensor overrides (see :mod:`qgraph.annotate.config_file`), merged into ``overrides``.
    config: Path | None = None
    #: LSTM/GRU/RNN: "fp32" keeps them float; "dynamic" runs LSTMs as com.microsoft DynamicQuantizeLSTM (int8
    #: weights) on target ort-cpu. GRU and RNN stay FP32 either way (no such kernel).
    recurrent: str = "fp32"
    #: Automatic fallback: layers go back to FP32, most damaging first, until the output SQNR (dB) on the first
    #: calibration batches reaches this bound; None turns it off (see :mod:`qgraph.sensitivity`).
    min_sqnr: float | None = DEFAULT_MIN_SQNR_DB
    #: Calibration batches the sensitivity analysis runs on.
    sensitivity_batches: int = DEFAULT_SENSITIVITY_BATCHES
    #: Measure the per-layer sensitivity table even when the bound is met (for a report).
    sensitivity_table: bool = False
    #: "static" (calibrated ranges), "dynamic" (MatMul/Gemm with constant weights quantize their activations per
    #: call, no calibration for them) or "auto" (dynamic where the input comes from a float node); see
    #: qgraph.annotate.annotator.ACTIVATION_MODES.
    activations: str = "static"
    #: SmoothQuant migration strength α in [0, 1] (see qgraph.passes.canonicalize.smooth_quant); None: off.
    smooth_quant: float | None = None

    def __post_init__(self) -> None:
        from qgraph.annotate.annotator import RECURRENT_MODES

        if self.recurrent not in RECURRENT_MODES:
            raise QGraphError(f"unknown recurrent mode {self.recurrent!r}; choose one of {', '.join(RECURRENT_MODES)}")
        from qgraph.annotate.annotator import ACTIVATION_MODES

        if self.activations not in ACTIVATION_MODES:
            raise QGraphError(f"unknown activations mode {self.activations!r}; choose one of "
                              f"{', '.join(ACTIVATION_MODES)}")
        if self.smooth_quant is not None and not 0.0 <= self.smooth_quant <= 1.0:
            raise QGraphError(f"--smooth-quant takes an alpha in [0, 1], got {self.smooth_quant}")
        validate_min_sqnr(self.min_sqnr)
        if self.sensitivity_batches < 1:
            raise QGraphError(f"sensitivity_batches must be at least 1, got {self.sensitivity_batches}")
        if self.weight_method not in WEIGHT_METHODS:
            raise QGraphError(f"unknown weight method {self.weight_method!r}; choose one of {', '.join(WEIGHT_METHODS)}")


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    model: ir.Model
    plan: QuantPlan
    calibration: CalibrationResult
    parameters: Mapping[str, QuantParams]
    records: tuple[PassRecord, ...]
    #: The QDQ graph before lowering (per-layer error analysis and QAT start from it).
    qdq_model: onnx.ModelProto | None = None
    #: Output SQNR, per-layer sensitivity and the layers that fell back (None with ``min_sqnr=None``).
    sensitivity: SensitivityResult | None = None


def quantized_operators(model: ir.Model) -> list[str]:
    return sorted({node.op_type for graph in iterate_graphs(model) for node in graph} & QUANTIZED_OPERATORS)


def ensure_opset(model: ir.Model, minimum: int) -> ir.Model:
    """``model`` at default-domain opset ``minimum`` or later (converted with onnx's version converter)."""
    current = default_opset(model)
    if current >= minimum:
        return model
    converted = ir.serde.deserialize_model(convert_opset(ir.serde.serialize_model(model), minimum))
    converted.meta.update(model.meta)
    return converted


def weight_range(array: np.ndarray, axis: int | None, method: str, spec) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (or per-tensor) range of a weight: plain min/max, or the MSE-optimal clipping per channel."""
    from qgraph.calibrate.observers import mse_weight_range
    from qgraph.calibrate.observers.base import channel_matrix

    matrix = channel_matrix(array, axis) if axis is not None else array.reshape(1, -1)
    if method == "mse":
        low, high = mse_weight_range(matrix, spec)
    else:
        low, high = matrix.min(axis=1), matrix.max(axis=1)
    return (low, high) if axis is not None else (low[0], high[0])


def compute_parameters(
    model: ir.Model, plan: QuantPlan, ranges: Mapping[str, tuple[float, float]], *, per_channel: bool, weight_method: str
) -> dict[str, QuantParams]:
    parameters: dict[str, QuantParams] = {}
    for tensor in plan.activations:
        if tensor not in ranges:
            continue
        low, high = ranges[tensor]
        parameters[tensor] = compute_quant_params(plan.activation_spec_of(tensor), low, high)
    # weights may live in If branches (their own initializers) as well as in the main graph
    initializers = {name: value for graph in model.graphs() for name, value in graph.initializers.items()}
    for weight in plan.weights:
        if weight.name in parameters or weight.name not in initializers:
            continue
        array = initializers[weight.name].const_value.numpy().astype(np.float32)
        if not np.all(np.isfinite(array)):
            raise UnsupportedModelError(f"weight {weight.name!r} holds NaN or Inf; it cannot be quantized")
        override = plan.weight_overrides.get(weight.name)
        if override is not None:  # a --config entry: axis None means per tensor, anything else per channel
            axis = weight.axis if override.axis is not None else None
        else:
            axis = weight.axis if per_channel else None
        spec = plan.weight_spec_of(weight.name).with_axis(axis)
        low, high = weight_range(array, axis, weight_method, spec)
        parameters[weight.name] = compute_quant_params(spec, low, high)
    return parameters


def quantize(
    model: ir.Model,
    batches: Iterable[Mapping[str, np.ndarray]],
    options: QuantizeOptions | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    lower: bool = True,
) -> QuantizeResult:
    """Quantize a canonical FP32 model with calibration ``batches``; ``lower=False`` stops at the QDQ graph."""
    options = options or QuantizeOptions()
    found = quantized_operators(model)
    if found and not options.requantize:
        raise UnsupportedModelError(
            f"the model is already quantized (it contains {', '.join(found)}); pass --requantize to quantize it again"
        )
    target = get_target(options.target, options.target_options)
    rules = target.rules()
    model = ensure_opset(model, target.minimum_opset)
    make_names_unique(model)
    if options.config is not None:
        options = dataclasses.replace(
            options,
            overrides=load_overrides(
                options.config,
                base=options.overrides,
                activation_spec=rules.activation_spec,
                weight_spec=target.weight_spec(rules, 0),
            ),
        )
    if options.smooth_quant is not None:
        batches = list(batches)  # read twice: per-channel statistics for SmoothQuant, then the calibration
        smooth_quant(model, batches, options.smooth_quant, threads=options.calibration.threads)
    plan = annotate(model, rules, options.overrides, recurrent=options.recurrent,
                    activation_mode=options.activations)
    check_override_names(plan)
    if not plan.activations and not plan.weights and not plan.dynamic_nodes:
        raise UnsupportedModelError(
            "nothing in the model can be quantized for target "
            f"{target.name} ({len(plan.fp32_nodes)} nodes stay FP32)"
        )
    kept: list[Mapping[str, np.ndarray]] = []
    if options.min_sqnr is not None:
        batches = retain_batches(batches, options.sensitivity_batches, kept)
    fixed = fixed_ranges(model, plan)  # Softmax probabilities: [0, 1] without calibration
    observed = dataclasses.replace(plan, activations=tuple(name for name in plan.activations if name not in fixed))
    if observed.activations:
        calibration = calibrate(model, observed, batches, options.calibration, progress=progress)
    else:  # every quantized node quantizes its activations at run time: nothing to calibrate
        calibration = CalibrationResult({}, 0, 0, 0.0)
    calibration = dataclasses.replace(calibration, ranges={**calibration.ranges, **fixed})
    per_channel = target.options.per_channel
    parameters = compute_parameters(model, plan, calibration.ranges, per_channel=per_channel,
                                    weight_method=options.weight_method)
    fallback = None
    if options.min_sqnr is not None and plan.activations:
        plan, parameters, calibration, fallback = _fall_back(model, rules, plan, parameters, calibration, kept,
                                                             options, per_channel)
    quantize_passes = [InsertQuantizeDequantize(plan=plan, parameters=parameters)]
    if plan.dynamic_nodes:
        quantize_passes.append(QuantizeLSTMDynamic(
            nodes=plan.dynamic_nodes, qmax=rules.weight_spec.qmax, per_channel=per_channel,
            guard_saturation=target.saturation_guard(),
        ))
        quantize_passes.append(QuantizeMatMulDynamic(
            nodes=plan.dynamic_nodes, qmax=rules.weight_spec.qmax, per_channel=per_channel,
            guard_saturation=target.saturation_guard(),
        ))
    records = list(PassManager(quantize_passes).run(model).records)
    qdq_model = ir.serde.serialize_model(model)
    if lower:
        records.extend(lower_to_target(model, target))
    return QuantizeResult(model, plan, calibration, parameters, tuple(records), qdq_model, fallback)


def smooth_quant(model: ir.Model, batches: Iterable[Mapping[str, np.ndarray]], alpha: float, *,
                 threads: int | None = None) -> PassRecord | None:
    """SmoothQuant in place: max|X_j| per input channel of every MatMul/Gemm with a constant weight, observed over
    ``batches``, then :class:`~qgraph.passes.canonicalize.smooth_quant.SmoothQuant` with ``alpha``."""
    from qgraph import runtime
    from qgraph.calibrate.driver import build_probe
    from qgraph.calibrate.observers.channel_abs_max import ChannelAbsMaxObserver
    from qgraph.passes.canonicalize.smooth_quant import SmoothQuant

    tensors = list(dict.fromkeys(
        node.inputs[0].name for node in model.graph
        if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and len(node.inputs) > 1
        and node.inputs[1] is not None and node.inputs[1].const_value is not None and node.inputs[0] is not None
    ))
    if not tensors:
        return None
    session = runtime.create_session(build_probe(model, tensors), threads=threads)
    feedable = {value.name for value in session.get_inputs()}
    observers = {tensor: ChannelAbsMaxObserver(-1) for tensor in tensors}
    count = 0
    for batch in batches:
        outputs = session.run(tensors, {name: array for name, array in batch.items() if name in feedable})
        for tensor, array in zip(tensors, outputs):
            observers[tensor].update(array)
        count += 1
    if count == 0:
        raise QGraphError("SmoothQuant needs calibration batches; none were given")
    logger.info("SmoothQuant: per-channel maxima of %d MatMul/Gemm inputs over %d batches", len(tensors), count)
    statistics = {tensor: observer.channel_abs_max() for tensor, observer in observers.items()}
    records = PassManager([SmoothQuant(alpha=alpha, statistics=statistics)]).run(model).records
    return records[0] if records else None


def lower_to_target(model: ir.Model, target: Target) -> tuple[PassRecord, ...]:
    """The target's lowering of a QDQ ``model``, in place, to a fixed point, then dead code removed.

    The one lowering sequence: after PTQ (:func:`quantize`) and after QAT (:func:`qgraph.qat.export.lower_qdq`).
    A target that keeps explicit QDQ lowers nothing and the model is left as it is.
    """
    passes = target.lowering_pipeline()
    if not passes:
        return ()
    records = list(PassManager(passes, fixed_point=True).run(model).records)
    records.extend(PassManager([EliminateDeadCode()]).run(model).records)
    return tuple(records)


def _fall_back(
    model: ir.Model,
    rules: AnnotationRules,
    plan: QuantPlan,
    parameters: Mapping[str, QuantParams],
    calibration: CalibrationResult,
    batches: list[Mapping[str, np.ndarray]],
    options: QuantizeOptions,
    per_channel: bool,
) -> tuple[QuantPlan, Mapping[str, QuantParams], CalibrationResult, SensitivityResult]:
    """Automatic fallback by sensitivity (see :mod:`qgraph.sensitivity`): the analysis ranks the layers and says
    how many to exclude; each fallback plan reuses the calibrated ranges and is measured as a real QDQ graph until
    it meets the bound or no candidate is left."""
    threads = options.calibration.threads
    analysis = sensitivity.analyse(model, plan, parameters, batches, min_sqnr=options.min_sqnr,
                                   full_table=options.sensitivity_table, threads=threads)
    ranges: Mapping[str, tuple[float, float]] = calibration.ranges
    count, final = analysis.estimated_count, analysis.output_sqnr_db
    fallback_plan, fallback_parameters, fallback_ranges = plan, parameters, None
    while count:
        fallback_plan, ranges, fallback_ranges = _replan(model, rules, options, analysis.excluded(count), ranges,
                                                         batches)
        fallback_parameters = compute_parameters(model, fallback_plan, fallback_ranges, per_channel=per_channel,
                                                 weight_method=options.weight_method)
        final = sensitivity.verify(model, fallback_plan, fallback_parameters, batches, analysis, threads=threads)
        logger.info("with %d layers in FP32 the output SQNR is %.1f dB", count, final)
        if analysis.settled(count, final):
            break
        count += 1
    fallback_plan, result = sensitivity.conclude(analysis, fallback_plan, count, final)
    if fallback_ranges is not None:
        calibration = dataclasses.replace(calibration, ranges=fallback_ranges)
    return fallback_plan, fallback_parameters, calibration, result


def _replan(
    model: ir.Model,
    rules: AnnotationRules,
    options: QuantizeOptions,
    excluded: frozenset[str],
    ranges: Mapping[str, tuple[float, float]],
    batches: list[Mapping[str, np.ndarray]],
) -> tuple[QuantPlan, dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
    """The plan with ``excluded`` nodes in FP32, every range calibrated so far, and the plan's ranges.

    Calibrated ranges are reused; a tensor that the new plan annotates for the first time is calibrated on the
    retained ``batches``. A scale group takes the union of its members' ranges (each already a group union: still
    a valid range)."""
    overrides = dataclasses.replace(options.overrides, exclude=options.overrides.exclude | excluded)
    plan = annotate(model, rules, overrides, recurrent=options.recurrent,
                    activation_mode=options.activations)
    calibrated = dict(ranges)
    missing = [tensor for tensor in plan.activations if tensor not in calibrated]
    if missing:
        logger.info("calibrating %d tensors that the fallback plan quantizes anew", len(missing))
        restricted = dataclasses.replace(plan, activations=tuple(missing), groups=())
        calibrated.update(calibrate(model, restricted, batches, options.calibration).ranges)
    return plan, calibrated, merge_group_ranges(calibrated, plan)
