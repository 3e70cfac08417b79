"""What the bundled runtime can execute, and conversion of a model towards it.

onnxruntime-training 1.19.2 loads IR versions up to 10 and the default-domain opset up to 21. A model written for a
newer opset is converted down with onnx's version converter when every operator has an adapter; otherwise it is
refused with the converter's reason. Only the operator domains below exist in that runtime; a domain that a model
defines as local functions is fine too, since onnxruntime inlines them.
"""

from __future__ import annotations

import logging

import onnx
import onnx.shape_inference
import onnx.version_converter

from qgraph.errors import UnsupportedModelError
from qgraph.ir.values import default_opset

logger = logging.getLogger(__name__)

MAX_IR_VERSION = 10
MAX_OPSET = 21
#: Above this many bytes the converted model is not re-checked by strict shape inference (protobuf's 2 GB limit).
_STRICT_INFERENCE_LIMIT = 1_500_000_000
SUPPORTED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.training", "ai.onnx.preview.training"})


def convert_opset(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model converted to default-domain opset ``target``; a refusal names the operator that blocks it."""
    current = default_opset(proto)
    if current == target:
        return proto
    logger.info("converting opset %d -> %d", current, target)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as error:  # the converter raises bare RuntimeError/ValueError with its reason
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsupportedModelError(
            f"cannot convert the model from opset {current} to opset {target}: {reason}"
        ) from error
    conflict = _conversion_shape_conflict(proto, converted)
    if conflict is not None:
        raise UnsupportedModelError(
            f"cannot convert the model from opset {current} to opset {target} without changing it: {conflict}"
        )
    return converted


def _strict_inference_error(proto: onnx.ModelProto) -> str | None:
    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else "shape inference failed"
    except Exception:  # other failures (size, unsupported constructs) say nothing about the conversion
        return None
    return None


def _conversion_shape_conflict(original: onnx.ModelProto, converted: onnx.ModelProto) -> str | None:
    """Why the converted model contradicts shapes the original declares, if it does and the original did not.

    The converter keeps an operator whose semantics changed between the opsets (MaxPool's ceil_mode output size
    changed in opset 22, for one) as it is; shape inference at the lower opset then disagrees with the shapes the
    model declares, which would be a different model, silently.
    """
    if original.ByteSize() > _STRICT_INFERENCE_LIMIT:
        return None
    after = _strict_inference_error(converted)
    if after is None:
        return None
    return after if _strict_inference_error(original) is None else None


def check_runtime_support(proto: onnx.ModelProto) -> None:
    """Refuse operators whose domain or version the bundled runtime cannot execute."""
    local_domains = {function.domain for function in proto.functions}
    opsets = {entry.domain or "": entry.version for entry in proto.opset_import}

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = node.domain or ""
            if domain in local_domains:
                pass
            elif domain not in SUPPORTED_DOMAINS:
                raise UnsupportedModelError(
                    f"node {node.name or node.op_type!r} uses operator {node.op_type} from domain {domain!r}, "
                    "which onnxruntime cannot run (supported domains: ai.onnx, ai.onnx.ml, com.microsoft)"
                )
            elif domain in ("", "ai.onnx"):
                version = opsets.get(domain, opsets.get("ai.onnx" if domain == "" else "", 0))
                try:
                    onnx.defs.get_schema(node.op_type, version, "")
                except onnx.defs.SchemaError:
                    raise UnsupportedModelError(
                        f"node {node.name or node.op_type!r}: operator {node.op_type} does not exist in "
                        f"ONNX opset {version}"
                    ) from None
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                for subgraph in attribute.graphs:
                    visit(subgraph)

    visit(proto.graph)
