"""Loading, normalising and saving models, and analysis views of the in-memory graph (onnx-ir)."""

from qgraph.ir.load import load_model
from qgraph.ir.save import save_model
from qgraph.ir.versions import MAX_IR_VERSION, MAX_OPSET, SUPPORTED_DOMAINS, convert_opset

__all__ = ["MAX_IR_VERSION", "MAX_OPSET", "SUPPORTED_DOMAINS", "convert_opset", "load_model", "save_model"]
