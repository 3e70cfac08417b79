"""qgraph's pass library (installed as ``qgraph.passes``): one pass per module, named after its class.

The folders follow the pipeline: :mod:`.canonicalize` (FP32 graph clean-up and fusions), :mod:`.quantize` (writing the
Q/DQ contract of ``docs/qdq-format.md``) and :mod:`.lower` (Q/DQ to onnxruntime's integer operators);
:mod:`.infrastructure` holds what they stand on (phases, base classes, registry, pass manager, verifier).

Every pass is an onnx-ir ``InPlacePass``, so it also runs inside any onnx-ir ``PassManager`` (onnxscript, Olive, …)
without the rest of qgraph. Importing this package imports every pass module, which registers it by class name;
discovery is by module listing, so adding a pass is adding its file (a module whose name starts with ``_`` holds
helpers, not a pass).
"""

import importlib
import pkgutil

from qgraph.passes.infrastructure import QGraphPass, RewritePass

for _group in ("canonicalize", "quantize", "lower"):
    _package = importlib.import_module(f"{__name__}.{_group}")
    for _module in pkgutil.iter_modules(_package.__path__):
        if not _module.name.startswith("_"):
            importlib.import_module(f"{_package.__name__}.{_module.name}")

__all__ = ["QGraphPass", "RewritePass"]
