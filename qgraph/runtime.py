"""Thin helpers around onnxruntime inference sessions.

Tests and the ``--verify`` mode compare graphs numerically, so they need sessions with graph optimisation
disabled: otherwise onnxruntime's own fusions would hide what a pass did.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort

logger = logging.getLogger(__name__)

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
) -> ort.InferenceSession:
    """An onnxruntime CPU session; graph optimisation is off unless ``optimize`` is set.

    ``spinning=False`` makes onnxruntime's idle worker threads sleep at once instead of spinning for work, for a
    session that alternates with other CPU work of this process (calibration's observers).
    ``optimized_model_path``: where onnxruntime writes the model as it optimised it.
    ``custom_operators``: the path of a custom-operator library the model uses (see :mod:`qgraph.native`).
    """
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
