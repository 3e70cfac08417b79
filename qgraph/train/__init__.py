"""Training driver over onnxruntime-training: artifacts, the training loop, checkpoints and export.

The graph to train is an input (an FP32 model now, a fake-quantized QAT graph later); see
:mod:`qgraph.train.trainer` for the loop and :mod:`qgraph.train.artifacts` for what the training graph contains.
Importing this package does not import onnxruntime's training modules; they load on first use, without torch.
"""

from qgraph.train.artifacts import TrainingArtifacts, build_training_artifacts
from qgraph.train.config import ConstantSchedule, CosineSchedule, StepSchedule, TrainingConfig
from qgraph.train.ort_training import TrainingApi, TrainingUnavailableError, training_api
from qgraph.train.trainer import (
    EpochRecord,
    EvaluationResult,
    ProgressEvent,
    Trainer,
    TrainingDivergedError,
    TrainingResult,
    TrainingStatus,
)

__all__ = [
    "ConstantSchedule",
    "CosineSchedule",
    "EpochRecord",
    "EvaluationResult",
    "ProgressEvent",
    "StepSchedule",
    "Trainer",
    "TrainingApi",
    "TrainingArtifacts",
    "TrainingConfig",
    "TrainingDivergedError",
    "TrainingResult",
    "TrainingStatus",
    "TrainingUnavailableError",
    "build_training_artifacts",
    "training_api",
]
