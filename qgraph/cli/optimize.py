"""``qgraph optimize``: the command, and the translation of its options into qgraph's option objects.

The command takes its options as keyword arguments; ``_DESTINATIONS`` says which field of which option object each
one fills (through a conversion where the command line says it differently: ``--per-tensor`` is
``per_channel=False``). The option objects are the Python API's: :class:`~qgraph.calibrate.driver.CalibrationConfig`,
:class:`~qgraph.targets.TargetOptions`, :class:`~qgraph.annotate.annotator.AnnotationOverrides`,
:class:`~qgraph.ptq.QuantizeOptions`, :class:`~qgraph.qat.options.QATOptions`, :class:`~qgraph.pipeline.OutputOptions`
and :class:`~qgraph.pipeline.OptimizeOptions`, whose ``data_layout`` is a :class:`~qgraph.data.layout.DataLayout`.
Defaults and choices are read from them and from the modules that
own the choices, never written here.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from qgraph import pipeline
from qgraph.annotate.annotator import ACTIVATION_MODES, RECURRENT_MODES, AnnotationOverrides
from qgraph.calibrate.driver import CalibrationConfig
from qgraph.calibrate.observers.factory import OBSERVER_METHODS
from qgraph.cli import output as printing
from qgraph.data.layout import DataLayout
from qgraph.errors import QGraphError
from qgraph.pipeline import OptimizeOptions, OutputOptions
from qgraph.progress import Progress
from qgraph.ptq import WEIGHT_METHODS, QuantizeOptions
from qgraph.qat.options import QATOptions
from qgraph.sensitivity import (
    AUTO_BUDGET_CALIBRATION_FACTOR,
    AUTO_BUDGET_SECONDS,
    DEFAULT_MIN_SQNR_DB,
    validate_min_sqnr,
    validate_search_budget,
)
from qgraph.speed_choice import SpeedChoiceOptions
from qgraph.targets import AUTO_CHOICES, FORMATS, TARGET_NAMES, TRANSFORMER_KERNELS, WEIGHT_BITS, TargetOptions
from qgraph.tuning.configuration import budget_fields
from qgraph.weight_only.options import ALGORITHMS, WeightOnlyOptions


def _default(options_class: type, name: str) -> Any:
    """The default of field ``name`` of the option dataclass ``options_class`` (where it is held, once)."""
    return next(field.default for field in dataclasses.fields(options_class) if field.name == name)


def _split_names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise click.BadParameter("give at least one pass name", param_hint="--passes")
    return names


def _split_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _fixed_inputs(assignments: tuple[str, ...]) -> dict[str, str]:
    """``--fix-input NAME=VALUE`` options as {name: value text}; the values are checked against the model later."""
    from qgraph.ir.fix_inputs import parse_assignment

    fixed: dict[str, str] = {}
    for assignment in assignments:
        name, value = parse_assignment(assignment)
        if name in fixed and fixed[name] != value:
            raise QGraphError(f"--fix-input {name} is given twice ({fixed[name]} and {value})")
        fixed[name] = value
    return fixed


class _MinSqnr(click.ParamType):
    """``--min-sqnr``: a bound in dB, or ``off``."""

    name = "min-sqnr"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
            return "off"
        try:
            return validate_min_sqnr(value)
        except QGraphError as error:
            self.fail(str(error).removeprefix("--min-sqnr "), param, ctx)


class _SpeedChoiceLead(click.ParamType):
    """``--speed-choice-lead``: a speed-up over FP32, or ``off``."""

    name = "speed-choice-lead"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
            return None
        try:
            lead = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number nor 'off'", param, ctx)
        minimum = 1 + SpeedChoiceOptions.confirm_band
        if not lead >= minimum:
            self.fail(f"{value!r} is below {minimum:g}: a lead that stops the search must clear the confirmation "
                      f"band", param, ctx)
        return lead


class _SearchBudget(click.ParamType):
    """``--search-budget``: seconds, or ``auto``."""

    name = "search-budget"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return "auto"
        try:
            return validate_search_budget(value)
        except QGraphError as error:
            self.fail(str(error).removeprefix("--search-budget "), param, ctx)


# --- where each option goes ---------------------------------------------------------------------------------------

#: An option's value as fields of its option object.
Conversion = Callable[[Any], Mapping[str, Any]]


def _to(field: str, convert: Callable[[Any], Any] | None = None) -> Conversion:
    """The option's value (through ``convert``) into ``field``."""
    return lambda value: {field: value if convert is None else convert(value)}


