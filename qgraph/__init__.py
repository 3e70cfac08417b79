"""qgraph: a graph-rewriting compiler that makes ONNX models integer — fast, small and still accurate.

qgraph runs on the onnxruntime the environment has and declares none among its own dependencies, so that installing
it never replaces the runtime a user deploys (README, "Which install"). Importing qgraph without any is refused here,
before a module fails on ``import onnxruntime``; the version is checked by :func:`qgraph.runtime.installed_onnxruntime`.
"""

import importlib.util

from qgraph.errors import QGraphError, RuntimeNotInstalledError

__version__ = "0.1.0"

if importlib.util.find_spec("onnxruntime") is None:
    raise RuntimeNotInstalledError(
        "qgraph needs onnxruntime 1.19 or newer, and none is installed: "
        'pip install "qgraph[cpu]" (post-training quantization, any onnxruntime release from 1.19), or '
        'pip install "qgraph[qat]" (quantization-aware training as well: onnxruntime-training-cpu 1.19.2, '
        'CPython 3.10-3.12); from a checkout, pip install -e ".[cpu]" or -e ".[qat]"'
    )

__all__ = ["QGraphError", "__version__"]
