"""qgraph: a graph-rewriting compiler that makes ONNX models integer — fast, small and still accurate."""

from qgraph.errors import QGraphError

__version__ = "0.1.0"

__all__ = ["QGraphError", "__version__"]