def _to_given(field: str) -> Conversion:
    """The option's value into ``field`` when it was given: without it (None) the field keeps its default."""
    return lambda value: {} if value is None else {field: value}


def _min_sqnr(value: float | str | None) -> dict[str, float | None]:
    """``--min-sqnr``: not given keeps the default bound, ``off`` turns the fallback off."""
    return {} if value is None else {"min_sqnr": None if value == "off" else value}


def _keep_fp32(text: str | None) -> dict[str, bool]:
    keep = set(_split_list(text))
    unknown = keep - {"first", "last"}
    if unknown:
        raise click.BadParameter(f"expected first and/or last, got {', '.join(sorted(unknown))}",
                                 param_hint="--keep-fp32")
    return {"keep_first_fp32": "first" in keep, "keep_last_fp32": "last" in keep}


#: Option (the command's parameter name) -> (the option object it configures, how it becomes that object's fields).
_DESTINATIONS: dict[str, tuple[str, Conversion]] = {
    "pass_names": ("optimize", _to("passes", _split_names)),
    "verify": ("optimize", _to("verify")),
    "fixed_inputs": ("optimize", _to("fixed_inputs", _fixed_inputs)),
    "external_data": ("output", _to("external_data")),
    "overwrite_input": ("output", _to("allow_overwrite_input")),
    "method": ("calibration", _to("method")),
    "percentile": ("calibration", _to("percentile")),
    "calib_samples": ("calibration", _to("samples")),
    "batch_size": ("calibration", _to("batch_size")),
    "output_format": ("target", _to("format")),
    "reduce_range": ("target", _to("reduce_range")),
    "per_tensor": ("target", _to("per_channel", operator.not_)),
    "weight_bits": ("target", _to("weight_bits", int)),
    "transformer_kernels": ("target", _to("transformer_kernels")),
    "exclude": ("overrides", _to("exclude", lambda text: frozenset(_split_list(text)))),
    "keep_fp32": ("overrides", _keep_fp32),
    "target": ("quantization", _to("target")),
    "weight_method": ("quantization", _to("weight_method")),
    "requantize": ("quantization", _to("requantize")),
    "config_path": ("quantization", _to("config")),
    "quantize_recurrent": ("quantization", _to("recurrent")),
    "activations": ("quantization", _to("activations")),
    "smooth_quant": ("quantization", _to("smooth_quant")),
    "min_sqnr": ("quantization", _min_sqnr),
    "search_budget": ("quantization", _to("search_budget", lambda value: None if value == "auto" else value)),
    "report_path": ("quantization", _to("sensitivity_table", lambda path: path is not None)),
    "distill": ("qat", _to("loss", lambda distill: "distill" if distill else "labels")),
    "label_key": ("qat", _to_given("label_key")),
    "epochs": ("qat", _to("epochs")),
    "learning_rate": ("qat", _to("learning_rate")),
    "train_batch_size": ("qat", _to("batch_size")),
    "train_samples": ("qat", _to("train_samples")),
    "fixed_scales": ("qat", _to("learn_scales", operator.not_)),
    "freeze_act_after": ("qat", _to("freeze_activation_scales_after")),
    "patience": ("qat", _to("patience")),
    "max_grad_norm": ("qat", _to("max_grad_norm", lambda norm: norm or None)),
    "qat_dir": ("qat", _to("work_directory")),
    "resume": ("qat", _to("resume")),
    # speed choice: never slower than FP32 by default (qgraph.speed_choice)
    "speed_choice": ("quantization", _to("speed_choice")),
    "speed_choice_lead": ("quantization", _to("speed_choice_lead")),
    # data layout: where each key of --calib/--train-data/--val-data holds its samples (qgraph.data.layout)
    "batch_axis": ("layout", lambda texts: {"batch_axes": DataLayout.from_command_line(texts).batch_axes}),
    "infer_state_axes": ("layout", _to("infer_state_axes")),
    "max_drop": ("tuning", _to("max_drop")),
    "higher_is_better": ("tuning", _to("higher_is_better")),
    "tune_budget": ("tuning", budget_fields),
    "tune_for": ("tuning", _to("tune_for")),
    "tune_workers": ("tuning", _to("workers")),
    "ray_address": ("tuning", _to("ray_address")),
}
#: Options that only quantization-aware training reads (refused without --qat).
_QAT_ONLY = (("train_data", "--train-data"), ("label_key", "--labels"), ("distill", "--distill"),
             ("val_data", "--val-data"), ("qat_dir", "--qat-dir"), ("resume", "--resume"),
             ("fixed_scales", "--fixed-scales"), ("freeze_act_after", "--freeze-act-after"),
             ("train_samples", "--train-samples"))


