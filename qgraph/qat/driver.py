"""The QAT driver: calibrated QDQ graph ─▶ fake-quant training graph ─▶ Trainer ─▶ clean QDQ graph.

:func:`run_qat` checks the data and the model first (one-line :class:`~qgraph.errors.DataError` for a missing label
key, labels outside ``[0, classes)``, an output that is not logits while labels are asked for), builds the training
graph (:mod:`qgraph.qat.fake_quant_graph`), and trains it with :class:`qgraph.train.Trainer`:

- AdamW, a small learning rate (``1e-4`` by default), no weight decay (it would pull the log-scales towards
  ``scale = 1``), cosine decay to zero over the run with optional linear warm-up, global gradient-norm clipping
  (5.0 by default);
- the loss on the model's first output; with several outputs (an encoder's hidden states and its pooler), the
  parameters that only the others read keep their calibrated values, with a warning (onnxruntime-training refuses
  a trainable parameter its loss cannot reach);
- validation after every epoch — top-1 accuracy with labels, MSE against the FP32 outputs when distilling (or the
  epoch's training loss without validation data) — and the best checkpoint kept; early stopping after ``patience``
  epochs without improvement;
- optional freezing of the activation scales after ``K`` steps: from step ``K`` on, their values are restored after
  every optimizer step (AdamW's moments would otherwise keep moving them);
- resume from the last checkpoint of the work directory; progress events (loss, metric, samples per second) are
  forwarded to the caller.

A non-finite loss stops the run: the trainer keeps the best checkpoint and :class:`TrainingDivergedError` says
where it is (the work directory is kept). Otherwise the best checkpoint's parameters are exported into the QDQ graph
(:mod:`qgraph.qat.export`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qgraph.errors import DataError, QGraphError
from qgraph.qat.distill import BatchSource, Teacher
from qgraph.qat.export import export_qdq, read_checkpoint_parameters
from qgraph.qat.fake_quant_graph import FakeQuantGraph, build_fake_quant_graph
from qgraph.qat.options import QATOptions
from qgraph.train.config import CosineSchedule, TrainingConfig
from qgraph.train.trainer import ProgressEvent, Trainer, TrainingDivergedError

logger = logging.getLogger(__name__)

#: Operators whose output is a probability or a decision, not a logit.
NOT_LOGITS = frozenset({"Softmax", "LogSoftmax", "Sigmoid", "ArgMax", "ArgMin", "TopK", "Hardmax"})
_TRANSPARENT = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "DequantizeLinear",
                          "QuantizeLinear"})


@dataclasses.dataclass(frozen=True)
class QATResult:
    """What a QAT run produced: the QDQ model with learned parameters, and how the training went."""

    qdq_model: onnx.ModelProto
    graph: FakeQuantGraph
    epochs_completed: int
    steps: int
    metric_name: str
    best_metric: float | None
    best_epoch: int | None
    stopped_early: bool
    seconds: float
    history: tuple[ProgressEvent, ...]
    #: The training objective (mean loss) of the starting and the trained model on the guard batches.
    objective_before: float | None = None
    objective_after: float | None = None
    #: True when training made the objective worse and the calibrated starting model was returned instead.
    kept_start: bool = False


class _EarlyStop(Exception):
    """Raised from the epoch progress event to leave ``Trainer.fit`` once patience ran out."""


def check_logits_output(model: onnx.ModelProto, output_name: str) -> None:
    """Refuse, for the cross-entropy loss, an output that is not ``batch × classes`` float logits."""
    outputs = {value.name: value for value in model.graph.output}
    value = outputs[output_name]
    expected = "the --labels loss is cross-entropy, which expects logits (float, batch × classes, before softmax)"
    if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise DataError(f"output {output_name!r} is not float32; {expected}")
    if value.type.tensor_type.HasField("shape") and len(value.type.tensor_type.shape.dim) != 2:
        raise DataError(f"output {output_name!r} has rank {len(value.type.tensor_type.shape.dim)}; {expected}; "
                        "use --distill for other outputs")
    producers = {output: node for node in model.graph.node for output in node.output}
    node = producers.get(output_name)
    while node is not None and node.op_type in _TRANSPARENT:
        node = producers.get(node.input[0])
    if node is not None and node.op_type in NOT_LOGITS:
        raise DataError(f"output {output_name!r} comes from {node.op_type}, not logits; {expected}; remove the final "
                        f"{node.op_type} or use --distill")


def _open(data: Any, role: str, *, label_key: str | None, required_label: bool, input_names: set[str],
          layout=None):
    """A dataset from a path (opened with ``layout``, a :class:`qgraph.data.DataLayout`) or a dataset, with
    ``label_key`` checked (required with labels, optional otherwise)."""
    from qgraph.data import open_dataset

    if not isinstance(data, (str, Path)):
        if required_label and getattr(data, "label_key", None) != label_key:
            raise DataError(f"the {role} data has no label key {label_key!r}")
        return data
    probe = open_dataset(data, layout=layout)
    keys = list(probe.input_names)
    if required_label:
        if label_key not in keys:
            raise DataError(f"{data}: the {role} data has no label key {label_key!r} (keys: {', '.join(keys)}); "
                            "name the labels with --labels KEY, or use --distill to train without labels")
        return open_dataset(data, label_key=label_key, layout=layout)
    # Distillation needs no labels: one key that is not a model input (labels kept for evaluation) is left aside.
    extra = [key for key in keys if key not in input_names]
    if len(extra) > 1:
        raise DataError(f"{data}: keys {', '.join(extra)} are not inputs of the model; distillation reads only the "
                        f"model inputs ({', '.join(sorted(input_names))}) and can leave one extra key aside")
    return open_dataset(data, label_key=extra[0], layout=layout) if extra else probe


def _check_labels(dataset, num_classes: int | None, role: str) -> None:
    labels = dataset.labels()
    if labels is None:
        return
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{role} labels {dataset.label_key!r} must be 1-D integer class indices, "
                        f"got {labels.dtype} of shape {labels.shape}")
    if labels.size and num_classes is not None:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise DataError(f"{role} label {bad} under {dataset.label_key!r} is out of range for a model with "
                            f"{num_classes} classes (labels must lie in [0, {num_classes - 1}])")


def _num_classes(model: onnx.ModelProto, output_name: str) -> int | None:
    value = next(value for value in model.graph.output if value.name == output_name)
    dims = value.type.tensor_type.shape.dim
    return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None


def run_qat(
    qdq_model: onnx.ModelProto,
    plan,
    parameters: Mapping[str, object],
    *,
    float_model: onnx.ModelProto,
    train_data: Any,
    validation_data: Any = None,
    options: QATOptions | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    layout=None,
) -> QATResult:
    """Fine-tune the calibrated ``qdq_model`` and return it with the learned weights and scales.

    ``layout`` (a :class:`qgraph.data.DataLayout`) says where each key of the training and validation data holds
    its samples and which keys belong to inputs ``--fix-input`` removed."""
    from qgraph.data import DataLayout, batch_axes_of
    from qgraph.data.validate import input_signature, validate_dataset

    options = options or QATOptions()
    layout = layout if layout is not None else DataLayout()
    started = time.perf_counter()
    output_name = qdq_model.graph.output[0].name
    labelled = options.loss == "labels"
    if labelled:
        check_logits_output(qdq_model, output_name)
    num_classes = _num_classes(qdq_model, output_name) if labelled else None
    signature = input_signature(qdq_model)
    input_names = tuple(spec.name for spec in signature)
    datasets = []
    for role, data in (("training", train_data), ("validation", validation_data)):
        if data is None:
            datasets.append(None)
            continue
        dataset = _open(data, role, label_key=options.label_key, required_label=labelled,
                        input_names=set(input_names), layout=layout)
        dataset = validate_dataset(dataset, signature, layout=layout.for_dataset(dataset), check_values=False,
                                   cast_float64=True)
        if labelled:
            _check_labels(dataset, num_classes, role)
        datasets.append(dataset)
    teacher = Teacher(float_model, output_name, threads=options.threads) if not labelled else None
    label_key = options.label_key if labelled else None
    train_source = BatchSource(datasets[0], input_names, batch_size=options.batch_size, shuffle=True,
                               seed=options.seed, limit=options.train_samples, label_key=label_key, teacher=teacher)
    validation_source = None if datasets[1] is None else BatchSource(
        datasets[1], input_names, batch_size=options.batch_size, shuffle=False, seed=0, label_key=label_key,
        teacher=teacher)

    # Activation scales frozen from the start are constants of the graph, not parameters left out of training:
    # the fast activation quantizer's gradient needs its scale to be trained (fake_quant_graph).
    graph = build_fake_quant_graph(qdq_model, plan, parameters, float_model=float_model,
                                   learn_scales=options.learn_scales,
                                   learn_activation_scales=options.learn_scales
                                   and options.freeze_activation_scales_after != 0,
                                   scale_rate_multiplier=options.scale_rate_multiplier)
    trainable = graph.trainable
    config = TrainingConfig(
        epochs=options.epochs, batch_size=options.batch_size, learning_rate=options.learning_rate,
        optimizer="adamw", schedule=CosineSchedule(warmup_steps=options.warmup_steps), weight_decay=0.0,
        max_grad_norm=options.max_grad_norm, loss="cross_entropy" if labelled else "mse", output_name=output_name,
        trainable=trainable, seed=options.seed, threads=options.threads, steps_per_epoch=train_source.steps,
    )
    temporary = options.work_directory is None
    work = Path(tempfile.mkdtemp(prefix="qgraph-qat-")) if temporary else Path(options.work_directory)
    work.mkdir(parents=True, exist_ok=True)
    monitor = _Monitor(options, higher_is_better=labelled and validation_source is not None, forward=progress)
    trainer = Trainer(graph.model, config, work, progress=monitor, batch_axes=batch_axes_of(datasets[0]))
    monitor.trainer = trainer
    monitor.frozen_names = (graph.activation_scale_parameters if options.freeze_activation_scales_after else ())
    logger.info("QAT: %d trainable tensors, %s loss, %d epochs of %d steps, lr %g, work directory %s",
                len(trainable), config.loss, config.epochs, train_source.steps, config.learning_rate, work)
    stopped_early = False
    result = None
    try:
        result = trainer.fit(train_source, validation_source, resume_from=True if options.resume else None)
    except _EarlyStop:
        stopped_early = True
    except BaseException:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if result is not None and result.diverged:
        raise TrainingDivergedError(result.message)  # the work directory stays: it holds the best checkpoint
    if not trainer.best_checkpoint.exists():
        raise QGraphError(f"QAT wrote no best checkpoint in {work}")
    values = read_checkpoint_parameters(trainer.best_checkpoint, trainable)
    for name in set(graph.trainable) - set(values):
        values[name] = _initial_value(graph.model, name)
    exported = export_qdq(graph, values)
    before = after = None
    kept_start = False
    if options.keep_start_if_worse:
        guard_source = validation_source if validation_source is not None else train_source
        guard_batches = list(itertools.islice(guard_source(), GUARD_BATCHES))
        before = training_objective(qdq_model, output_name, guard_batches, labelled=labelled)
        after = training_objective(exported, output_name, guard_batches, labelled=labelled)
        if after > before:
            logger.warning(
                "QAT made the training objective worse (%.4g -> %.4g on %d batches); keeping the calibrated model. "
                "A smaller --lr usually helps.", before, after, len(guard_batches))
            exported, kept_start = qdq_model, True
    if temporary:
        trainer.session = None
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    epochs = [event for event in monitor.events if event.kind == "epoch"]
    logger.info("QAT finished in %.1f s: %d epochs%s, best %s %s at epoch %s", seconds, len(epochs),
                " (stopped early)" if stopped_early else "", monitor.metric_name(validation_source is not None),
                monitor.best, monitor.best_epoch)
    return QATResult(
        qdq_model=exported, graph=graph, epochs_completed=epochs[-1].epoch if epochs else 0,
        steps=epochs[-1].step if epochs else 0, metric_name=monitor.metric_name(validation_source is not None),
        best_metric=monitor.best, best_epoch=monitor.best_epoch, stopped_early=stopped_early, seconds=seconds,
        history=tuple(epochs), objective_before=before, objective_after=after, kept_start=kept_start,
    )


#: Batches on which the trained model is compared with the model QAT started from.
GUARD_BATCHES = 4


def training_objective(model: onnx.ModelProto, output_name: str, batches, *, labelled: bool) -> float:
    """The mean loss QAT minimises, measured in onnxruntime: cross-entropy against labels, or the mean squared
    distance to the FP32 model's outputs (the batches' targets) when distilling."""
    from qgraph import runtime

    session = runtime.create_session(model, optimize=True)
    total = count = 0.0
    for feeds, targets in batches:
        outputs = session.run([output_name], feeds)[0].astype(np.float64)
        if labelled:
            shifted = outputs - outputs.max(axis=1, keepdims=True)
            log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            total += -float(log_probabilities[np.arange(len(targets)), np.asarray(targets)].sum())
            count += len(targets)
        else:
            total += float(np.sum((outputs - np.asarray(targets, dtype=np.float64)) ** 2))
            count += outputs.size
    return total / max(count, 1.0)


def _initial_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    from onnx import numpy_helper

    tensor = next(tensor for tensor in model.graph.initializer if tensor.name == name)
    return numpy_helper.to_array(tensor).astype(np.float32)


class _Monitor:
    """The Trainer's progress callback: freezes activation scales, stops early, forwards events."""

    def __init__(self, options: QATOptions, *, higher_is_better: bool,
                 forward: Callable[[ProgressEvent], None] | None) -> None:
        self.options = options
        self.higher_is_better = higher_is_better
        self.forward = forward
        self.trainer: Trainer | None = None
        self.frozen_names: tuple[str, ...] = ()
        self.frozen_values: dict[str, np.ndarray] | None = None
        self.events: list[ProgressEvent] = []
        self.best: float | None = None
        self.best_epoch: int | None = None

    def metric_name(self, validated: bool) -> str:
        if not validated:
            return "train_loss"
        return "validation_accuracy" if self.options.loss == "labels" else "validation_mse"

    def __call__(self, event: ProgressEvent) -> None:
        if self.forward is not None:
            self.forward(event)
        if event.kind == "step":
            self._freeze(event.step)
            return
        self.events.append(event)
        metric = event.metric
        if metric is None:
            return
        improved = self.best is None or (metric > self.best if self.higher_is_better else metric < self.best)
        if improved:
            self.best, self.best_epoch = metric, event.epoch
        patience = self.options.patience
        if (patience is not None and self.best_epoch is not None and event.epoch - self.best_epoch >= patience
                and event.epoch < self.options.epochs):
            logger.info("early stopping after epoch %d: no improvement for %d epochs", event.epoch, patience)
            raise _EarlyStop()

    def _freeze(self, step: int) -> None:
        limit = self.options.freeze_activation_scales_after
        if not self.frozen_names or limit is None or step < limit or self.trainer is None:
            return
        parameters = self.trainer.session.state.parameters
        if self.frozen_values is None:
            self.frozen_values = {name: np.array(parameters[name].data) for name in self.frozen_names}
            logger.info("activation scales frozen after step %d", step)
            return
        for name, value in self.frozen_values.items():
            parameters[name].data = value
