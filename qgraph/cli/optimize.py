"""``qgraph optimize``: the command, and the translation of its options into qgraph's option objects."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qgraph.cli import output as printing
from qgraph.errors import QGraphError

def _split_names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise click.BadParameter("give at least one pass name", param_hint="--passes")
    return names


class _MinSqnr(click.ParamType):
    """``--min-sqnr``: a bound in dB, or ``off``."""

    name = "min-sqnr"

    def convert(self, value, param, ctx):
        from qgraph.sensitivity import validate_min_sqnr

        if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
            return "off"
        try:
            return validate_min_sqnr(value)
        except QGraphError as error:
            self.fail(str(error).removeprefix("--min-sqnr "), param, ctx)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Where to write the result.")
@click.option("--passes", "pass_names", metavar="A,B,...", help="Run these passes instead of the canonical pipeline.")
@click.option("--verify", is_flag=True, help="Check the model after every pass (checker + onnxruntime); slow.")
@click.option(
    "--external-data/--no-external-data",
    default=None,
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
@click.option("--target", type=click.Choice(["ort-cpu", "tensorrt"]), default="ort-cpu", show_default=True,
              help="Backend to quantize for.")
@click.option("--format", "output_format", type=click.Choice(["qoperator", "qdq"]),
              help="Integer operators, or explicit QuantizeLinear/DequantizeLinear (default: qoperator for ort-cpu, "
              "qdq for tensorrt).")
@click.option("--method", type=click.Choice(["minmax", "ema", "entropy", "percentile", "mse"]), default="minmax",
              show_default=True, help="How activation ranges are chosen from the calibration data.")
@click.option("--weight-method", type=click.Choice(["minmax", "mse"]), default="minmax", show_default=True,
              help="How weight ranges are chosen (per channel).")
@click.option("--percentile", type=float, default=99.999, show_default=True, help="For --method percentile.")
@click.option("--calib-samples", type=click.IntRange(min=1), help="Use at most N calibration samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Calibration batch size.")
@click.option("--reduce-range", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="7-bit weights for x86 CPUs without VNNI, whose u8s8 kernels can saturate. auto: as this "
                   "machine needs (without VNNI also keeps wider 8-bit weights on exact u8u8 kernels); on: for a "
                   "model built here but deployed on CPUs without VNNI.")
@click.option("--per-tensor", is_flag=True, help="One scale per weight tensor instead of one per output channel.")
@click.option("--weight-bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="Bit width of weights.")
@click.option("--exclude", metavar="NAMES", help="Comma-separated node names or operator types to keep in FP32.")
@click.option("--keep-fp32", metavar="first,last", help="Keep the first and/or last compute layer in FP32.")
@click.option("--requantize", is_flag=True, help="Allow quantizing a model that is already quantized.")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="TOML file of per-tensor overrides: dtype, symmetric and calibration method per activation, bits "
              "and per_channel per weight, exclude and keep_fp32 (see qgraph.annotate.config_file).")
@click.option("--fix-input", "fixed_inputs", multiple=True, metavar="NAME=VALUE",
              help="Make input NAME a constant before optimizing (repeatable): a scalar or a comma list in the "
              "input's type, e.g. sample_rate=16000, flags=1,0,1. An If that it decides is folded into its branch.")
@click.option("--quantize-recurrent", type=click.Choice(["fp32", "dynamic"]), default="fp32", show_default=True,
              help="LSTM/GRU/RNN: keep FP32, or (ort-cpu) run LSTMs as com.microsoft DynamicQuantizeLSTM with int8 "
              "weights; GRU and RNN stay FP32 either way.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write a quantization report (.md or .json): per-layer SQNR, coverage, size, latency.")
@click.option("--min-sqnr", type=_MinSqnr(), default=None, metavar="DB|off",
              help="Automatic fallback: if the quantized model's output SQNR on the first calibration batches is "
              "below DB, the layers that damage it most go back to FP32 until it is not (default 10 dB: rescues a "
              "model that one layer breaks, leaves healthy models alone). 'off' disables it.")
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
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, help="QAT epochs.")
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="QAT learning rate (AdamW, cosine decay); about a tenth of FP32 training's.")
@click.option("--train-batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="QAT batch size.")
@click.option("--train-samples", type=click.IntRange(min=1), help="Use at most N training samples per QAT epoch.")
@click.option("--fixed-scales", is_flag=True, help="QAT keeps the calibrated scales (only weights and biases train).")
@click.option("--freeze-act-after", type=click.IntRange(min=0), metavar="K",
              help="Stop updating activation scales after K QAT steps.")
@click.option("--patience", type=click.IntRange(min=1), default=2, show_default=True,
              help="Stop QAT after N epochs without validation improvement.")
@click.option("--max-grad-norm", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Clip the global gradient norm during QAT (0: off).")
@click.option("--qat-dir", type=click.Path(path_type=Path),
              help="Keep QAT artifacts and checkpoints here (default: a temporary folder).")
@click.option("--resume", is_flag=True, help="Resume QAT from the last checkpoint in --qat-dir.")
def optimize(
    model: Path,
    output: Path,
    pass_names: str | None,
    verify: bool,
    external_data: bool | None,
    overwrite_input: bool,
    stats: bool,
    calib: Path | None,
    target: str,
    output_format: str | None,
    method: str,
    weight_method: str,
    percentile: float,
    calib_samples: int | None,
    batch_size: int,
    reduce_range: str,
    per_tensor: bool,
    weight_bits: str,
    exclude: str | None,
    keep_fp32: str | None,
    requantize: bool,
    config_path: Path | None,
    report_path: Path | None,
    min_sqnr: float | str | None = None,
    fixed_inputs: tuple[str, ...] = (),
    quantize_recurrent: str = "fp32",
    qat: bool = False,
    train_data: Path | None = None,
    label_key: str | None = None,
    distill: bool = False,
    val_data: Path | None = None,
    epochs: int = 3,
    learning_rate: float = 1e-4,
    train_batch_size: int = 64,
    train_samples: int | None = None,
    fixed_scales: bool = False,
    freeze_act_after: int | None = None,
    patience: int = 2,
    max_grad_norm: float = 5.0,
    qat_dir: Path | None = None,
    resume: bool = False,
) -> None:
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
    import dataclasses

    from qgraph.ir import load_model
    from qgraph.pipeline import OptimizeOptions
    from qgraph.pipeline import optimize as run_optimize
    from qgraph.summary import summarize

    quantization = None
    if calib is not None:
        quantization = _quantize_options(
            target, output_format, method, weight_method, percentile, calib_samples, batch_size, reduce_range,
            per_tensor, int(weight_bits), exclude, keep_fp32, requantize, min_sqnr, report_path is not None,
        )
        quantization = dataclasses.replace(quantization, recurrent=quantize_recurrent, config=config_path)
    elif (output_format or exclude or keep_fp32 or calib_samples or report_path or config_path
          or quantize_recurrent != "fp32"):
        raise click.UsageError("quantization options need calibration data: add --calib DATA")
    if min_sqnr is not None and calib is None:
        raise click.UsageError("--min-sqnr applies to quantization: add --calib DATA")
    qat_options = _qat_options(
        qat, calib, train_data, label_key, distill, val_data, epochs, learning_rate, train_batch_size, train_samples,
        fixed_scales, freeze_act_after, patience, max_grad_norm, qat_dir, resume,
    )
    options = OptimizeOptions(
        passes=_split_names(pass_names),
        verify=verify,
        external_data=external_data,
        allow_overwrite_input=overwrite_input,
        quantization=quantization,
        qat=qat_options,
        fixed_inputs=_fixed_inputs(fixed_inputs),
    )
    loaded = load_model(model)
    before = summarize(loaded)
    if quantization is None:
        result = run_optimize(loaded, output, options, input_path=model)
    else:
        total = _calibration_length(calib, calib_samples)
        with click.progressbar(length=total, label="calibrating", file=sys.stderr, show_pos=True) as bar:
            result = run_optimize(
                loaded, output, options, input_path=model, calibration_data=calib, progress=bar.update,
                train_data=train_data, validation_data=val_data, training_progress=printing.echo_epoch,
            )
    after = summarize(result.model)
    click.echo(printing.change_line(before, after, result))
    if result.quantization is not None:
        plan = result.quantization.plan
        click.echo(
            f"quantized {len(plan.quantized_nodes)} nodes for {plan.target} "
            f"({plan.coverage:.0%} coverage), {len(plan.fp32_nodes)} kept FP32; "
            f"calibrated on {result.quantization.calibration.samples} samples "
            f"in {result.quantization.calibration.seconds:.1f} s" + printing.fallback_summary(result.quantization.sensitivity)
        )
        if result.qat is not None:
            trained = result.qat
            best = "none" if trained.best_metric is None else f"{trained.best_metric:.4f}"
            click.echo(
                f"QAT: {trained.epochs_completed} epochs ({trained.steps} steps) in {trained.seconds:.1f} s"
                + (" (stopped early)" if trained.stopped_early else "")
                + f"; best {trained.metric_name} {best} at epoch {trained.best_epoch}"
                + ("; training made the model worse than the calibrated one "
                   f"(objective {trained.objective_before:.4g} -> {trained.objective_after:.4g}), which was kept: "
                   "try a smaller --lr" if trained.kept_start else "")
            )
        if report_path is not None:
            printing.write_report(report_path, result, calib, batch_size)
    if stats:
        click.echo(printing.stats_table(result.records))


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


def _qat_options(
    qat, calib, train_data, label_key, distill, val_data, epochs, learning_rate, train_batch_size, train_samples,
    fixed_scales, freeze_act_after, patience, max_grad_norm, qat_dir, resume,
):
    from qgraph.qat.options import QATOptions

    if not qat:
        given = [name for name, value in (("--train-data", train_data), ("--labels", label_key),
                                          ("--distill", distill), ("--val-data", val_data), ("--qat-dir", qat_dir),
                                          ("--resume", resume), ("--fixed-scales", fixed_scales),
                                          ("--freeze-act-after", freeze_act_after),
                                          ("--train-samples", train_samples)) if value]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply to quantization-aware training: add --qat")
        return None
    if calib is None:
        raise click.UsageError("--qat fine-tunes a quantized model: add --calib DATA for its starting point")
    if label_key is None and not distill:
        raise click.UsageError("--qat needs a loss: --labels KEY (cross-entropy against the labels stored under KEY "
                               "in --train-data) or --distill (match the FP32 model's outputs, no labels)")
    if label_key is not None and distill:
        raise click.UsageError("choose one QAT loss: --labels KEY or --distill, not both")
    if train_data is None:
        raise click.UsageError("--qat needs --train-data DATA")
    if resume and qat_dir is None:
        raise click.UsageError("--resume needs --qat-dir, the folder of the run to resume")
    return QATOptions(
        loss="distill" if distill else "labels", label_key=label_key or "label", epochs=epochs,
        batch_size=train_batch_size, learning_rate=learning_rate, max_grad_norm=max_grad_norm or None,
        learn_scales=not fixed_scales, freeze_activation_scales_after=freeze_act_after, patience=patience,
        work_directory=qat_dir, resume=resume, train_samples=train_samples,
    )


def _quantize_options(
    target, output_format, method, weight_method, percentile, calib_samples, batch_size, reduce_range, per_tensor,
    weight_bits, exclude, keep_fp32, requantize, min_sqnr=None, sensitivity_table=False,
):
    from qgraph.calibrate.driver import CalibrationConfig
    from qgraph.annotate.annotator import AnnotationOverrides
    from qgraph.ptq import QuantizeOptions
    from qgraph.targets import TargetOptions

    keep = set(_split_list(keep_fp32))
    unknown = keep - {"first", "last"}
    if unknown:
        raise click.BadParameter(f"expected first and/or last, got {', '.join(sorted(unknown))}",
                                 param_hint="--keep-fp32")
    return QuantizeOptions(
        target=target,
        target_options=TargetOptions(
            format=output_format, reduce_range=reduce_range, per_channel=not per_tensor, weight_bits=weight_bits
        ),
        calibration=CalibrationConfig(
            method=method, samples=calib_samples, batch_size=batch_size, percentile=percentile
        ),
        weight_method=weight_method,
        overrides=AnnotationOverrides(
            exclude=frozenset(_split_list(exclude)), keep_first_fp32="first" in keep, keep_last_fp32="last" in keep
        ),
        requantize=requantize,
        **({} if min_sqnr is None else {"min_sqnr": None if min_sqnr == "off" else min_sqnr}),
        sensitivity_table=sensitivity_table,
    )


def _split_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _calibration_length(calib: Path, limit: int | None) -> int:
    """Samples the progress bar counts; opening the data here also refuses a missing or unreadable file first."""
    from qgraph.data import open_dataset

    count = open_dataset(calib).num_samples
    return min(count, limit) if limit else count