def _fields(values: Mapping[str, Any], group: str) -> dict[str, Any]:
    """The fields of option object ``group`` from the command's option ``values``."""
    fields: dict[str, Any] = {}
    for option, (destination, conversion) in _DESTINATIONS.items():
        if destination == group:
            fields.update(conversion(values[option]))
    return fields


def _quantize_options(values: Mapping[str, Any]) -> QuantizeOptions | None:
    """The quantization the options ask for (None without --calib, which refuses quantization options)."""
    if values["calib"] is None:
        if (values["output_format"] or values["exclude"] or values["keep_fp32"] or values["calib_samples"]
                or values["report_path"] or values["config_path"]
                or values["quantize_recurrent"] != _default(QuantizeOptions, "recurrent")
                or values["speed_choice"] != _default(QuantizeOptions, "speed_choice")
                or values["speed_choice_lead"] != _default(QuantizeOptions, "speed_choice_lead")
                or values["batch_axis"] or values["infer_state_axes"]
                or values["activations"] != _default(QuantizeOptions, "activations")
                or values["smooth_quant"] is not None):
            raise click.UsageError("quantization options need calibration data: add --calib DATA")
        if values["min_sqnr"] is not None:
            raise click.UsageError("--min-sqnr applies to quantization: add --calib DATA")
        return None
    return QuantizeOptions(
        target_options=TargetOptions(**_fields(values, "target")),
        calibration=CalibrationConfig(**_fields(values, "calibration")),
        overrides=AnnotationOverrides(**_fields(values, "overrides")),
        **_fields(values, "quantization"),
    )


def _qat_options(values: Mapping[str, Any]) -> QATOptions | None:
    """The QAT run the options ask for (None without --qat, which refuses QAT options)."""
    if not values["qat"]:
        given = [flag for option, flag in _QAT_ONLY if values[option]]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply to quantization-aware training: add --qat")
        return None
    if values["calib"] is None:
        raise click.UsageError("--qat fine-tunes a quantized model: add --calib DATA for its starting point")
    if values["label_key"] is None and not values["distill"]:
        raise click.UsageError("--qat needs a loss: --labels KEY (cross-entropy against the labels stored under KEY "
                               "in --train-data) or --distill (match the FP32 model's outputs, no labels)")
    if values["label_key"] is not None and values["distill"]:
        raise click.UsageError("choose one QAT loss: --labels KEY or --distill, not both")
    if values["train_data"] is None:
        raise click.UsageError("--qat needs --train-data DATA")
    if values["resume"] and values["qat_dir"] is None:
        raise click.UsageError("--resume needs --qat-dir, the folder of the run to resume")
    from qgraph.train.ort_training import require_training_api

    require_training_api()  # before the model is read: what to install where the runtime cannot train
    return QATOptions(**_fields(values, "qat"))

# --- weight-only quantization (LLMs): its own option object, built from these options ----------------------------

