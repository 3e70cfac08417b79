"""Training configuration: frozen dataclasses for the loss, the optimizer and the learning-rate schedule.

A schedule maps the global optimizer step (0-based) to a learning rate; the trainer calls
``optimizer.set_learning_rate`` with it before every step, so the schedule is pure Python and survives a resume
(the step counter is stored in the checkpoint).

- :class:`ConstantSchedule`: ``lr(t) = lr0``.
- :class:`CosineSchedule`: linear warm-up ``lr(t) = lr0 · (t + 1) / W`` for ``t < W``, then
  ``lr(t) = lr_min + (lr0 - lr_min) · (1 + cos(π · p)) / 2`` with ``p = (t - W) / max(1, T - W)`` clamped to [0, 1],
  ``lr_min = minimum_ratio · lr0`` and ``T`` the total number of steps of the run.
- :class:`StepSchedule`: ``lr(t) = lr0 · gamma ^ floor(epoch(t) / step_epochs)`` where ``epoch(t)`` is the epoch the
  step belongs to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from qgraph.errors import QGraphError

LossKind = Literal["cross_entropy", "mse"]
OptimizerKind = Literal["adamw", "sgd"]


@dataclass(frozen=True)
class ConstantSchedule:
    """The same learning rate for every step."""

    def learning_rate(self, base: float, step: int, total_steps: int, steps_per_epoch: int) -> float:
        return base


@dataclass(frozen=True)
class CosineSchedule:
    """Cosine decay from the base rate to ``minimum_ratio`` × base, after ``warmup_steps`` of linear warm-up."""

    warmup_steps: int = 0
    minimum_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or not 0.0 <= self.minimum_ratio <= 1.0:
            raise QGraphError("CosineSchedule needs warmup_steps >= 0 and 0 <= minimum_ratio <= 1")

    def learning_rate(self, base: float, step: int, total_steps: int, steps_per_epoch: int) -> float:
        if step < self.warmup_steps:
            return base * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        minimum = self.minimum_ratio * base
        return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StepSchedule:
    """Multiply the learning rate by ``gamma`` every ``step_epochs`` epochs."""

    step_epochs: int = 1
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.step_epochs < 1 or not self.gamma > 0.0:
            raise QGraphError("StepSchedule needs step_epochs >= 1 and gamma > 0")

    def learning_rate(self, base: float, step: int, total_steps: int, steps_per_epoch: int) -> float:
        epoch = step // max(1, steps_per_epoch)
        return base * self.gamma ** (epoch // self.step_epochs)


Schedule = ConstantSchedule | CosineSchedule | StepSchedule


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides what a training run computes.

    ``optimizer``: ``"adamw"`` (onnxruntime's AdamWOptimizer, decoupled weight decay, bias correction) or ``"sgd"``.
    SGD runs in onnxruntime's SGDOptimizerV2 when ``momentum == 0`` and ``weight_decay == 0``; onnxruntime offers
    neither momentum nor weight decay for SGD, so otherwise the update runs in numpy on the host (see
    :mod:`qgraph.train.host_sgd`). ``max_grad_norm`` clips the global L2 norm of the gradients (``None`` or 0: off).
    ``loss``: ``"cross_entropy"`` over 2-D logits with int64 labels, or ``"mse"`` against a target tensor of the
    output's shape. ``trainable``: initializer names that receive gradients (default: every float initializer except
    BatchNormalization running statistics). ``output_name``: the model output the loss reads (default: the first).
    ``threads``: intra-op threads of the training sessions (``None``: onnxruntime's default).
    ``steps_per_epoch``: batches per epoch, for sources that cannot tell (a callable is otherwise read once more to
    count them; a one-shot iterator needs it unless the schedule is constant). ``fused_gradients``: compute each
    learnable activation quantizer's gradient with qgraph's one-pass kernel where it was built
    (:mod:`qgraph.train.fused_gradients`; off: onnxruntime's nine kernels, same values).
    """

    epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: OptimizerKind = "adamw"
    schedule: Schedule = field(default_factory=ConstantSchedule)
    weight_decay: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    epsilon: float = 1e-8
    max_grad_norm: float | None = 5.0
    loss: LossKind = "cross_entropy"
    output_name: str | None = None
    trainable: tuple[str, ...] | None = None
    seed: int = 0
    shuffle: bool = True
    threads: int | None = None
    log_every_steps: int = 50
    steps_per_epoch: int | None = None
    fused_gradients: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise QGraphError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise QGraphError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.learning_rate > 0.0 and math.isfinite(self.learning_rate)):
            raise QGraphError(f"learning_rate must be a positive finite number, got {self.learning_rate}")
        if self.optimizer not in ("adamw", "sgd"):
            raise QGraphError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.loss not in ("cross_entropy", "mse"):
            raise QGraphError(f"loss must be 'cross_entropy' or 'mse', got {self.loss!r}")
        if self.weight_decay < 0.0 or not 0.0 <= self.momentum < 1.0:
            raise QGraphError("weight_decay must be >= 0 and momentum in [0, 1)")
        if self.max_grad_norm is not None and self.max_grad_norm < 0.0:
            raise QGraphError(f"max_grad_norm must be >= 0 or None, got {self.max_grad_norm}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise QGraphError(f"steps_per_epoch must be >= 1 or None, got {self.steps_per_epoch}")
        if self.trainable is not None and not isinstance(self.trainable, tuple):
            object.__setattr__(self, "trainable", tuple(self.trainable))

    @property
    def clips_gradients(self) -> bool:
        return self.max_grad_norm is not None and self.max_grad_norm > 0.0

    @property
    def uses_host_sgd(self) -> bool:
        """Whether SGD needs the numpy update (momentum or weight decay, which onnxruntime's SGD lacks)."""
        return self.optimizer == "sgd" and (self.momentum > 0.0 or self.weight_decay > 0.0)
