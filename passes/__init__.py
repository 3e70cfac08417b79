"""qgraph's pass library (installed as ``qgraph.passes``): one pass per module, named after its class.

Every pass is an onnx-ir ``InPlacePass``, so it also runs inside any onnx-ir ``PassManager`` (onnxscript, Olive, …)
without the rest of qgraph. Importing this package registers the passes with :mod:`qgraph.pipeline.registry`.
"""

from qgraph.passes.base import QGraphPass, RewritePass, iterate_graphs

__all__ = ["QGraphPass", "RewritePass", "iterate_graphs"]