def _weight_only_options(values: Mapping[str, Any]) -> WeightOnlyOptions | None:
    """``--weight-only`` and its options as :class:`~qgraph.weight_only.options.WeightOnlyOptions` (None without it;
    its options are refused without it)."""
    own = (("block_size", "--block-size"), ("algorithm", "--algorithm"), ("symmetric", "--symmetric"),
           ("quantize_embeddings", "--quantize-embeddings"), ("sequential", "--sequential"),
           ("mse_clip", "--mse-clip"), ("accuracy_level", "--accuracy-level"))
    if not values["weight_only"]:
        given = [flag for option, flag in own if values[option] is not None and values[option] is not False]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply to --weight-only")
        return None
    if values["qat"]:
        raise click.UsageError("--weight-only and --qat do not combine: weight-only quantization keeps float "
                               "activations and needs no training")
    fields = {option: values[option] for option, _ in own if values[option] is not None}
    context = click.get_current_context(silent=True)
    if context is None or context.get_parameter_source("weight_bits") != click.core.ParameterSource.DEFAULT:
        fields["bits"] = int(values["weight_bits"])
    if values["output_format"] == "qdq" or values["target"] == "tensorrt":
        fields["format"] = "qdq"
    if values["calib_samples"]:
        fields["samples"] = values["calib_samples"]
    fields["batch_size"] = values["batch_size"]
    if values["exclude"]:
        fields["exclude"] = frozenset(_split_list(values["exclude"]))
    options = WeightOnlyOptions(**fields)
    if options.needs_calibration and values["calib"] is None:
        raise click.UsageError(f"--algorithm {options.algorithm} needs calibration prompts: add --calib DATA")
    return options


def _optimize_options(values: Mapping[str, Any]) -> OptimizeOptions:
    """Every option object the command's option ``values`` describe, checked in the order a user reads them."""
    weight_only = _weight_only_options(values)
    quantization = _quantize_options(values) if weight_only is None else None
    qat = _qat_options(values)
    return OptimizeOptions(quantization=quantization, qat=qat, output=OutputOptions(**_fields(values, "output")),
                          weight_only=weight_only, data_layout=DataLayout(**_fields(values, "layout")),
                          **_fields(values, "optimize"))


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Where to write the result.")
@click.option("--passes", "pass_names", metavar="A,B,...", help="Run these passes instead of the canonical pipeline.")
@click.option("--verify", is_flag=True, help="Check the model after every pass (checker + onnxruntime); slow.")
@click.option(
    "--external-data/--no-external-data",
    default=_default(OutputOptions, "external_data"),
    help="Force tensors into OUTPUT.data or inline (default: external only above ~1.8 GB).",
)
@click.option("--overwrite-input", is_flag=True, help="Allow OUTPUT to be the input file.")
@click.option("--stats", is_flag=True, help="Print time and node counts per pass.")
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    help="Calibration data: .npz (keys = input names), a folder of .npy/.npz, or ONNX test_data_set_* folders. "
    "Giving it turns quantization on.",
)
@click.option("--target", type=click.Choice(TARGET_NAMES), default=_default(QuantizeOptions, "target"),
              show_default=True, help="Backend to quantize for.")
@click.option("--format", "output_format", type=click.Choice(FORMATS),
              help="Integer operators, or explicit QuantizeLinear/DequantizeLinear (default: qoperator for ort-cpu, "
              "qdq for tensorrt).")
@click.option("--method", type=click.Choice(OBSERVER_METHODS), default=_default(CalibrationConfig, "method"),
              show_default=True, help="How activation ranges are chosen from the calibration data.")
@click.option("--weight-method", type=click.Choice(WEIGHT_METHODS), default=_default(QuantizeOptions, "weight_method"),
              show_default=True,
              help="How weight ranges are chosen (per channel).")
@click.option("--percentile", type=float, default=_default(CalibrationConfig, "percentile"), show_default=True,
              help="For --method percentile.")
@click.option("--calib-samples", type=click.IntRange(min=1), help="Use at most N calibration samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=_default(CalibrationConfig, "batch_size"),
              show_default=True,
              help="Calibration batch size.")
@click.option("--reduce-range", type=click.Choice(AUTO_CHOICES), default=_default(TargetOptions, "reduce_range"),
              show_default=True,
              help="7-bit weights for x86 CPUs without VNNI, whose u8s8 kernels can saturate. auto: as this "
                   "machine needs (without VNNI also keeps wider 8-bit weights on exact u8u8 kernels); on: for a "
                   "model built here but deployed on CPUs without VNNI.")
