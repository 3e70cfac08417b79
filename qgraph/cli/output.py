"""What ``qgraph optimize`` prints: the one-line summaries, the per-pass table, QAT progress and the report."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import click


def fallback_summary(sensitivity) -> str:
    if sensitivity is None:
        return ""
    bound = f"bound {sensitivity.min_sqnr_db:g} dB"
    if not sensitivity.fell_back:
        return f"; output SQNR {sensitivity.output_sqnr_db:.1f} dB ({bound}), no layer fell back"
    count = len(sensitivity.fell_back)
    return (
        f"; {count} layer{'s' if count != 1 else ''} fell back to FP32 ({', '.join(sensitivity.fell_back)}): output "
        f"SQNR {sensitivity.output_sqnr_db:.1f} -> {sensitivity.final_output_sqnr_db:.1f} dB ({bound})"
    )


def quantization_line(quantization) -> str:
    """What was quantized and calibrated, and how the fallback went."""
    plan = quantization.plan
    return (
        f"quantized {len(plan.quantized_nodes)} nodes for {plan.target} "
        f"({plan.coverage:.0%} of the float nodes), {len(plan.fp32_nodes)} kept FP32"
        + (f" ({len(plan.index_nodes)} of them shape or index arithmetic)" if plan.index_nodes else "") + "; "
        f"calibrated on {quantization.calibration.samples} samples "
        f"in {quantization.calibration.seconds:.1f} s" + fallback_summary(quantization.sensitivity)
        + _kernels_summary(getattr(quantization, "kernels", None))
        + (f"; speed: {quantization.speed.describe()}" if getattr(quantization, "speed", None) else "")
    )


def _kernels_summary(kernels) -> str:
    """The transformer kernels auto chose, when it measured them (a model without attention or GELU says nothing)."""
    if kernels is None or kernels.output_sqnr_db is None:
        return ""
    return f"; transformer kernels: {kernels.reason}"


def qat_line(trained) -> str:
    """How quantization-aware training went."""
    best = "none" if trained.best_metric is None else f"{trained.best_metric:.4f}"
    return (
        f"QAT: {trained.epochs_completed} epochs ({trained.steps} steps) in {trained.seconds:.1f} s"
        + (" (stopped early)" if trained.stopped_early else "")
        + f"; best {trained.metric_name} {best} at epoch {trained.best_epoch}"
        + ("; training made the model worse than the calibrated one "
           f"(objective {trained.objective_before:.4g} -> {trained.objective_after:.4g}), which was kept: "
           "try a smaller --lr" if trained.kept_start else "")
    )


def echo_epoch(event) -> None:
    if event.kind != "epoch":
        return
    metric = f", {event.metric_name} {event.metric:.4f}" if event.metric is not None else ""
    click.echo(f"QAT epoch {event.epoch}: loss {event.loss:.4f}{metric}, {event.samples_per_second:.0f} samples/s",
               err=True)


def write_report(path: Path, result, calib: Path, batch_size: int, layout=None, tuning=None) -> None:
    """The report of ``result`` on two calibration batches (with QAT's history and ``tuning``, a
    :meth:`qgraph.tuning.TuningResult.summary`, when given) written to ``path`` (.md, .json or .html)."""
    import itertools

    import onnx_ir as ir

    from qgraph.calibrate.driver import CalibrationConfig
    from qgraph.pipeline import laid_out_batches
    from qgraph.report import build_report

    float_model = result.float_model
    batches, batch_axes = laid_out_batches(float_model, calib, CalibrationConfig(batch_size=batch_size), layout)
    report = build_report(
        float_model, ir.serde.serialize_model(result.model), result.quantization, list(itertools.islice(batches, 2)),
        batch_axes=batch_axes,
    )
    history = tuple(dataclasses.asdict(event) for event in result.qat.history) if result.qat is not None else ()
    report = dataclasses.replace(report, qat_history=history, tuning=tuning)
    report.write(path)
    speed = f", {report.speedup:.2f}x faster at batch 1" if report.speedup else ""
    worst = min(report.outputs.values()) if report.outputs else float("nan")
    click.echo(f"report {path}: output SQNR {worst:.1f} dB, "
               f"{report.size_before / report.size_after:.2f}x smaller{speed}")


def change_line(before, after, result) -> str:
    delta = collections.Counter(after.operator_counts)
    delta.subtract(before.operator_counts)
    changes = ", ".join(f"{name} {count:+d}" for name, count in sorted(delta.items()) if count)
    seconds = sum(record.seconds for record in result.records)
    return (
        f"wrote {result.output_path}: {before.node_count} -> {after.node_count} nodes"
        + (f" ({changes})" if changes else "")
        + f", {seconds:.2f} s in passes"
    )


def stats_table(records) -> str:
    rows = collections.OrderedDict()
    for record in records:
        seconds, runs, modified, removed = rows.get(record.name, (0.0, 0, 0, 0))
        rows[record.name] = (
            seconds + record.seconds,
            runs + 1,
            modified + int(record.modified),
            removed + record.nodes_before - record.nodes_after,
        )
    lines = [f"{'pass':<24} {'runs':>4} {'changed':>7} {'nodes -':>8} {'time':>9}"]
    for name, (seconds, runs, modified, removed) in rows.items():
        lines.append(f"{name:<24} {runs:>4} {modified:>7} {removed:>8} {seconds * 1000:>7.1f}ms")
    return "\n".join(lines)
