"""The training loop: epochs of batches, learning-rate schedule, validation, best/last checkpoints, export.

:class:`Trainer` takes the graph to train as an ``onnx.ModelProto`` (an FP32 model today, a fake-quantized QAT graph
later) and a :class:`~qgraph.train.config.TrainingConfig`. It builds the artifacts in ``work_directory/artifacts``
and keeps two checkpoints in ``work_directory/checkpoints``:

- ``last``: written after every completed epoch (parameters, optimizer state, counters) — what a resume loads;
- ``best``: written when the validation metric improves — top-1 accuracy for cross-entropy (higher is better),
  validation loss for MSE (lower is better); without validation data the epoch's mean training loss decides.

Each step: ``lr = schedule(step)``, forward + backward in training mode, a non-finite loss stops the run (the
parameters of that step are not updated, no checkpoint is overwritten, the result says ``DIVERGED`` and where the
best checkpoint is), else the optimizer step. Progress goes to ``logging`` (every ``log_every_steps`` steps and
every epoch) and, when given, to a callback receiving :class:`ProgressEvent` after every step and every epoch.

A resume (``fit(..., resume_from=...)``) loads a checkpoint and its ``qgraph.*`` properties: epochs done, global
step, best metric and epoch; the schedule continues from the global step and the next epoch starts.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qgraph.errors import DataError, QGraphError
from qgraph.train.artifacts import TrainingArtifacts, build_training_artifacts
from qgraph.train.batches import (
    BatchChecker,
    check_source,
    checked_batches,
    count_batches,
    is_one_shot,
    steps_per_epoch,
)
from qgraph.train.config import ConstantSchedule, TrainingConfig
from qgraph.train.session import TrainingSession

logger = logging.getLogger(__name__)


class TrainingStatus(enum.Enum):
    COMPLETED = "completed"
    DIVERGED = "diverged"


class TrainingDivergedError(QGraphError):
    """The loss became NaN or infinite; the best checkpoint written before is kept."""


@dataclass(frozen=True)
class ProgressEvent:
    """What the progress callback receives: ``kind`` is ``"step"`` or ``"epoch"``; ``epoch`` counts from 1, ``step`` is
    the global number of optimizer steps done; ``samples_per_second`` covers the epoch's training steps so far."""

    kind: str
    epoch: int
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    samples_per_second: float
    metric_name: str | None = None
    metric: float | None = None


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    validation_loss: float | None
    validation_accuracy: float | None
    samples_per_second: float


@dataclass(frozen=True)
class EvaluationResult:
    loss: float
    accuracy: float | None
    samples: int


@dataclass(frozen=True)
class TrainingResult:
    status: TrainingStatus
    message: str
    epochs_completed: int
    steps: int
    history: tuple[EpochRecord, ...]
    metric_name: str
    best_metric: float | None
    best_epoch: int | None
    best_checkpoint: Path | None
    last_checkpoint: Path | None

    @property
    def diverged(self) -> bool:
        return self.status is TrainingStatus.DIVERGED

    def raise_for_status(self) -> TrainingResult:
        """Raise :class:`TrainingDivergedError` if the run diverged, else return self."""
        if self.diverged:
            raise TrainingDivergedError(self.message)
        return self


ProgressCallback = Callable[[ProgressEvent], None]