@click.option("--per-tensor", is_flag=True, help="One scale per weight tensor instead of one per output channel.")
@click.option("--weight-bits", type=click.Choice([str(bits) for bits in WEIGHT_BITS]),
              default=str(_default(TargetOptions, "weight_bits")), show_default=True,
              help="Bit width of weights. 4: stored as int4 DequantizeLinear (QDQ, opset 21) or packed MatMulNBits "
                   "(QOperator MatMul/Gemm); Conv weights in QLinearConv stay int8 codes (no int4 kernel).")
@click.option("--transformer-kernels", type=click.Choice(TRANSFORMER_KERNELS),
              default=_default(TargetOptions, "transformer_kernels"), show_default=True,
              help="ort-cpu, QOperator: fast also fuses each integer self-attention block into one com.microsoft "
                   "QAttention and runs exact GELU as FastGelu where its output step covers the difference; faster "
                   "on BERT-like encoders, same accuracy to FP32, but no longer within one step of the QDQ "
                   "simulation (docs/runtime-facts.md). auto: fast after calibration where the fast model's output "
                   "SQNR against FP32 is within 0.5 dB of the simulation's (checked on the search's batches), exact "
                   "otherwise and after QAT.")
@click.option("--exclude", metavar="NAMES", help="Comma-separated node names or operator types to keep in FP32 "
              "(--exclude Gather keeps embedding tables float).")
@click.option("--keep-fp32", metavar="first,last", help="Keep the first and/or last compute layer in FP32.")
@click.option("--requantize", is_flag=True, help="Allow quantizing a model that is already quantized.")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="TOML file of per-tensor overrides: dtype, symmetric and calibration method per activation, bits "
              "and per_channel per weight, exclude and keep_fp32 (see qgraph.annotate.config_file).")
@click.option("--fix-input", "fixed_inputs", multiple=True, metavar="NAME=VALUE",
              help="Make input NAME a constant before optimizing (repeatable): a scalar or a comma list in the "
              "input's type, e.g. sample_rate=16000, flags=1,0,1. An If that it decides is folded into its branch.")
@click.option("--quantize-recurrent", type=click.Choice(RECURRENT_MODES),
              default=_default(QuantizeOptions, "recurrent"), show_default=True,
              help="LSTM/GRU/RNN: keep FP32, or (ort-cpu) run LSTMs as com.microsoft DynamicQuantizeLSTM with int8 "
              "weights; GRU and RNN stay FP32 either way.")
@click.option("--activations", type=click.Choice(ACTIVATION_MODES), default=_default(QuantizeOptions, "activations"),
              show_default=True,
              help="static: calibrated activation ranges; dynamic (ort-cpu): MatMul/Gemm with constant weights "
              "quantize their activations per call (com.microsoft DynamicQuantizeMatMul / MatMulIntegerToFloat, "
              "int8 weights per channel, no calibration for them); auto: dynamic where the input comes from a "
              "float node (LayerNorm, GELU), static elsewhere.")
@click.option("--smooth-quant", "smooth_quant", type=click.FloatRange(0.0, 1.0), default=None, metavar="ALPHA",
              help="SmoothQuant before quantizing: per input channel j of each MatMul/Gemm with outlier channels, "
              "activations / s_j and weight rows * s_j with s_j = max|X_j|^ALPHA / max|W_j|^(1-ALPHA) "
              "(0.5 is the usual choice; statistics from the calibration data).")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write a quantization report (.md, .json, or .html with plots): per-layer SQNR, coverage, size, "
              "latency, deploy parity of the integer kernels.")
@click.option("--eval", "eval_command", metavar="'CMD {model}'",
              help="Accuracy-driven tuning: CMD scores a model file and prints the score on its last line; the "
              "FP32 model is scored first, then configurations cheapest first until one meets --max-drop. Writes "
              "OUTPUT, its recipe OUTPUT.toml (replay with --config) and the trials OUTPUT.trials.json.")
