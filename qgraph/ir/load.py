"""Reading a model file into onnx-ir, refusing bad input with a precise message.

Order of work: the file is parsed without its external data (so models over 2 GB never pass through a single
protobuf), every external-data reference is checked to lie inside the model's folder and to exist, versions are
brought within what the installed onnxruntime executes (:func:`qgraph.ir.versions.fit_to_runtime`), shapes are
inferred where onnx can, and the proto becomes an onnx-ir model whose external tensors are memory-mapped, not read.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import onnx
import onnx.shape_inference
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qgraph.errors import ModelLoadError, UnsupportedModelError
from qgraph.ir import versions

logger = logging.getLogger(__name__)

#: Above this many bytes of inline data, shape inference goes through a file (protobuf's 2 GB limit).
_INLINE_INFERENCE_LIMIT = 1_500_000_000


def _read_proto(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except DecodeError as error:
        raise ModelLoadError(f"{path}: not an ONNX model, or the file is truncated ({error})") from None
    except Exception as error:  # onnx raises assorted errors for text or damaged files
        raise ModelLoadError(f"{path}: cannot be read as an ONNX model ({type(error).__name__}: {error})") from None
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph, IR version or opset in the file)")
    return proto


def _external_tensors(proto: onnx.ModelProto):
    def from_graph(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("g"):
                    yield from from_graph(attribute.g)
                for subgraph in attribute.graphs:
                    yield from from_graph(subgraph)

    yield from from_graph(proto.graph)
    for function in proto.functions:
        for node in function.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Each external location must be a relative path that stays inside the model's folder, and must exist."""
    base = path.parent.resolve()
    for tensor in _external_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        if not location:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} is marked external but names no location")
        if os.path.isabs(location) or Path(location).drive:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} points to external data at an absolute path ({location!r}); "
                "qgraph only reads external data inside the model's folder"
            )
        resolved = (base / location).resolve()
        if base not in resolved.parents:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} points to external data outside the model's folder "
                f"({location!r}); qgraph refuses to read it"
            )
        if not resolved.is_file():
            raise ModelLoadError(f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing")
        length = int(entries.get("length", "-1") or -1)
        offset = int(entries.get("offset", "0") or 0)
        if length >= 0 and offset + length > resolved.stat().st_size:
            raise ModelLoadError(
                f"{path}: external data file {location!r} is shorter than tensor {tensor.name!r} needs "
                f"(offset {offset} + length {length} > {resolved.stat().st_size} bytes)"
            )


def _normalize_versions(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    try:
        return versions.fit_to_runtime(proto)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"{path}: {error}") from None


#: Main-graph initializers with more elements than this go through shape inference without their bytes.
_WEIGHT_ELEMENTS = 1024


def _infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with onnx's inferred shapes, the large initializers' bytes held aside meanwhile.

    Inference reads an initializer's values only where it is a shape (Reshape's target, a Slice's bounds, …), never
    a weight's; but onnx serialises the whole model into C++ and parses the inferred one back, which on ResNet-18
    (47 MB) took 0.22 s of a 0.3 s load. Without the weights' bytes it carries kilobytes instead (0.07 s in all),
    and the bytes are put back into the returned model's initializers by name. ``proto`` is consumed: when the
    inferred model is returned, its large initializers are left without bytes.
    """
    held = {tensor.name: tensor.raw_data for tensor in proto.graph.initializer
            if tensor.HasField("raw_data") and math.prod(tensor.dims) > _WEIGHT_ELEMENTS}
    for tensor in proto.graph.initializer:
        if tensor.name in held:
            tensor.ClearField("raw_data")
    inferred = proto
    try:
        if proto.ByteSize() > _INLINE_INFERENCE_LIMIT:
            logger.info("skipping shape inference on a %d-byte inline proto", proto.ByteSize())
        else:
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as error:  # inference is a convenience; the model stays usable without it
        logger.warning("shape inference failed, continuing without it: %s", error)
    # the bytes go back into the model returned; ``proto`` itself, when another is returned, is the caller's to
    # drop (load_model's own copy) and is left without them
    for tensor in inferred.graph.initializer:
        if tensor.name in held:
            tensor.raw_data = held[tensor.name]
    return inferred


def load_model(path: str | os.PathLike, *, infer_shapes: bool = True, normalize: bool = True) -> ir.Model:
    """Load, check and normalise an ONNX model for the installed onnxruntime.

    ``normalize=False`` keeps the versions as written (for inspection); external data is checked either way.

    Raises :class:`~qgraph.errors.ModelLoadError` for unreadable files and unsafe external data, and
    :class:`~qgraph.errors.UnsupportedModelError` for operators or versions the runtime cannot execute.
    """
    path = Path(path)
    proto = _read_proto(path)
    _check_external_data(proto, path)
    if normalize:
        proto = _normalize_versions(proto, path)
    if infer_shapes:
        proto = _infer_shapes(proto)
    try:
        model = ir.serde.deserialize_model(proto)
    except ir.serde.SerdeError as error:
        root: BaseException = error
        while root.__cause__ is not None:  # onnx-ir wraps the real reason once per nesting level
            root = root.__cause__
        reason = (str(root).strip().splitlines() or [type(root).__name__])[0]
        raise UnsupportedModelError(f"{path}: qgraph cannot represent this model: {reason}") from None
    ir.external_data.set_base_dir(model.graph, os.fspath(path.parent.resolve()))
    model.meta["qgraph.source_path"] = os.fspath(path.resolve())
    logger.info("loaded %s: opset %s, %d nodes", path, model.opset_imports.get("", "?"), model.graph.num_nodes())
    return model
