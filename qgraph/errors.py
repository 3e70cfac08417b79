"""Error types that separate a user's mistake from a bug in qgraph.

Every error a user can cause (a corrupt file, an unsupported operator, mismatched calibration data) is a
:class:`QGraphError`: the command line prints its one-line message and exits with status 2. Anything else that
escapes is an internal failure: status 1, with the traceback kept for the bug report.
"""

from __future__ import annotations


class QGraphError(Exception):
    """A problem with the user's input that qgraph refuses with a clear message (CLI exit status 2)."""


class ModelLoadError(QGraphError):
    """The model file is missing, not ONNX, truncated, or refers to data it must not read."""


class UnsupportedModelError(QGraphError):
    """The model is valid ONNX but uses something the installed runtime or a pass cannot handle."""


class OutputPathError(QGraphError):
    """The output path would overwrite the input or cannot be written."""


class DataError(QGraphError):
    """Calibration, training or evaluation data does not match the model or holds invalid values."""


class PipelineError(QGraphError):
    """A pass pipeline was assembled wrongly (unknown pass, phases out of order)."""


class RuntimeNotInstalledError(QGraphError, ImportError):
    """No ``onnxruntime`` module is installed: qgraph's runtime comes with the ``cpu`` or the ``qat`` extra."""


class UnsupportedRuntimeError(QGraphError):
    """The installed onnxruntime is older than qgraph supports, or cannot do what was asked (train, for QAT)."""


def require_at_least(name: str, value: float, minimum: float) -> None:
    """Refuse an option ``name`` whose ``value`` is below ``minimum``, naming both."""
    if value < minimum:
        raise QGraphError(f"{name} must be at least {minimum}, got {value}")