@click.option("--max-drop", type=float, help="--eval: the largest acceptable score drop from the FP32 model's.")
@click.option("--higher-is-better/--lower-is-better", default=True, show_default=True,
              help="--eval: which way the score improves.")
@click.option("--tune-budget", metavar="N|Nmin", help="--eval: at most N trials, or N minutes of search (Nmin).")
@click.option("--tune-for", type=click.Choice(["accuracy", "speed"]), default="accuracy", show_default=True,
              help="--eval: stop at the first configuration that meets --max-drop, or keep searching (within "
              "--tune-budget) for the fastest that does (latency timed side by side).")
@click.option("--tune-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="--eval: trials run at once, as Ray tasks on a local Ray instance started on demand (the "
              "qgraph[ray] extra); onnxruntime gets cores/N threads in each. 1: in this process.")
@click.option("--ray-address", metavar="ADDRESS",
              help="--eval: run the trials on the existing Ray cluster at ADDRESS (HOST:PORT, ray://HOST:PORT or "
              "auto) instead of a local instance.")
@click.option("--min-sqnr", type=_MinSqnr(), default=None, metavar="DB|off",
              help="Automatic fallback: if the quantized model's output SQNR on the first calibration batches is "
              "below DB, the layers that damage it most go back to FP32 until it is not "
              f"(default {DEFAULT_MIN_SQNR_DB:g} dB: rescues a model that one layer breaks, leaves healthy models "
              "alone). 'off' disables it.")
@click.option("--search-budget", type=_SearchBudget(), default="auto", metavar="SECONDS|auto",
              help="Longest time the automatic fallback may search (default auto: "
              f"{AUTO_BUDGET_SECONDS:g} s + {AUTO_BUDGET_CALIBRATION_FACTOR:g}x the calibration time). When it runs "
              "out, the best plan found so far is kept and a warning says so.")
@click.option("--qat", is_flag=True,
              help="Quantization-aware training: fine-tune the quantized model (fake quantization with learnable "
              "scales) on --train-data before lowering. Needs --calib and --labels KEY or --distill.")
@click.option("--train-data", type=click.Path(path_type=Path),
              help="QAT training data (.npz or folder, keys = input names, plus labels for --labels).")
@click.option("--labels", "label_key", metavar="KEY",
              help="QAT with cross-entropy against the integer class labels stored under KEY in --train-data "
              "(the model output must be logits).")
@click.option("--distill", is_flag=True,
              help="Label-free QAT: minimise the mean squared error between the quantized model's outputs and the "
              "FP32 model's outputs on the same inputs.")
@click.option("--val-data", type=click.Path(path_type=Path),
              help="QAT validation data: picks the best epoch (top-1 with --labels, MSE with --distill) and stops "
              "early when it stops improving.")
@click.option("--epochs", type=click.IntRange(min=1), default=_default(QATOptions, "epochs"), show_default=True,
              help="QAT epochs.")
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True),
              default=_default(QATOptions, "learning_rate"), show_default=True,
              help="QAT learning rate (AdamW, cosine decay); about a tenth of FP32 training's.")
@click.option("--train-batch-size", type=click.IntRange(min=1), default=_default(QATOptions, "batch_size"),
              show_default=True,
              help="QAT batch size.")
@click.option("--train-samples", type=click.IntRange(min=1), help="Use at most N training samples per QAT epoch.")
@click.option("--fixed-scales", is_flag=True, help="QAT keeps the calibrated scales (only weights and biases train).")
@click.option("--freeze-act-after", type=click.IntRange(min=0), metavar="K",
              help="Stop updating activation scales after K QAT steps.")
@click.option("--patience", type=click.IntRange(min=1), default=_default(QATOptions, "patience"), show_default=True,
              help="Stop QAT after N epochs without validation improvement.")
@click.option("--max-grad-norm", type=click.FloatRange(min=0), default=_default(QATOptions, "max_grad_norm"),
              show_default=True,
              help="Clip the global gradient norm during QAT (0: off).")
@click.option("--qat-dir", type=click.Path(path_type=Path),
              help="Keep QAT artifacts and checkpoints here (default: a temporary folder).")
