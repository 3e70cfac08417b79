"""Options of quantization-aware training (frozen dataclasses; every field has a usable default).

The learning rate defaults to ``1e-4``: a tenth of the FP32 AdamW rate the reference models train with (``1e-3``),
because QAT fine-tunes a network that is already good and the rounding makes large steps noisy. Scales are
parametrised in log space (see :mod:`qgraph.qat.fake_quant_graph`), so ``scale_rate_multiplier`` ``k`` turns
an AdamW step of about ``lr`` on the parameter into a relative change of about ``k · lr`` of the scale.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from qgraph.errors import QGraphError

LOSS_CHOICES = ("labels", "distill")


@dataclass(frozen=True)
class QATOptions:
    """What a QAT fine-tuning run does.

    ``loss``: ``"labels"`` (cross-entropy of the logits against integer labels under ``label_key`` in the training
    data) or ``"distill"`` (mean squared error between the quantized model's outputs and the FP32 model's outputs on
    the same inputs; no labels needed).
    ``learn_scales``: activation and weight scales are trainable (LSQ); ``False`` keeps the calibrated scales.
    ``freeze_activation_scales_after``: stop updating activation scales after this many optimizer steps (``None``:
    never). ``patience``: stop when the validation metric has not improved for this many epochs (``None``: never).
    ``work_directory``: where artifacts and checkpoints go (``None``: a temporary folder, removed after a successful
    run and kept after a divergence so the best checkpoint survives). ``resume``: continue from the last checkpoint
    in ``work_directory``.
    """

    loss: str = "labels"
    label_key: str = "label"
    epochs: int = 3
    batch_size: int = 64
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    max_grad_norm: float | None = 5.0
    learn_scales: bool = True
    scale_rate_multiplier: float = 10.0
    freeze_activation_scales_after: int | None = None
    patience: int | None = 2
    threads: int | None = None
    seed: int = 0
    work_directory: str | os.PathLike | None = None
    resume: bool = False
    #: After training, compare the trained model with the calibrated model it started from on the training
    #: objective; if training made it worse (a learning rate too high, say), return the starting model.
    keep_start_if_worse: bool = True
    #: Use at most this many training samples per epoch (``None``: all).
    train_samples: int | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSS_CHOICES:
            raise QGraphError(f"QAT loss must be one of {', '.join(LOSS_CHOICES)}, got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise QGraphError("QAT needs epochs >= 1 and batch_size >= 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise QGraphError(f"QAT learning rate must be positive and finite, got {self.learning_rate}")
        if not (self.scale_rate_multiplier > 0 and math.isfinite(self.scale_rate_multiplier)):
            raise QGraphError(f"scale_rate_multiplier must be positive, got {self.scale_rate_multiplier}")
        if self.freeze_activation_scales_after is not None and self.freeze_activation_scales_after < 0:
            raise QGraphError("freeze_activation_scales_after must be >= 0 or None")
        if self.patience is not None and self.patience < 1:
            raise QGraphError("patience must be >= 1 or None")
        if self.resume and self.work_directory is None:
            raise QGraphError("resuming QAT needs the work directory of the interrupted run")
        if self.train_samples is not None and self.train_samples < 1:
            raise QGraphError("train_samples must be >= 1 or None")
