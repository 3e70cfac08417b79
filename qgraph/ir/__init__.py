"""Loading, normalising and saving models, and analysis views of the in-memory graph (onnx-ir).

Also the one vocabulary that passes and graph builders ask their questions in, each answered once:
:mod:`~qgraph.ir.values` (constants, sole consumers, operators, opsets, static shapes), :mod:`~qgraph.ir.naming`
(fresh model-wide names), :mod:`~qgraph.ir.edit` (new and dropped initializers, released captures) and
:mod:`~qgraph.ir.traversal` (graphs, bodies, branches, defined and captured values).
"""

from qgraph.ir.load import load_model
from qgraph.ir.save import save_model
from qgraph.ir.versions import SUPPORTED_DOMAINS, SupportedVersions, convert_opset, supported_versions

__all__ = [
    "SUPPORTED_DOMAINS", "SupportedVersions", "convert_opset", "load_model", "save_model", "supported_versions",
]
