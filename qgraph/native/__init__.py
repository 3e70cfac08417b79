"""qgraph's onnxruntime custom-operator library: found, loaded once for the life of the process, and named.

The fused QAT quantizer kernels (``qgraph.native._quantizer_gradient``) are built with the package where a C
compiler is available (see ``setup.py``). The library is a shared object named like a Python extension module, so
that the build places it in the package, but it holds no Python module: onnxruntime loads it through
``SessionOptions.register_custom_ops_library``.

It is also loaded here with ``ctypes`` and never unloaded: every ``register_custom_ops_library`` opens the library
once more and closes it when its options object is collected, which, with no other reference, unmapped the kernels
of sessions still running (a segmentation fault, seen in QAT).

The libraries use onnxruntime's C API at version 13 through its function table, to which each release only appends
(``ort_custom_op.h``), so one build serves every supported onnxruntime, the training release 1.19.2 and the latest
plain one alike. Each is registered once into a session options object of the installed onnxruntime before it is
handed out: a runtime that refuses it (an ABI it no longer serves) gets None, and the callers fall back to
onnxruntime's own kernels or the numpy observers, with the same results, slower.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os

logger = logging.getLogger(__name__)

_loaded: list[ctypes.CDLL] = []


@functools.cache
def custom_operator_library(module: str) -> str | None:
    """The path of the built library ``module`` (a dotted name), loaded for good; None where it was not built."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return None
    if spec is None or spec.origin is None or not os.path.isfile(spec.origin):
        return None
    try:
        _loaded.append(ctypes.CDLL(spec.origin))
    except OSError as error:
        logger.warning("qgraph's custom-operator library %s did not load (%s): onnxruntime's kernels are used",
                       spec.origin, error)
        return None
    import onnxruntime

    try:
        onnxruntime.SessionOptions().register_custom_ops_library(spec.origin)
    except Exception as error:  # onnxruntime raises its own exception types, one per status code
        logger.warning("onnxruntime %s refused qgraph's custom-operator library %s (%s): onnxruntime's kernels are "
                       "used", onnxruntime.__version__, spec.origin, error)
        return None
    return spec.origin
