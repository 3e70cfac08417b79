"""Post-training quantization of a canonical model: annotate ─▶ calibrate ─▶ parameters ─▶ QDQ ─▶ lower.

This driver is what ``optimize`` runs when calibration data is given. Each phase is its own step so that QAT can
reuse the plan and the QDQ graph: QAT starts from the QDQ model this module builds, before lowering.

Parameters come from ranges: activations per tensor from the calibration observers (scale groups share the union of
their ranges), weights per output channel from the weight itself (min-max, or the MSE-optimal clipping per channel),
biases from ``s_input · s_weight`` (see :mod:`qgraph.passes.quantize.insert_quantize_dequantize`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qgraph import sensitivity
from qgraph.annotate.annotator import AnnotationOverrides, AnnotationRules, annotate, fixed_ranges
from qgraph.annotate.config_file import check_override_names, load_overrides
from qgraph.calibrate.driver import (
    BatchAxes,
    CalibrationConfig,
    CalibrationResult,
    batch_samples,
    calibrate,
    first_samples,
    merge_group_ranges,
)
from qgraph.errors import QGraphError, UnsupportedModelError, require_at_least
from qgraph.ir.subgraphs import make_names_unique
from qgraph.ir.traversal import iterate_graphs
from qgraph.ir.values import default_opset
from qgraph.ir.versions import convert_opset
from qgraph.latency import LatencyOptions
from qgraph.output_comparison import OutputComparison
from qgraph.passes.canonicalize.eliminate_dead_code import EliminateDeadCode
from qgraph.passes.infrastructure import PassManager, PassRecord
from qgraph.passes.quantize.correct_bias import CorrectBias
from qgraph.passes.quantize.insert_quantize_dequantize import InsertQuantizeDequantize
from qgraph.passes.quantize.quantize_lstm_dynamic import QuantizeLSTMDynamic
from qgraph.passes.quantize.quantize_matmul_dynamic import QuantizeMatMulDynamic
from qgraph.quant.plan import QuantPlan
from qgraph.quant.spec import QuantParams, compute_quant_params
from qgraph.range_check import RangeCheck, check_ranges, range_check_applies
from qgraph.sensitivity import (
    DEFAULT_MIN_SQNR_DB,
    DEFAULT_SENSITIVITY_BATCHES,
    SensitivityOptions,
    SensitivityResult,
    retain_batches,
    validate_min_sqnr,
    validate_search_budget,
)
from qgraph.speed_choice import (
    QDQ,
    QOPERATOR,
    Candidate,
    SpeedChoice,
    SpeedChoiceOptions,
    choose_speed,
    target_lowering,
)
from qgraph.targets import Target, TargetOptions, get_target
from qgraph.transformer_kernels import KernelChoice, fast_kernel_target, try_fast_kernels

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
#: The speed choice's timing budget: at most three latency tables (formats, region classes, their combination).
DEFAULT_SPEED_CHOICE_SECONDS = 6.0
#: The speed choice's lead (see :mod:`qgraph.speed_choice`): no other candidate is timed once the target's lowering is
#: this many times as fast as FP32 at every batch size.
DEFAULT_SPEED_CHOICE_LEAD = SpeedChoiceOptions.decisive_speedup
#: Latency tables the speed choice measures at most; each gets an equal share of the budget.
_SPEED_CHOICE_TABLES = 3
BIAS_CORRECTION_MODES = ("auto", "on", "off")


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
    # --- speed choice (qgraph.speed_choice): never slower than FP32 by default
    #: On target ort-cpu, time the integer candidates against FP32 on this machine (batch 1 and the calibration
    #: batch size): QOperator or QDQ (unless ``target_options.format`` names one), and FP32 for the region classes
    #: (stem, depthwise, squeeze-excite, small MatMuls) where integer kernels are slower; the fastest is written.
    #: False: the target's lowering as it is, unmeasured.
    speed_choice: bool = True
    #: Seconds the speed choice's timing rounds may take in all (sessions, warm-up runs and lowerings come on top).
    speed_choice_seconds: float = DEFAULT_SPEED_CHOICE_SECONDS
    #: When the target's lowering is at least this many times as fast as FP32 at every batch size, no other
    #: candidate is timed (None: every candidate, whatever the lead).
    speed_choice_lead: float | None = DEFAULT_SPEED_CHOICE_LEAD
    #: Seconds the sensitivity search may take; None: automatic (see :func:`qgraph.sensitivity.automatic_budget`).
    search_budget: float | None = None
    #: Per-channel bias correction of the final plan, after the fallback search (see
    #: :mod:`qgraph.passes.quantize.correct_bias`): "auto" corrects when the output SQNR on the sensitivity batches
    #: is still below ``min_sqnr`` and the correction raises it; "on" always; "off" never.
    bias_correction: str = "auto"
    #: "static" (calibrated ranges), "dynamic" (MatMul/Gemm with constant weights quantize their activations per
    #: call, no calibration for them) or "auto" (dynamic where the input comes from a float node); see
    #: qgraph.annotate.annotator.ACTIVATION_MODES.
    activations: str = "static"
    #: SmoothQuant migration strength α in [0, 1] (see qgraph.passes.canonicalize.smooth_quant); None: off.
    smooth_quant: float | None = None
    #: What calibrates the plan's activations instead of :func:`qgraph.calibrate.driver.calibrate`, called the same
    #: way (``keep_outputs`` included) and giving the same ranges and kept outputs (the tuning's
    #: :class:`qgraph.ray_trials.ShardedCalibration` observes shards on Ray workers); None: that function.
    calibrator: Callable[..., CalibrationResult] | None = dataclasses.field(default=None, compare=False, repr=False)

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
        validate_search_budget(self.search_budget)
        if self.sensitivity_batches < 1:
            raise QGraphError(f"sensitivity_batches must be at least 1, got {self.sensitivity_batches}")
        if self.bias_correction not in BIAS_CORRECTION_MODES:
            raise QGraphError(f"unknown bias correction {self.bias_correction!r}; choose one of "
                              f"{', '.join(BIAS_CORRECTION_MODES)}")
        if self.weight_method not in WEIGHT_METHODS:
            raise QGraphError(f"unknown weight method {self.weight_method!r}; choose one of "
                              f"{', '.join(WEIGHT_METHODS)}")
        if self.speed_choice_seconds <= 0:
            raise QGraphError(f"speed_choice_seconds must be positive, got {self.speed_choice_seconds}")
        if self.speed_choice_lead is not None:  # a lead that stops the search must clear the confirmation band
            require_at_least("speed_choice_lead", self.speed_choice_lead, 1 + SpeedChoiceOptions.confirm_band)


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
    #: What the speed choice measured and chose (None when it was off, not applicable, or the model not lowered).
    speed: SpeedChoice | None = None
    #: The check of a histogram method's ranges at the output (None when it did not run; see qgraph.range_check).
    range_check: RangeCheck | None = None
    #: What ``transformer_kernels="auto"`` chose (None when the option was not auto or the model not lowered).
    kernels: KernelChoice | None = None


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
    model: ir.Model,
    plan: QuantPlan,
    ranges: Mapping[str, tuple[float, float]],
    *,
    per_channel: bool,
    weight_method: str,
) -> dict[str, QuantParams]:
    parameters: dict[str, QuantParams] = plan.activation_parameters(ranges)
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


def _check_float32(model: ir.Model, plan: QuantPlan) -> None:
    """Refuse, before calibrating, a plan whose tensors are not float32 (a float16 or float64 model): the
    QuantizeLinear/DequantizeLinear pairs carry float32 scales and would not type-check against them."""
    values = {value.name: value for graph in model.graphs() for value in graph.initializers.values()}
    values.update({value.name: value for graph in model.graphs() for value in graph.inputs})
    values.update({value.name: value for node in model.graph.all_nodes() for value in node.outputs})
    planned = [*(weight.name for weight in plan.weights), *plan.activations]
    other = [(name, values[name].dtype) for name in planned
             if name in values and values[name].dtype not in (None, ir.DataType.FLOAT)]
    if other:
        name, dtype = other[0]
        raise UnsupportedModelError(
            f"the model computes in {dtype.name.lower()} ({name!r} and {len(other) - 1} more of the tensors to "
            f"quantize): qgraph quantizes float32 models; export the model in float32 (or convert it to float32) "
            f"and quantize that")


def quantize(
    model: ir.Model,
    batches: Iterable[Mapping[str, np.ndarray]],
    options: QuantizeOptions | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    lower: bool = True,
    batch_axes: BatchAxes | None = None,
    float_model: onnx.ModelProto | None = None,
) -> QuantizeResult:
    """Quantize a canonical FP32 model with calibration ``batches``; ``lower=False`` stops at the QDQ graph.

    ``batch_axes`` (input name -> the axis holding a batch's samples, None for a constant; default axis 0) counts
    the calibration samples where an input such as a ``[layers, batch, hidden]`` state is not batch-first.
    ``float_model`` is the FP32 model the speed choice times the integer candidates against (by default ``model``
    as it is before quantization)."""
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
    _check_float32(model, plan)
    if not plan.activations and not plan.weights and not plan.dynamic_nodes:
        raise UnsupportedModelError(
            "nothing in the model can be quantized for target "
            f"{target.name} ({len(plan.fp32_nodes)} nodes stay FP32)"
        )
    kept: list[Mapping[str, np.ndarray]] = []
    timing = lower and speed_choice_applies(options, target)
    checking = range_check_applies(plan, options.calibration)  # a histogram method's ranges: see qgraph.range_check
    measuring = options.min_sqnr is not None or options.bias_correction == "on" or checking
    if measuring or timing:  # the speed choice times the first batch
        batches = retain_batches(batches, options.sensitivity_batches if measuring else 1, kept)
    fixed = fixed_ranges(model, plan)  # Softmax probabilities: [0, 1] without calibration
    observed = dataclasses.replace(plan, activations=tuple(name for name in plan.activations if name not in fixed))
    if observed.activations:  # the probe also returns the outputs the sensitivity search compares with
        calibration = (options.calibrator or calibrate)(
            model, observed, batches, options.calibration, progress=progress, batch_axes=batch_axes,
            keep_outputs=options.sensitivity_batches if options.min_sqnr is not None else 0)
    else:  # every quantized node quantizes its activations at run time: nothing to calibrate
        calibration = CalibrationResult({}, 0, 0, 0.0)
    calibration = dataclasses.replace(calibration, ranges={**calibration.ranges, **fixed})
    per_channel = target.options.per_channel
    parameters = compute_parameters(model, plan, calibration.ranges, per_channel=per_channel,
                                    weight_method=options.weight_method)
    range_check = None
    if checking:  # the weights' parameters stay; only activation ranges are checked
        checked, range_check = check_ranges(model, plan, calibration, kept, parameters,
                                            method=options.calibration.method, threads=options.calibration.threads,
                                            batch_axes=batch_axes)
        if checked is not calibration:
            calibration = checked
            parameters = {**parameters, **plan.activation_parameters(checked.ranges)}
    fallback = None
    if options.min_sqnr is not None and plan.activations:
        plan, parameters, calibration, fallback = _fall_back(model, rules, plan, parameters, calibration, kept,
                                                             options, per_channel, batch_axes)
    _correct_biases(model, plan, parameters, kept, options,
                    measured=fallback.final_output_sqnr_db if fallback is not None else None)
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
    if timing and float_model is None:
        float_model = ir.serde.serialize_model(model)
    records = list(PassManager(quantize_passes).run(model).records)
    qdq_model = ir.serde.serialize_model(model)
    speed = kernels = None
    fast_records: tuple[PassRecord, ...] = ()
    if lower:
        records.extend(lower_to_target(model, target))
        fast_target = fast_kernel_target(target)
        if fast_target is not None:  # auto: the fast transformer kernels where they hold against FP32
            model, fast_records, kernels = try_fast_kernels(
                model, fast_target, lower_to_target, kept, calibration.outputs,
                fallback.final_output_sqnr_db if fallback is not None else None, options.min_sqnr,
                threads=options.calibration.threads)
            if kernels.kernels == "fast":
                target = fast_target  # the speed choice builds its QOperator candidates with them too
        if timing:
            speed = choose_output_speed(float_model, qdq_model, target, options, kept[0], batch_axes)
            if speed.candidate != Candidate(target.options.format):
                model = ir.serde.deserialize_model(speed.model)
            if target is fast_target and speed.candidate.format != target.options.format:
                kernels = dataclasses.replace(kernels, kernels="exact", reason=(
                    f"{kernels.reason}; not written: the speed choice chose {speed.candidate.name}"))
        if kernels is not None and kernels.kernels == "fast":
            records.extend(fast_records)
    return QuantizeResult(model, plan, calibration, parameters, tuple(records), qdq_model, fallback, speed,
                          range_check, kernels)


def _timing_axes(model: onnx.ModelProto, batch_axes: BatchAxes | None) -> dict[str, int | None]:
    """Per graph input, the axis that holds the batch for timing: the data's batch axis where the model leaves that
    dimension free, else the input's first free dimension (``[6, batch, features]``: axis 1), else None (a fixed
    shape, timed as it is)."""
    axes: dict[str, int | None] = {}
    initializers = {tensor.name for tensor in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        free = [index for index, dimension in enumerate(value.type.tensor_type.shape.dim)
                if not dimension.HasField("dim_value")]
        given = batch_axes.get(value.name) if batch_axes is not None else None
        axes[value.name] = given if given in free else (free[0] if free else None)
    return axes


def speed_choice_applies(options: QuantizeOptions, target: Target) -> bool:
    """The speed choice runs for target ort-cpu (what onnxruntime on this CPU runs is what it measures), except for
    4-bit weights in the QDQ format: its candidates would be timed with the int8 codes, not the int4 ones written."""
    if not (options.speed_choice and target.name == "ort-cpu"):
        return False
    if target.options.weight_bits == 4 and target.options.format == QDQ:
        logger.info("speed choice skipped: 4-bit weights in the QDQ format are written as int4, which onnxruntime "
                    "runs as DequantizeLinear -> float operator (no int4 integer kernel)")
        return False
    return True


def choose_output_speed(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto, target: Target,
                        options: QuantizeOptions, batch: Mapping[str, np.ndarray],
                        batch_axes: BatchAxes | None = None) -> SpeedChoice:
    """The fastest integer model built from ``qdq_model`` (see :mod:`qgraph.speed_choice`), timed against
    ``float_model`` on a calibration ``batch`` (its inputs along ``batch_axes``) and on its first sample, with the
    regions kept FP32 where that is faster; when even the fastest is slower than FP32, the FP32 model, and a
    warning says so (never a model slower than FP32)."""
    axes = _timing_axes(float_model, batch_axes)
    batch = {name: np.asarray(array) for name, array in batch.items() if name in axes}
    feeds = {1: first_samples(batch, 1, axes)}
    batch_size = batch_samples(batch, axes) if any(axis is not None for axis in axes.values()) else 1
    if batch_size > 1:
        feeds[batch_size] = batch
    batch_sizes = tuple(feeds)
    # one warm-up run per session and batch size (the pooled sessions are warmed once for all tables): onnxruntime
    # packs weights and sizes its arena on the first run, the second ran as fast as the later ones here
    latency = LatencyOptions(threads=options.calibration.threads or LatencyOptions.threads, batch_sizes=batch_sizes,
                             rounds=200, warmup=1, min_rounds=2,
                             budget_seconds=options.speed_choice_seconds / _SPEED_CHOICE_TABLES)
    formats = (target.options.format,) if options.target_options.format is not None else (QOPERATOR, QDQ)
    if target.options.weight_bits == 4:  # a QDQ candidate is timed unlowered: with int8 codes, not int4 ones
        formats = (target.options.format,)
    choice_options = SpeedChoiceOptions(latency=latency, formats=formats, decisive_speedup=options.speed_choice_lead)
    started = time.perf_counter()
    logger.info("speed choice: timing %s against FP32 at batch %s", " and ".join(formats),
                "/".join(str(size) for size in batch_sizes))
    choice = choose_speed(float_model, qdq_model, target_lowering(target), choice_options, feeds=feeds,
                          lower_explicit=target_lowering(target, QDQ))
    logger.info("speed choice in %.1f s: %s", time.perf_counter() - started, choice.describe())
    return choice


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


def _correct_biases(model: ir.Model, plan: QuantPlan, parameters: Mapping[str, QuantParams],
                    batches: list[Mapping[str, np.ndarray]], options: QuantizeOptions, *,
                    measured: float | None = None) -> bool:
    """Apply CorrectBias to the final plan when ``options.bias_correction`` asks for it; whether it did.

    "auto": when the QDQ output's SQNR on ``batches`` (``measured`` by the fallback search, or measured here) is
    below ``options.min_sqnr`` and the correction raises it."""
    if options.bias_correction == "off" or not batches or not plan.biases:
        return False
    if options.bias_correction == "auto":
        if options.min_sqnr is None or (measured is not None and measured >= options.min_sqnr):
            return False
        threads = options.calibration.threads
        reference = OutputComparison(ir.serde.serialize_model(model), batches, threads=threads).outputs()

        def output_sqnr(correct: bool) -> float:
            candidate = ir.serde.deserialize_model(ir.serde.serialize_model(model))
            passes = [InsertQuantizeDequantize(plan=plan, parameters=parameters)]
            if correct:
                passes.insert(0, CorrectBias(plan=plan, parameters=parameters, batches=batches))
            PassManager(passes).run(candidate)
            comparison = OutputComparison(ir.serde.serialize_model(candidate), batches, threads=threads)
            return comparison.sqnr(reference)

        plain = measured if measured is not None else output_sqnr(False)
        if plain >= options.min_sqnr:
            return False
        corrected = output_sqnr(True)
        logger.info("bias correction: output SQNR %.2f dB without, %.2f dB with", plain, corrected)
        if corrected <= plain:
            return False
    return CorrectBias(plan=plan, parameters=parameters, batches=batches)(model).modified


def _fall_back(
    model: ir.Model,
    rules: AnnotationRules,
    plan: QuantPlan,
    parameters: Mapping[str, QuantParams],
    calibration: CalibrationResult,
    batches: list[Mapping[str, np.ndarray]],
    options: QuantizeOptions,
    per_channel: bool,
    batch_axes: BatchAxes | None = None,
) -> tuple[QuantPlan, Mapping[str, QuantParams], CalibrationResult, SensitivityResult]:
    """Automatic fallback by sensitivity (see :mod:`qgraph.sensitivity`): the search ranks the layers within its
    budget and measures each fallback plan, which reuses the calibrated ranges, as a real QDQ graph."""
    search_options = SensitivityOptions(
        min_sqnr=options.min_sqnr, batches=options.sensitivity_batches, budget_seconds=options.search_budget,
        full_table=options.sensitivity_table, threads=options.calibration.threads,
    )
    steps = sensitivity.search(model, plan, parameters, batches, search_options,
                               calibration_seconds=calibration.seconds, batch_axes=batch_axes,
                               reference_outputs=calibration.outputs)
    ranges: Mapping[str, tuple[float, float]] = calibration.ranges
    try:
        excluded = next(steps)
        while True:  # each set of layers the search wants verified in FP32: the driver re-plans, the search measures
            fallback_plan, ranges, fallback_ranges = _replan(model, rules, options, excluded, ranges, batches,
                                                             batch_axes)
            fallback_parameters = compute_parameters(model, fallback_plan, fallback_ranges, per_channel=per_channel,
                                                     weight_method=options.weight_method)
            excluded = steps.send((fallback_plan, fallback_parameters, fallback_ranges))
    except StopIteration as finished:
        outcome = finished.value
    if outcome.extra is not None:
        calibration = dataclasses.replace(calibration, ranges=outcome.extra)
    return outcome.plan, outcome.parameters, calibration, outcome.result


def _replan(
    model: ir.Model,
    rules: AnnotationRules,
    options: QuantizeOptions,
    excluded: frozenset[str],
    ranges: Mapping[str, tuple[float, float]],
    batches: list[Mapping[str, np.ndarray]],
    batch_axes: BatchAxes | None = None,
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
        calibrated.update(calibrate(model, restricted, batches, options.calibration, batch_axes=batch_axes).ranges)
    return plan, calibrated, merge_group_ranges(calibrated, plan)