class Trainer:
    """Trains ``model`` with onnxruntime-training; see the module docstring for the loop."""

    def __init__(
        self,
        model: onnx.ModelProto,
        config: TrainingConfig,
        work_directory: str | os.PathLike,
        *,
        progress: ProgressCallback | None = None,
        batch_axes: Mapping[str, int | None] | None = None,
    ) -> None:
        """``batch_axes``: input name -> the axis holding a batch's samples, for sources that are not a Dataset
        (a Dataset's own axes count its batches; see :mod:`qgraph.train.batches`)."""
        self.config = config
        self.work_directory = Path(work_directory)
        self.progress = progress
        self.artifacts: TrainingArtifacts = build_training_artifacts(model, self.work_directory / "artifacts", config)
        self.checker = BatchChecker(
            tuple(name for name in self.artifacts.input_names if name != self.artifacts.target_input_name),
            loss=config.loss, num_classes=self.artifacts.num_classes, batch_axes=batch_axes,
        )
        self.session: TrainingSession | None = None

    @property
    def best_checkpoint(self) -> Path:
        return self.work_directory / "checkpoints" / "best"

    @property
    def last_checkpoint(self) -> Path:
        return self.work_directory / "checkpoints" / "last"

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.config.loss == "cross_entropy" else "loss"

    def _session(self) -> TrainingSession:
        if self.session is None:
            self.session = TrainingSession(self.artifacts, self.config, self.artifacts.checkpoint)
        return self.session

    # -- evaluation -----------------------------------------------------------------------------------------------

    def _check_label_range(self, targets: np.ndarray, output: np.ndarray) -> None:
        if self.config.loss != "cross_entropy":
            return
        if output.ndim != 2:
            raise DataError(f"the cross_entropy loss expects 2-D logits, but the model output has shape {output.shape}")
        if self.checker.num_classes is None:
            self.checker.num_classes = int(output.shape[-1])
        if targets.size and int(targets.max()) >= output.shape[-1]:
            raise DataError(
                f"label {int(targets.max())} is out of range for a model with {output.shape[-1]} classes "
                "(the logits' last dimension)"
            )

    def evaluate(self, data: Any) -> EvaluationResult:
        """Mean loss and (for cross-entropy) top-1 accuracy of the current parameters in eval mode."""
        session = self._session()
        check_source(data, epochs=1, role="validation")
        loss_sum, correct, samples = 0.0, 0, 0
        for feeds, targets in checked_batches(data, self.checker, batch_size=self.config.batch_size, shuffle=False,
                                              seed=0, role="validation"):
            loss, output = session.evaluate(feeds, targets)
            self._check_label_range(targets, output)
            count = int(targets.shape[0])
            loss_sum += loss * count
            samples += count
            if self.config.loss == "cross_entropy":
                correct += int(np.count_nonzero(np.argmax(output, axis=-1) == targets))
        accuracy = correct / samples if self.config.loss == "cross_entropy" and samples else None
        return EvaluationResult(loss=loss_sum / max(samples, 1), accuracy=accuracy, samples=samples)

    def predict(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The trained output for one batch in eval mode (dummy targets feed the loss, which is ignored)."""
        session = self._session()
        samples = self.checker.batch_size({name: np.asarray(feeds[name]) for name in self.checker.input_names}) or 1
        if self.config.loss == "cross_entropy":
            targets = np.zeros(samples, dtype=np.int64)
        else:
            shape = [samples] + [d if isinstance(d, int) else None for d in self.artifacts.output_shape[1:]]
            if any(d is None for d in shape):
                raise QGraphError("predict needs a static output shape for the mse loss")
            targets = np.zeros(shape, dtype=np.float32)
        return session.evaluate(feeds, targets)[1]

    # -- the loop -------------------------------------------------------------------------------------------------

    def _emit(self, event: ProgressEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def _resume(self, resume_from: str | os.PathLike | bool | None) -> TrainingSession:
        if resume_from is None or resume_from is False:
            self.session = None
            return self._session()
        path = self.last_checkpoint if resume_from is True else Path(resume_from)
        if not path.exists():
            raise QGraphError(f"cannot resume: no checkpoint at {path}")
        self.session = TrainingSession(self.artifacts, self.config, path)
        logger.info("resuming from %s at epoch %d, step %d", path, self.session.get_property("epoch", 0),
                    self.session.get_property("step", 0))
        return self.session

    def fit(
        self, train_data: Any, validation_data: Any = None, *, resume_from: str | os.PathLike | bool | None = None
    ) -> TrainingResult:
        """Train for ``config.epochs`` epochs (minus those a resumed checkpoint already did)."""
        config = self.config
        check_source(train_data, epochs=config.epochs, role="training")
        if validation_data is not None:
            check_source(validation_data, epochs=config.epochs, role="validation")
        session = self._resume(resume_from)
        start_epoch = int(session.get_property("epoch", 0))
        step = int(session.get_property("step", 0))
        best_epoch = int(session.get_property("best_epoch", -1))
        best_metric = float(session.get_property("best_metric", math.nan)) if best_epoch >= 0 else None
        per_epoch = self._steps_per_epoch(train_data)
        total_steps = per_epoch * config.epochs
        higher_is_better = config.loss == "cross_entropy" and validation_data is not None
        metric_name = ("validation_" + self.metric_name) if validation_data is not None else "train_loss"
        history: list[EpochRecord] = []
        status, message = TrainingStatus.COMPLETED, ""
        last_saved: Path | None = self.last_checkpoint if start_epoch > 0 else None

        for epoch in range(start_epoch, config.epochs):
            started, samples, loss_sum = time.perf_counter(), 0, 0.0
            for feeds, targets in checked_batches(train_data, self.checker, batch_size=config.batch_size,
                                                  shuffle=config.shuffle, seed=config.seed + epoch, role="training"):
                learning_rate = config.schedule.learning_rate(config.learning_rate, step, total_steps, per_epoch)
                loss, output = session.forward_backward(feeds, targets)
                self._check_label_range(targets, output)
                if not math.isfinite(loss):
                    session.discard_gradients()
                    status = TrainingStatus.DIVERGED
                    message = self._divergence_message(epoch, step, f"the loss is {loss}", best_epoch, best_metric,
                                                       metric_name)
                    break
                session.update(learning_rate)
                if not session.parameters_are_finite():
                    status = TrainingStatus.DIVERGED
                    message = self._divergence_message(epoch, step, "the update made weights non-finite",
                                                       best_epoch, best_metric, metric_name)
                    break
                step += 1
                count = int(targets.shape[0])
                samples += count
                loss_sum += loss * count
                rate = samples / max(time.perf_counter() - started, 1e-9)
                self._emit(ProgressEvent("step", epoch + 1, step, total_steps, loss, learning_rate, rate))
                if config.log_every_steps and step % config.log_every_steps == 0:
                    logger.info("epoch %d step %d/%d loss %.4f lr %.3g %.1f samples/s", epoch + 1, step,
                                total_steps, loss, learning_rate, rate)
            if status is TrainingStatus.DIVERGED:
                break
            rate = samples / max(time.perf_counter() - started, 1e-9)
            train_loss = loss_sum / max(samples, 1)
            evaluation = self.evaluate(validation_data) if validation_data is not None else None
            if evaluation is not None and not math.isfinite(evaluation.loss):
                status = TrainingStatus.DIVERGED
                message = self._divergence_message(epoch, step, f"the loss is {evaluation.loss}", best_epoch,
                                                   best_metric, metric_name)
                break
            if evaluation is None:
                metric = train_loss
            else:
                metric = evaluation.accuracy if higher_is_better else evaluation.loss
            improved = best_metric is None or (metric > best_metric if higher_is_better else metric < best_metric)
            if improved:
                best_metric, best_epoch = metric, epoch
            session.set_property("epoch", epoch + 1)
            session.set_property("step", step)
            session.set_property("best_epoch", best_epoch)
            session.set_property("best_metric", float(best_metric))
            last_saved = session.save(self.last_checkpoint)
            if improved:
                session.save(self.best_checkpoint)
            record = EpochRecord(epoch + 1, train_loss, evaluation.loss if evaluation else None,
                                 evaluation.accuracy if evaluation else None, rate)
            history.append(record)
            logger.info("epoch %d/%d: train loss %.4f, %s %.4f%s, %.1f samples/s", epoch + 1, config.epochs,
                        train_loss, metric_name, metric, " (best)" if improved else "", rate)
            self._emit(ProgressEvent("epoch", epoch + 1, step, total_steps, train_loss,
                                     session.optimizer.get_learning_rate(), rate, metric_name, metric))

        if status is TrainingStatus.DIVERGED:
            logger.error("%s", message)
        else:
            best = "none" if best_metric is None else f"{best_metric:.4f}"
            message = f"trained {config.epochs} epochs ({step} steps); best {metric_name} {best}"
        return TrainingResult(
            status=status, message=message, epochs_completed=int(session.get_property("epoch", 0)), steps=step,
            history=tuple(history), metric_name=metric_name, best_metric=best_metric,
            best_epoch=None if best_epoch < 0 else best_epoch + 1,
            best_checkpoint=self.best_checkpoint if self.best_checkpoint.exists() else None,
            last_checkpoint=last_saved,
        )

    def _steps_per_epoch(self, data: Any) -> int:
        config = self.config
        per_epoch = config.steps_per_epoch or steps_per_epoch(data, config.batch_size)
        if per_epoch is None and is_one_shot(data):
            if not isinstance(config.schedule, ConstantSchedule):
                raise QGraphError(
                    "a one-shot iterator cannot tell the learning-rate schedule how many steps an epoch has; "
                    "set TrainingConfig.steps_per_epoch or pass a list or a callable"
                )
            return 1  # unused by a constant schedule
        if per_epoch is None:
            per_epoch = count_batches(data, batch_size=config.batch_size)
        if per_epoch == 0:
            raise DataError("the training data yielded no batches (empty dataset)")
        return per_epoch

    def _divergence_message(self, epoch: int, step: int, cause: str, best_epoch: int, best_metric: float | None,
                            metric_name: str) -> str:
        kept = (f"the best checkpoint (epoch {best_epoch + 1}, {metric_name} {best_metric:.4f}) is kept at "
                f"{self.best_checkpoint}" if best_epoch >= 0 else "no checkpoint was written before")
        return (f"training diverged at epoch {epoch + 1}, step {step + 1}: {cause}; training stopped and "
                f"{kept}; lower the learning rate or the max_grad_norm, and check the data for NaN/Inf")

    # -- export ---------------------------------------------------------------------------------------------------

    def export(self, path: str | os.PathLike, *, checkpoint: str = "best") -> Path:
        """Export an inference model from the ``"best"`` or ``"last"`` checkpoint, or the ``"current"`` state."""
        if checkpoint == "current":
            return self._session().export(path)
        source = {"best": self.best_checkpoint, "last": self.last_checkpoint}.get(checkpoint)
        if source is None:
            raise QGraphError(f"checkpoint must be 'best', 'last' or 'current', got {checkpoint!r}")
        if not source.exists():
            raise QGraphError(f"no {checkpoint} checkpoint at {source}; train first")
        return TrainingSession(self.artifacts, self.config, source).export(path)
