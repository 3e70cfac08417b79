"""``optimize``: the one entry point that the command line and the Python API share.

It loads (or takes) a model, runs the pipeline of phases that the options ask for and saves the result
atomically. Today the pipeline is canonicalisation; quantization phases plug in through the same options object.
With ``options.qat`` the QDQ graph that quantization writes is fine-tuned (quantization-aware training, see
:mod:`qgraph.qat`) before the target lowers it: canonicalize ─▶ quantize (QDQ) ─▶ QAT ─▶ lower ─▶ save.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import onnx_ir as ir

from qgraph.calibrate.driver import BatchAxes, CalibrationConfig
from qgraph.data.layout import DataLayout
from qgraph.errors import QGraphError
from qgraph.ir import load_model, save_model
from qgraph.passes.canonicalize.decompose_batch_norm import DecomposeBatchNorm
from qgraph.passes.canonicalize.eliminate_dead_code import EliminateDeadCode
from qgraph.passes.canonicalize.eliminate_identity import EliminateIdentity
from qgraph.passes.canonicalize.fold_batch_norm import FoldBatchNorm
from qgraph.passes.canonicalize.fold_constant_if import FoldConstantIf
from qgraph.passes.canonicalize.fold_constants import FoldConstants
from qgraph.passes.canonicalize.fuse_gelu import FuseGelu
from qgraph.passes.canonicalize.fuse_general_layer_normalization import FuseGeneralLayerNormalization
from qgraph.passes.canonicalize.fuse_hard_swish import FuseHardSwish
from qgraph.passes.canonicalize.fuse_layer_normalization import FuseLayerNormalization
from qgraph.passes.canonicalize.fuse_quick_gelu import FuseQuickGelu
from qgraph.passes.canonicalize.fuse_rms_normalization import FuseRmsNormalization
from qgraph.passes.canonicalize.lift_constants import LiftConstants
from qgraph.passes.canonicalize.merge_bias_add import MergeBiasAdd
from qgraph.passes.canonicalize.upgrade_opset_for_fusions import UpgradeOpsetForFusions
from qgraph.passes.infrastructure import PassManager, PassRecord, QGraphPass, get_pass
from qgraph.ptq import QuantizeOptions, QuantizeResult, choose_output_speed, quantize, speed_choice_applies
from qgraph.qat.options import QATOptions
from qgraph.speed_choice import Candidate
from qgraph.targets import get_target
from qgraph.weight_only.driver import WeightOnlyResult, quantize_weight_only
from qgraph.weight_only.options import WeightOnlyOptions

if TYPE_CHECKING:
    from qgraph.qat.driver import QATResult

logger = logging.getLogger(__name__)

#: The canonicalisation pipeline, run to a fixed point: constants become initializers, trivial nodes go away,
#: constant subgraphs fold, decomposed LayerNorm and GELU fuse, BatchNorm folds into its producer (or becomes
#: Mul+Add), bias Adds merge, and the nodes and initializers nobody reads any more are dropped. The fusions come
#: after LiftConstants and FoldConstants because they read eps, gamma, beta, axes and the GELU constants only as
#: initializers (an exporter's Constant nodes or Sqrt(2.0) subgraphs become initializers there; folding never
#: touches a node with an activation input, so it cannot break a pattern), and before MergeBiasAdd and the
#: BatchNorm passes, which write Mul/Add nodes of their own. FoldConstantIf follows FoldConstants, which turns a
#: condition computed from constants (or from an input fixed with ``fixed_inputs``) into an initializer; the inlined
#: branch's constants then fold in the next round. UpgradeOpsetForFusions comes just before the fusions: when one of
#: them refuses only for the model's opset (LayerNormalization 17, HardSwish 14) it converts the model, checked
#: numerically, and the fusions after it fuse in the same round.
CANONICAL_PIPELINE: tuple[type[QGraphPass], ...] = (
    LiftConstants,
    EliminateIdentity,
    FoldConstants,
    FoldConstantIf,
    UpgradeOpsetForFusions,
    FuseLayerNormalization,
    FuseGeneralLayerNormalization,
    FuseRmsNormalization,
    FuseGelu,
    FuseQuickGelu,
    FuseHardSwish,
    MergeBiasAdd,
    FoldBatchNorm,
    DecomposeBatchNorm,
    EliminateDeadCode,
)
#: The canonical pipeline's pass names (``qgraph passes`` marks them).
CANONICAL_PASSES: tuple[str, ...] = tuple(pass_class.__name__ for pass_class in CANONICAL_PIPELINE)


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """How ``optimize`` writes its result."""

    #: ``None``: external data only for models over ~1.8 GB; ``True``/``False`` force it.
    external_data: bool | None = None
    #: Allow the output path to be the input file.
    allow_overwrite_input: bool = False


@dataclasses.dataclass(frozen=True)
class OptimizeOptions:
    """What ``optimize`` does; every field has the default a user would expect."""

    #: Pass names to run instead of the canonical pipeline (``qgraph passes`` lists them).
    passes: tuple[str, ...] | None = None
    #: Check the model after every pass with onnx.checker and onnxruntime (slow; for debugging).
    verify: bool = False
    #: How the result is saved.
    output: OutputOptions = dataclasses.field(default_factory=OutputOptions)
    #: Quantize after canonicalisation (needs calibration data); None keeps the model in float.
    quantization: QuantizeOptions | None = None
    #: Fine-tune the quantized model with quantization-aware training before lowering (needs ``quantization``
    #: and training data); None skips it.
    qat: QATOptions | None = None
    #: Graph inputs to turn into constants before canonicalisation (``--fix-input NAME=VALUE``): name -> array,
    #: or text parsed as on the command line (see :mod:`qgraph.ir.fix_inputs`).
    fixed_inputs: Mapping[str, object] = dataclasses.field(default_factory=dict)
    #: Weight-only quantization of the MatMul/Gemm weights (block-wise 4/8 bits, activations float; see
    #: :mod:`qgraph.weight_only`) instead of ``quantization``; GPTQ and AWQ need calibration prompts.
    weight_only: WeightOnlyOptions | None = None
    #: Where each key of the calibration and training data holds its samples (``--batch-axis KEY=AXIS``,
    #: ``--infer-state-axes``; see :mod:`qgraph.data.layout`). The inputs of ``fixed_inputs`` are added to its removed
    #: inputs, so their keys are left out of the data. A dataset given with a layout of its own keeps it while this
    #: one is the default.
    data_layout: DataLayout = dataclasses.field(default_factory=DataLayout)


@dataclasses.dataclass(frozen=True)
class OptimizeResult:
    model: ir.Model
    records: tuple[PassRecord, ...]
    output_path: Path | None
    quantization: QuantizeResult | None = None
    #: The canonical FP32 model that quantization started from (only when quantizing).
    float_model: onnx.ModelProto | None = None
    #: How quantization-aware training went (only with ``options.qat``).
    qat: QATResult | None = None
    #: The weight-only quantization's per-layer report (only with ``options.weight_only``).
    weight_only: WeightOnlyResult | None = None


def build_pipeline(options: OptimizeOptions) -> PassManager:
    """The canonical pipeline, or the passes ``options.passes`` names (looked up in the registry)."""
    if options.passes is not None:
        passes = [get_pass(name)() for name in options.passes]
    else:
        passes = [pass_class() for pass_class in CANONICAL_PIPELINE]
    return PassManager(passes, fixed_point=True, verify=options.verify)


def optimize(
    model: ir.Model | str | os.PathLike,
    output: str | os.PathLike | None = None,
    options: OptimizeOptions | None = None,
    *,
    input_path: str | os.PathLike | None = None,
    calibration_data=None,
    progress: Callable[[int], None] | None = None,
    train_data=None,
    validation_data=None,
    training_progress: Callable | None = None,
) -> OptimizeResult:
    """Run qgraph's pipeline on ``model`` (a path or an onnx-ir model) and save it to ``output`` if given.

    ``input_path`` names the file an already-loaded model came from, so that it is never overwritten. With
    ``options.quantization`` set, ``calibration_data`` (a path readable by :func:`qgraph.data.open_dataset`, a
    dataset, or an iterable of ``{input name: array}`` batches) calibrates the quantized model; ``progress`` is
    called with the number of samples of each calibration batch. With ``options.qat`` set, ``train_data`` (a path
    or a dataset; labels under ``options.qat.label_key`` unless distilling) fine-tunes the QDQ graph and
    ``validation_data`` picks the best epoch; ``training_progress`` receives the trainer's progress events.
    """
    options = options or OptimizeOptions()
    if options.qat is not None:  # before any work: an onnxruntime without training says what to install
        from qgraph.train.ort_training import require_training_api

        require_training_api()
    if input_path is None and isinstance(model, ir.Model) and "qgraph.source_path" in model.meta:
        input_path = model.meta["qgraph.source_path"]
    input_path = Path(input_path) if input_path is not None else None
    if not isinstance(model, ir.Model):
        input_path = Path(model)
        model = load_model(input_path)
    if output is not None:
        # Refuse a bad output path before doing any work.
        _check_output_before_work(Path(output), input_path, options.output)
    if options.fixed_inputs:
        from qgraph.ir.fix_inputs import fix_inputs

        model = fix_inputs(model, options.fixed_inputs)
    if options.quantization is not None and calibration_data is None:
        raise QGraphError("quantization needs calibration data (--calib)")
    if options.quantization is not None and options.quantization.config is not None:
        options = dataclasses.replace(options, quantization=with_config_settings(options.quantization))
    if options.qat is not None and options.quantization is None:
        raise QGraphError("quantization-aware training starts from a quantized model: add calibration data (--calib)")
    if options.qat is not None and train_data is None:
        raise QGraphError("quantization-aware training needs training data (--train-data)")
    if options.qat is not None:
        _refuse_recurrent_training(model)
    layout = options.data_layout.with_removed_inputs(options.fixed_inputs)
    batches = batch_axes = None
    if options.quantization is not None:
        batches, batch_axes = laid_out_batches(model, calibration_data, options.quantization.calibration, layout)
    result = build_pipeline(options).run(model)
    records = result.records
    quantized = None
    float_model = None
    qat_result = None
    if options.quantization is not None:
        float_model = ir.serde.serialize_model(result.model)
        quantized = quantize(result.model, batches, options.quantization, progress=progress,
                             lower=options.qat is None, batch_axes=batch_axes, float_model=float_model)
        if options.qat is not None:
            qat_result, quantized = _fine_tune(quantized, float_model, options, train_data, validation_data,
                                               training_progress, layout, calibration_data)
        result = dataclasses.replace(result, model=quantized.model)
        records = records + quantized.records
    weight_only = None
    if options.weight_only is not None:
        if options.quantization is not None or options.qat is not None:
            raise QGraphError("weight-only quantization replaces static quantization and QAT: choose one")
        weight_only = quantize_weight_only(result.model, calibration_data, options.weight_only, progress=progress)
        result = dataclasses.replace(result, model=weight_only.model)
        records = records + weight_only.records
    saved = None
    if output is not None:
        saved = save_model(
            result.model,
            output,
            input_path=input_path,
            external_data=options.output.external_data,
            allow_overwrite_input=options.output.allow_overwrite_input,
        )
    return OptimizeResult(result.model, records, saved, quantized, float_model, qat_result, weight_only)


#: Operators whose gradients onnxruntime-training (1.19) crashes on (a segmentation fault in the training session).
UNTRAINABLE_OPERATORS = frozenset({"LSTM", "GRU", "RNN"})


def _refuse_recurrent_training(model: ir.Model) -> None:
    """Refuse QAT on a model with recurrent layers before any work, rather than let the training session crash."""
    from qgraph.errors import UnsupportedModelError
    from qgraph.ir.traversal import iterate_graphs

    found = [f"{node.name or '(unnamed)'} ({node.op_type})" for graph in iterate_graphs(model) for node in graph
             if node.domain in ("", "ai.onnx") and node.op_type in UNTRAINABLE_OPERATORS]
    if found:
        raise UnsupportedModelError(
            f"quantization-aware training cannot run on this model: it holds recurrent layers "
            f"({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}), on whose gradients onnxruntime-training "
            f"crashes; quantize it without --qat (post-training quantization)")


def with_config_settings(quantization: QuantizeOptions) -> QuantizeOptions:
    """``quantization`` with the ``[quantization]`` settings of its ``--config`` file (a tuning recipe) applied."""
    from qgraph.annotate.config_file import load_quantization_settings

    settings = load_quantization_settings(quantization.config)
    if "method" in settings:
        quantization = dataclasses.replace(
            quantization, calibration=dataclasses.replace(quantization.calibration, method=settings["method"]))
    if "per_channel" in settings:
        quantization = dataclasses.replace(quantization, target_options=dataclasses.replace(
            quantization.target_options, per_channel=settings["per_channel"]))
    if "min_sqnr" in settings:
        quantization = dataclasses.replace(quantization, min_sqnr=settings["min_sqnr"])
    quantization = dataclasses.replace(quantization, **{key: settings[key] for key in (
        "smooth_quant", "bias_correction", "activations") if key in settings})
    return quantization


def _fine_tune(quantized: QuantizeResult, float_model: onnx.ModelProto, options: OptimizeOptions, train_data,
               validation_data, training_progress, layout: DataLayout,
               calibration_data) -> tuple[QATResult, QuantizeResult]:
    """QAT on the QDQ graph, then the target's lowering of the learned QDQ graph (as quantize would lower it), and
    the speed choice as after PTQ, timed on the first calibration batch read again (none left in a one-shot
    iterator: then the plain lowering is kept, as logged)."""
    from qgraph.qat import lower_qdq, run_qat

    qat_result = run_qat(
        quantized.qdq_model, quantized.plan, quantized.parameters, float_model=float_model, train_data=train_data,
        validation_data=validation_data, options=options.qat, progress=training_progress, layout=layout,
    )
    lowered, lowering_records = lower_qdq(qat_result.qdq_model, options.quantization)
    speed = None
    target = get_target(options.quantization.target, options.quantization.target_options)
    if speed_choice_applies(options.quantization, target):
        batches, batch_axes = laid_out_batches(float_model, calibration_data, options.quantization.calibration,
                                               layout)
        first = next(iter(batches), None)
        if first is None:
            logger.info("speed choice skipped after QAT: the calibration batches were read once already")
        else:
            speed = choose_output_speed(float_model, qat_result.qdq_model, target, options.quantization, first,
                                        batch_axes)
            if speed.candidate != Candidate(target.options.format):
                lowered = ir.serde.deserialize_model(speed.model)
    return qat_result, dataclasses.replace(quantized, model=lowered, records=quantized.records + lowering_records,
                                           qdq_model=qat_result.qdq_model, speed=speed)


#: Keys that hold labels in a calibration/training file when they are not model inputs.
LABEL_KEYS = ("label", "labels")


def model_input_signature(model: ir.Model | onnx.ModelProto):
    """The model's feedable inputs, read from the graph inputs alone (serialising the whole model would load every
    weight, external data included, only to read a few names and shapes)."""
    from qgraph.data.validate import input_signature

    if isinstance(model, onnx.ModelProto):
        return input_signature(model)
    inputs = [ir.serde.serialize_value(value) for value in model.graph.inputs if not value.is_initializer()]
    return input_signature(onnx.helper.make_graph([], "inputs", inputs, []))


def calibration_batches(model: ir.Model | onnx.ModelProto, data, config: CalibrationConfig,
                        layout: DataLayout | None = None):
    """Batches of ``data`` checked against ``model``'s inputs (names, ranks, fixed dimensions, dtypes).

    A ``label``/``labels`` key that is not a model input is treated as labels and never fed to the model. ``layout``
    says where each key holds its samples and which keys belong to inputs the model no longer takes
    (:mod:`qgraph.data.layout`).
    """
    return laid_out_batches(model, data, config, layout)[0]


def laid_out_batches(model: ir.Model | onnx.ModelProto, data, config: CalibrationConfig,
                     layout: DataLayout | None = None) -> tuple[object, BatchAxes]:
    """:func:`calibration_batches`, and the batch axis of each input (what calibration counts samples along).

    ``data`` is a path (opened with ``layout``), a dataset (read with ``layout`` unless that is the default and the
    dataset has a layout of its own, to which the removed inputs are added), or an iterable of batches, whose inputs
    count along the axes ``layout`` names explicitly and axis 0 otherwise.
    """
    from qgraph.data import batch_axes_of, open_dataset
    from qgraph.data.validate import validate_dataset

    layout = layout if layout is not None else DataLayout()
    signature = model_input_signature(model)
    if isinstance(data, (str, os.PathLike)):
        input_names = {spec.name for spec in signature}
        probe = open_dataset(data, layout=layout)
        label_key = next((key for key in LABEL_KEYS if key in probe.keys and key not in input_names), None)
        data = open_dataset(data, label_key=label_key, layout=layout) if label_key else probe
    elif hasattr(data, "iter_batches"):
        layout = layout.for_dataset(data)
    if hasattr(data, "iter_batches"):
        dataset = validate_dataset(data, signature, layout=layout, check_values=False, cast_float64=True)
        batches = dataset.iter_batches(config.batch_size, limit=config.samples, include_labels=False)
        return batches, batch_axes_of(dataset)
    return data, dict(layout.batch_axes)


def _check_output_before_work(output: Path, input_path: Path | None, options: OutputOptions) -> None:
    from qgraph.errors import OutputPathError

    if input_path is not None and not options.allow_overwrite_input:
        try:
            same = output.resolve() == input_path.resolve()
        except OSError:
            same = False
        if same:
            raise OutputPathError(f"{output}: the output path is the input model; choose another output path")
    if not output.parent.exists():
        raise OutputPathError(f"{output.parent}: output folder does not exist")
