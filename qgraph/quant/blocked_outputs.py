"""Probe sessions that return convolution activations in onnxruntime's blocked layout, without reordering them.

Facts (onnxruntime CPU, graph optimisation ``ORT_ENABLE_ALL``):

* The NchwcTransformer runs 2-D convolutions, pooling and their element-wise neighbours in the NCHWc layout: channel
  ``c`` of a tensor with ``C`` channels is stored in block ``c // b``, lane ``c % b``, where ``b`` is MLAS's block
  size (8 with AVX2, 16 with AVX-512). ``C`` is padded with zero channels up to a multiple of ``b``; the tensor's
  shape is ``[N, C_padded, H, W]``. A ``com.microsoft.nchwc::ReorderOutput`` (attribute ``channels`` = ``C``)
  converts back to NCHW wherever a plain tensor is needed, every graph output included.
* A calibration probe makes every annotated activation a graph output, so on ResNet-18 at batch 16, 29 reorders
  move 57 M values a batch: the probe ran at 1.16× FP32 inference with them and 1.04× without (sums of per-batch
  medians over 11 batches, this machine).

A per-tensor observer (min-max, moving-average min-max, histogram) depends only on the multiset of a tensor's
values, and when ``C`` is a multiple of 16 the blocked tensor holds exactly the plain tensor's values in another
order, with no padding channel. So the probe model is optimised once, to a file; every ``ReorderOutput`` that only
feeds a graph output, converts a tensor whose observer ignores order and has ``channels % 16 == 0`` is removed and
its blocked input becomes the graph output instead; the edited model is opened with graph optimisation off (it is
optimised already, for this machine and this process only).

The edit is made on the protobuf wire format. The optimised model holds every weight (45 MB for ResNet-18), and
parsing it into Python objects and serialising it again would cost about what the reorders cost on a short
calibration; the nodes and graph outputs, which are all the edit touches, are a few kilobytes, and every other
field is copied as bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import tempfile
from collections.abc import Collection, Iterator

import onnx
import onnxruntime as ort

from qgraph import runtime
from qgraph.quant.observe_kernel import DOMAIN as OBSERVE_DOMAIN

logger = logging.getLogger(__name__)

#: The largest NCHWc block size MLAS uses (AVX-512); a channel count divisible by it has no padding in any block.
LARGEST_BLOCK = 16
#: Models at least this large are not saved through protobuf (its 2 GB limit): their probes keep the reorders.
SIZE_LIMIT = 1 << 30

# protobuf field numbers (onnx.proto) and wire types
_MODEL_GRAPH = 7
_GRAPH_NODE = 1
_GRAPH_OUTPUT = 12
_LENGTH_DELIMITED = 2
_OBSERVERS_HERE = b""  # a marker in the edited graph's field list


@dataclasses.dataclass(frozen=True)
class BlockedOutput:
    """A probe output returned in the blocked layout: ``name`` in the session stands for ``tensor``."""

    tensor: str
    name: str
    channels: int


@dataclasses.dataclass
class BlockedProbeSession:
    session: ort.InferenceSession
    #: The outputs that come back blocked, under their session names; the others keep their own.
    blocked: list[BlockedOutput]


def uses_blocked_layout(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime may run part of ``model`` in NCHWc: its graph has a Conv."""
    return any(node.op_type == "Conv" and node.domain in ("", "ai.onnx") for node in model.graph.node)


def create_blocked_probe_session(
    probe: onnx.ModelProto,
    order_free: Collection[str],
    *,
    threads: int | None,
    spinning: bool,
    custom_operators: str | None = None,
) -> BlockedProbeSession | None:
    """A session of ``probe`` whose outputs in ``order_free`` may come back blocked; None when it cannot be made.

    ``order_free``: the graph outputs whose consumers ignore the order of values (per-tensor observers). The inputs of
    Observe nodes (:mod:`qgraph.quant.observe_kernel`) are order-free too: they are read blocked where possible.
    ``custom_operators``: the library of the Observe kernel, when the probe has Observe nodes.
    """
    observing = any(node.domain == OBSERVE_DOMAIN for node in probe.graph.node)
    if not (order_free or observing) or not uses_blocked_layout(probe):
        return None
    try:
        # serialized once, here: protobuf's ByteSize() alone costs as much as serializing (70 ms for ResNet-18)
        serialized = probe.SerializeToString()
        if len(serialized) >= SIZE_LIMIT:
            return None
        session, blocked = _optimized_without_reorders(
            serialized, frozenset(order_free), threads=threads, spinning=spinning, custom_operators=custom_operators
        )
    except Exception:  # noqa: BLE001 - a speed-up only: the probe with reorders gives the same observations
        logger.debug("probe kept in the plain layout: optimising and editing it failed", exc_info=True)
        return None
    logger.debug("probe returns %d activations in the blocked layout", len(blocked))
    return BlockedProbeSession(session, blocked)


