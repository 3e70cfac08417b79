"""The installed onnxruntime, and thin helpers around its inference sessions.

qgraph declares no runtime among its own dependencies: ``qgraph[cpu]`` brings the ``onnxruntime`` wheel (any release
from :data:`MINIMUM_ONNXRUNTIME`), ``qgraph[qat]`` brings onnxruntime-training-cpu 1.19.2, which installs the same
``onnxruntime`` module with the training API added (README, "Which install"). :func:`installed_onnxruntime` says which
release this process runs and refuses one older than the minimum, naming the version found and what to install; it
warns when two distributions installed the module, since each overwrites the other's files.
:func:`training_unavailable_reason` says, without importing any of the training API, why this environment cannot run
quantization-aware training and exactly what to install for it.

Tests and the ``--verify`` mode compare graphs numerically, so they need sessions with graph optimisation
disabled: otherwise onnxruntime's own fusions would hide what a pass did.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import os
import re
import sys
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from qgraph.errors import UnsupportedRuntimeError

logger = logging.getLogger(__name__)

#: The oldest onnxruntime release qgraph runs on: that of the last onnxruntime-training.
MINIMUM_ONNXRUNTIME = (1, 19)
#: Distributions that install the ``onnxruntime`` module; any two of them overwrite each other's files.
ONNXRUNTIME_DISTRIBUTIONS = (
    "onnxruntime", "onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime-gpu", "onnxruntime-openvino",
    "onnxruntime-directml", "onnxruntime-qnn",
)
#: The last onnxruntime-training release (the ``qat`` extra), and the CPython versions it has wheels for.
TRAINING_RUNTIME = "onnxruntime-training-cpu 1.19.2"
TRAINING_PYTHONS = ((3, 10), (3, 12))


@dataclasses.dataclass(frozen=True)
class OnnxruntimeInstallation:
    """The onnxruntime module this process imported: its version, (major, minor), and who installed it."""

    version: str
    release: tuple[int, int]
    distributions: tuple[str, ...]


def _installed_distributions() -> tuple[str, ...]:
    found = []
    for name in ONNXRUNTIME_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return tuple(found)


def _release(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise UnsupportedRuntimeError(f"cannot read the installed onnxruntime's version ({version!r})")
    return int(match.group(1)), int(match.group(2))


@functools.cache
def installed_onnxruntime() -> OnnxruntimeInstallation:
    """The installed onnxruntime; :class:`UnsupportedRuntimeError` if it is older than :data:`MINIMUM_ONNXRUNTIME`.

    Looked up once per process (the module cannot change under it); tests that fake a version clear the cache.
    """
    installation = OnnxruntimeInstallation(ort.__version__, _release(ort.__version__), _installed_distributions())
    if installation.release < MINIMUM_ONNXRUNTIME:
        minimum = ".".join(map(str, MINIMUM_ONNXRUNTIME))
        installed = " ".join(installation.distributions or ("onnxruntime",))
        raise UnsupportedRuntimeError(
            f"onnxruntime {installation.version} is installed, and qgraph needs onnxruntime {minimum} or newer: "
            f'pip install -U "onnxruntime>={minimum}" for post-training quantization, or, for quantization-aware '
            f'training as well, pip uninstall -y {installed} && pip install "qgraph[qat]" ({TRAINING_RUNTIME}, '
            "CPython 3.10-3.12)"
        )
    if len(installation.distributions) > 1:
        logger.warning(
            "%s all install the onnxruntime module and overwrite each other's files: keep one "
            "(pip uninstall -y %s, then reinstall the one you keep)",
            " and ".join(installation.distributions), " ".join(installation.distributions),
        )
    return installation


def training_directory() -> str | None:
    """The ``onnxruntime/training`` folder of the installed onnxruntime where it has the training API, else None.

    Only onnxruntime-training has it; the ``onnxruntime`` wheel, which post-training quantization runs on, has none.
    """
    directory = os.path.join(os.path.dirname(ort.__file__), "training")
    return directory if os.path.isfile(os.path.join(directory, "artifacts.py")) else None


def training_unavailable_reason(python_version: tuple[int, int] | None = None) -> str | None:
    """Why this environment cannot run quantization-aware training, with what to install; None where it can.

    ``python_version`` (default: this interpreter's) decides whether the reason adds that onnxruntime-training has
    no wheels for it. Imports nothing of the training API.
    """
    if training_directory() is not None:
        return None
    python_version = python_version or (sys.version_info[0], sys.version_info[1])
    installation = installed_onnxruntime()
    installed = installation.distributions or ("onnxruntime",)
    (low_major, low_minor), (high_major, high_minor) = TRAINING_PYTHONS
    reason = (
        f"quantization-aware training needs onnxruntime-training, and the installed onnxruntime "
        f"{installation.version} (from {' and '.join(installed)}) has no training API: "
        f'pip uninstall -y {" ".join(installed)} && pip install "qgraph[qat]" '
        f'(from a checkout: pip install -e ".[qat]"), which brings {TRAINING_RUNTIME} in its place, on CPython '
        f"{low_major}.{low_minor}-{high_major}.{high_minor}; post-training quantization works without it"
    )
    if not TRAINING_PYTHONS[0] <= python_version <= TRAINING_PYTHONS[1]:
        reason += (
            f"; this is CPython {python_version[0]}.{python_version[1]}, for which {TRAINING_RUNTIME} has no "
            "wheels: use an environment on one of those versions for QAT"
        )
    return reason


_ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def numpy_dtype_of(onnx_type: str) -> type:
    """The numpy dtype for an onnxruntime type string such as ``tensor(float)``."""
    if onnx_type not in _ONNX_TO_NUMPY:
        raise ValueError(f"no numpy dtype for runtime type {onnx_type}")
    return _ONNX_TO_NUMPY[onnx_type]


def create_session(
    model: onnx.ModelProto | str | os.PathLike | bytes,
    *,
    optimize: bool = False,
    threads: int | None = None,
    spinning: bool = True,
    optimized_model_path: str | os.PathLike | None = None,
    custom_operators: str | None = None,
    prepacking: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime CPU session; graph optimisation is off unless ``optimize`` is set.

    ``spinning=False`` makes onnxruntime's idle worker threads sleep at once instead of spinning for work, for a
    session that alternates with other CPU work of this process (calibration's observers).
    ``optimized_model_path``: where onnxruntime writes the model as it optimised it.
    ``custom_operators``: the path of a custom-operator library the model uses (see :mod:`qgraph.native`).
    ``prepacking=False``: constant weights stay as loaded (memory-mapped external data is not copied into packed
    buffers), for a session run a few times on a model larger than memory should hold twice.
    """
    installed_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_model_path is not None:
        options.optimized_model_filepath = os.fspath(optimized_model_path)
    if custom_operators is not None:
        options.register_custom_ops_library(custom_operators)
    if not prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def random_inputs(session: ort.InferenceSession, *, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Seeded inputs that match a session's input signature; symbolic dimensions become ``batch``."""
    generator = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for model_input in session.get_inputs():
        shape = [dim if isinstance(dim, int) and dim > 0 else batch for dim in model_input.shape]
        dtype = numpy_dtype_of(model_input.type)
        if np.issubdtype(dtype, np.floating):
            feeds[model_input.name] = generator.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[model_input.name] = generator.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[model_input.name] = generator.integers(0, 4, shape).astype(dtype)
    return feeds


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a session and return its outputs by name."""
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))