@click.option("--resume", is_flag=True, help="Resume QAT from the last checkpoint in --qat-dir.")
@click.option("--weight-only", is_flag=True,
              help="LLM weight-only quantization: every MatMul/Gemm with a constant weight gets block-wise 4-bit "
              "(or --weight-bits 8) weights, activations stay float; written as com.microsoft MatMulNBits for "
              "ort-cpu, blocked int4 DequantizeLinear -> MatMul (opset 21) for --target tensorrt or --format qdq.")
@click.option("--block-size", type=int, default=None,
              help=f"--weight-only: inputs per quantization block, a power of two 16..256 "
              f"(default {_default(WeightOnlyOptions, 'block_size')}).")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default=None,
              help="--weight-only: rtn (no data), gptq or awq (need --calib prompts; default rtn).")
@click.option("--symmetric/--asymmetric", default=None,
              help="--weight-only: codes without zero points, or a zero point per block (default asymmetric).")
@click.option("--quantize-embeddings", is_flag=True, default=None,
              help="--weight-only: quantize Gather tables (token embeddings) too, blocked along the hidden axis.")
@click.option("--sequential", is_flag=True, default=None,
              help="--weight-only GPTQ: each layer's inputs from the model whose earlier layers are quantized.")
@click.option("--mse-clip", is_flag=True, default=None,
              help="--weight-only: search a clipping ratio per block for the least squared weight error.")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="--weight-only: MatMulNBits accuracy_level (default 4: int8 activations inside the kernel, the "
                   "fast one on CPUs; 0: unset, float compute, slower than FP32 on small decoders).")
@click.option("--speed-choice/--no-speed-choice", default=_default(QuantizeOptions, "speed_choice"), show_default=True,
              help="Time the quantized model against FP32 on this machine (onnxruntime, batch 1 and --batch-size, "
              f"at most ~{_default(QuantizeOptions, 'speed_choice_seconds'):g} s of timing runs) and write the "
              "fastest; when the plain lowering is already twice as fast as FP32 at both sizes, nothing else is "
              "timed. Otherwise it chooses QOperator or QDQ (unless --format names one), with FP32 kept where "
              "integer kernels are "
              "slower here (stem, depthwise convolutions, squeeze-excite blocks, small MatMuls). The summary says "
              "what was chosen; when every integer model is slower than FP32 it writes the FP32 model and warns. "
              "Target ort-cpu only; --no-speed-choice writes the plain lowering, unmeasured (for another CPU, say).")
@click.option("--speed-choice-lead", type=_SpeedChoiceLead(),
              default=f"{_default(QuantizeOptions, 'speed_choice_lead'):g}", show_default=True, metavar="X|off",
              help="The speed choice stops once the plain lowering is at least X times as fast as FP32 at both "
              "batch sizes (the other candidates win a few percent where they win); off: time every candidate.")
@click.option("--batch-axis", "batch_axis", multiple=True, metavar="KEY=AXIS",
              help="Data key KEY holds its samples along AXIS (repeatable), e.g. state=1 for a recurrent state "
              "[layers, batch, hidden]; KEY=none: a constant fed with every batch. Other keys: axis 0, scalars are "
              "constants. A folder of per-sample .npz feeds (batch 1 each, exactly what the model takes) is batched "
              "along these axes; keys of inputs removed by --fix-input are ignored.")
@click.option("--infer-state-axes", is_flag=True,
              help="Rank-3 data keys named like a recurrent state (state, h0, c0, hidden, initial_h, ...) hold "
              "their samples along axis 1, ONNX's [layers, batch, hidden]; only when asked, since a name is a hint.")