def _optimized_without_reorders(
    probe: bytes, order_free: frozenset[str], **session_options
) -> tuple[ort.InferenceSession, list[BlockedOutput]]:
    """A session of ``probe`` as onnxruntime optimised it for this machine, edited by :func:`remove_output_reorders`.

    When nothing is removable, the session that optimised the probe is the probe's session.
    """
    with tempfile.TemporaryDirectory(prefix="qgraph-probe-") as folder:
        path = os.path.join(folder, "optimized.onnx")
        # (onnxruntime warns that the saved model is for this machine: it is used here only, and logs are quiet)
        optimizing = runtime.create_session(probe, optimize=True, optimized_model_path=path, **session_options)
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as optimized:
            edited, blocked = remove_output_reorders(optimized, order_free)
    if edited is None:
        return optimizing, []
    del optimizing
    return runtime.create_session(edited, optimize=False, **session_options), blocked


def remove_output_reorders(
    model: bytes | mmap.mmap, order_free: frozenset[str]
) -> tuple[bytes | None, list[BlockedOutput]]:
    """``model`` (a serialized ModelProto) without the removable ReorderOutput nodes, and the outputs they fed.

    None and no outputs when no node is removable.

    A ReorderOutput whose ``channels`` is a multiple of :data:`LARGEST_BLOCK` is removable when either
    * its output is a graph output in ``order_free`` that no node reads, and its input is not already a graph
      output: the blocked input becomes the graph output (a :class:`BlockedOutput`);
    * or its output is no graph output and only Observe nodes read it: they read the blocked input instead (no
      :class:`BlockedOutput`: nothing the caller fetches changes).
    """
    data = memoryview(model)
    graph_span = next(((body, end) for number, _, _, body, end in _fields(data, 0, len(data))
                       if number == _MODEL_GRAPH), None)
    if graph_span is None:
        return None, []
    # one scan of the graph: every field's span, nodes and outputs parsed (a few kB; initializers are not)
    fields = []
    nodes: dict[int, onnx.NodeProto] = {}
    outputs: dict[int, onnx.ValueInfoProto] = {}
    for index, (number, wire_type, field_start, body, end) in enumerate(_fields(data, *graph_span)):
        fields.append((field_start, end))
        if wire_type == _LENGTH_DELIMITED and number == _GRAPH_NODE:
            nodes[index] = onnx.NodeProto.FromString(bytes(data[body:end]))
        elif wire_type == _LENGTH_DELIMITED and number == _GRAPH_OUTPUT:
            outputs[index] = onnx.ValueInfoProto.FromString(bytes(data[body:end]))
    output_names = {info.name for info in outputs.values()}
    readers: dict[str, list[int]] = {}
    for index, node in nodes.items():
        for name in node.input:
            readers.setdefault(name, []).append(index)
    removed: dict[str, BlockedOutput] = {}
    removed_fields: set[int] = set()
    renamed_inputs: dict[str, str] = {}  # an Observe node's input -> the blocked tensor it reads instead
    sources: set[str] = set()  # the blocked tensors already returned
    for index, node in nodes.items():
        if node.op_type != "ReorderOutput" or node.domain != "com.microsoft.nchwc":
            continue
        tensor, source = node.output[0], node.input[0]
        attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
        channels = int(attributes.get("channels", 0))
        if channels <= 0 or channels % LARGEST_BLOCK:
            continue
        tensor_readers = readers.get(tensor, [])
        if tensor_readers and tensor not in output_names:
            if all(nodes[reader].domain == OBSERVE_DOMAIN for reader in tensor_readers):
                renamed_inputs[tensor] = source
                removed_fields.add(index)
            continue
        if (
            tensor_readers
            or tensor not in order_free
            or tensor not in output_names
            or source in output_names
            or source in sources
        ):
            continue
        removed[tensor] = BlockedOutput(tensor, source, channels)
        removed_fields.add(index)
        sources.add(source)
    if not removed_fields:
        return None, []
    # every field of the graph but the removed nodes, the replaced outputs and the Observe nodes is copied as it is
    graph: list[bytes | memoryview] = []
    observers: list[tuple[int, bytes | memoryview]] = []  # (producer's field index, Observe node)
    producers = {output: index for index, node in nodes.items() for output in node.output}
    last_node = max(
        (index for index, node in nodes.items() if node.domain != OBSERVE_DOMAIN and index not in removed_fields),
        default=-1,
    )
    if last_node < 0:
        graph.append(_OBSERVERS_HERE)
    for index, (field_start, end) in enumerate(fields):
        if index in removed_fields:
            continue
        info = outputs.get(index)
        node = nodes.get(index)
        if info is not None and info.name in removed:
            # the blocked tensor's shape is not the plain one's (channels last, say): left unstated
            replacement = onnx.helper.make_tensor_value_info(
                removed[info.name].name, info.type.tensor_type.elem_type, None
            )
            graph.append(_length_delimited(_GRAPH_OUTPUT, replacement.SerializeToString()))
        elif node is not None and node.domain == OBSERVE_DOMAIN:
            piece: bytes | memoryview = data[field_start:end]
            if node.input[0] in renamed_inputs:
                node.input[0] = renamed_inputs[node.input[0]]
                piece = _length_delimited(_GRAPH_NODE, node.SerializeToString())
            observers.append((producers.get(node.input[0], -1), piece))
        else:
            graph.append(data[field_start:end])
        if index == last_node:
            graph.append(_OBSERVERS_HERE)
    # onnxruntime's default execution order is a depth-first search from the graph's sinks, the last sink in the node
    # list first: with the Observe nodes last, those of the earliest activations last of all, each runs right after
    # the node producing its activation (still in cache, its buffer reused sooner: no arena growth on the first run)
    observers.sort(key=lambda item: item[0], reverse=True)
    position = next(index for index, piece in enumerate(graph) if piece is _OBSERVERS_HERE)
    graph[position:position + 1] = [piece for _, piece in observers]
    rest = [data[field_start:end] for number, _, field_start, _, end in _fields(data, 0, len(data))
            if number != _MODEL_GRAPH]
    header = _encode_varint(_MODEL_GRAPH << 3 | _LENGTH_DELIMITED) + _encode_varint(sum(len(piece) for piece in graph))
    edited = b"".join([*rest, header, *graph])
    for piece in (*rest, *graph):  # views of an mmap must be released before it closes
        if isinstance(piece, memoryview):
            piece.release()
    data.release()
    return edited, list(removed.values())


# ------------------------------------------------------------------------------------------------ wire format
def _varint(data: bytes | memoryview, position: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it."""
    value = shift = 0
    while True:
        if position >= len(data):
            raise ValueError("truncated protobuf varint")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return value, position
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, body: bytes) -> bytes:
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(len(body)) + body


def _fields(data: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(field number, wire type, field start, body start, end)`` of each field in ``data[start:end]``.

    ``data[field start:end]`` is the whole field (tag and length included), ``data[body start:end]`` its body (a
    length-delimited field's bytes, a scalar's encoding).
    """
    position = start
    while position < end:
        field_start = position
        tag, position = _varint(data, position)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            body_start, (_, body_end) = position, _varint(data, position)
        elif wire_type == 1:
            body_start, body_end = position, position + 8
        elif wire_type == _LENGTH_DELIMITED:
            length, body_start = _varint(data, position)
            body_end = body_start + length
        elif wire_type == 5:
            body_start, body_end = position, position + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if body_end > end:
            raise ValueError("truncated protobuf field")
        position = body_end
        yield number, wire_type, field_start, body_start, body_end
