"""qgraph's onnxruntime custom-operator library: found, loaded once for the life of the process, and named.

The fused QAT quantizer kernels (``qgraph.native._quantizer_gradient``) are built with the package where a C
compiler is available (see ``setup.py``). The library is a shared object named like a Python extension module, so
that the build places it in the package, but it holds no Python module: onnxruntime loads it through
``SessionOptions.register_custom_ops_library``.

It is also loaded here with ``ctypes`` and never unloaded: every ``register_custom_ops_library`` opens the library
once more and closes it when its options object is collected, which, with no other reference, unmapped the kernels
of sessions still running (a segmentation fault, seen in QAT).
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
    return spec.origin