def optimize(**values: Any) -> None:
    """Optimize MODEL and write the result to OUTPUT.

    Without --calib: canonicalize (fold constants and BatchNorm, remove Identity and dead nodes, merge bias Adds);
    outputs stay equal to the input model's. With --calib: quantize to INT8 for --target after canonicalizing.
    With --qat as well: fine-tune the quantized model on --train-data (quantization-aware training with
    straight-through fake quantization and learnable scales), against --labels KEY or, without labels, against the
    FP32 model's outputs (--distill); the learned weights and scales are written back before lowering.

    \b
    Examples:
      qgraph optimize model.onnx -o model.opt.onnx
      qgraph optimize model.onnx -o model.int8.onnx --calib calib.npz
      qgraph optimize model.onnx -o model.int8.onnx --calib calib.npz --min-sqnr 30 --report report.md
      qgraph optimize model.onnx -o model.trt.onnx --calib calib.npz --target tensorrt --method entropy
      qgraph optimize model.onnx -o model.qat.onnx --calib calib.npz --qat --train-data train.npz --labels y \
          --val-data val.npz --epochs 3 --lr 1e-4
      qgraph optimize model.onnx -o model.qat.onnx --calib calib.npz --qat --train-data unlabelled.npz --distill

    The input file is never overwritten unless --overwrite-input is given.
    """
    from qgraph.ir import load_model
    from qgraph.summary import summarize
    from qgraph.weight_only.driver import describe as describe_weight_only

    options = _optimize_options(values)
    model, calib = values["model"], values["calib"]
    if values["eval_command"] is not None or values["max_drop"] is not None:
        return _tune(values, options)
    loaded = load_model(model)
    before = summarize(loaded)
    if options.weight_only is not None:
        result = pipeline.optimize(loaded, values["output"], options, input_path=model, calibration_data=calib)
        for line in describe_weight_only(result.weight_only):
            click.echo(line)
    elif options.quantization is None:
        result = pipeline.optimize(loaded, values["output"], options, input_path=model)
    else:
        layout = options.data_layout.with_removed_inputs(options.fixed_inputs)
        total = _calibration_length(calib, options.quantization.calibration.samples, layout)
        with Progress(total, "calibrating", unit="samples") as bar:
            result = pipeline.optimize(
                loaded, values["output"], options, input_path=model, calibration_data=calib, progress=bar.update,
                train_data=values["train_data"], validation_data=values["val_data"],
                training_progress=printing.echo_epoch,
            )
    click.echo(printing.change_line(before, summarize(result.model), result))
    if result.quantization is not None:
        click.echo(printing.quantization_line(result.quantization))
        if result.qat is not None:
            click.echo(printing.qat_line(result.qat))
        if values["report_path"] is not None:
            printing.write_report(values["report_path"], result, calib, options.quantization.calibration.batch_size,
                                  options.data_layout.with_removed_inputs(options.fixed_inputs))
    if values["stats"]:
        click.echo(printing.stats_table(result.records))


def _tune(values: Mapping[str, Any], options: OptimizeOptions) -> None:
    """``--eval``: the accuracy-driven search (see :mod:`qgraph.tuning`), then its report."""
    from qgraph import tuning

    if values["eval_command"] is None or values["max_drop"] is None:
        raise click.UsageError("accuracy-driven tuning needs both --eval 'CMD {model}' and --max-drop X")
    if options.quantization is None or options.qat is not None:
        raise click.UsageError("--eval tunes post-training quantization: add --calib DATA (and no --qat)")
    evaluate = tuning.command_evaluator(values["eval_command"])
    result = tuning.tune(values["model"], values["output"], values["calib"], evaluate,
                         tuning.TuningOptions(**_fields(values, "tuning")), options)
    for line in tuning.describe_trials(result.trials, result.chosen):
        click.echo(line)
    click.echo(f"tuning: {len(result.trials)} trials in {result.seconds:.1f} s; wrote {values['output']} "
               f"(trial #{result.chosen}), recipe {result.recipe_path}, trials {result.trials_path}")
    if values["report_path"] is not None:
        printing.write_report(values["report_path"], tuning.replay(result, values["model"], values["calib"], options),
                              values["calib"],
                              options.quantization.calibration.batch_size, tuning=result.summary())
    tuning.check_bound(result)


def _calibration_length(calib: Path, limit: int | None, layout: DataLayout | None = None) -> int:
    """Samples the progress bar counts (along each key's batch axis, as ``layout`` says); opening the data here also
    refuses a missing or unreadable file first."""
    from qgraph.data import open_dataset

    count = open_dataset(calib, layout=layout).num_samples
    return min(count, limit) if limit else count
