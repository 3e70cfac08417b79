"""The edit of an optimised probe model, made on the protobuf wire format (see :mod:`qgraph.calibrate.blocked_outputs`).

What changes: ``ReorderOutput`` nodes are removed, the graph outputs or the Observe nodes they fed read the blocked
tensor instead, and the Observe nodes move to the end of the node list in the order that makes onnxruntime run each
right after its producer. Only nodes and graph outputs are parsed (a few kilobytes); every other field, the 45 MB of
ResNet-18's weights included, is left as bytes.

Two ways to write it:

* :meth:`ProbeEdit.rewritten`: the whole model as new bytes (a 46 MB copy for ResNet-18, and onnxruntime copies the
  bytes it is given once more: ~25 ms and ~45 ms to load, against ~18 ms to load from a file);
* :meth:`ProbeEdit.patches`: the same edit as patches of the saved file that keep every field's offset, for the file
  to be patched in place and opened by path. The graph's fields other than initializers come in a few runs of
  consecutive fields (nodes, then inputs and outputs); each run is rewritten to the same length, the bytes it lost
  filled by a field of a number that ``GraphProto`` reserves (3 or 4), which parsers skip as an unknown field.
  None when a run would grow, or shrink by one byte (no field is one byte long): then the model is rewritten.
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Iterator

import onnx

from qgraph.calibrate.observe_kernel import DOMAIN as OBSERVE_DOMAIN

#: The largest NCHWc block size MLAS uses (AVX-512); a channel count divisible by it has no padding in any block.
LARGEST_BLOCK = 16

# protobuf field numbers (onnx.proto) and wire types
_MODEL_GRAPH = 7
_GRAPH_NODE = 1
_GRAPH_INITIALIZER = 5
_GRAPH_OUTPUT = 12
_RESERVED_VARINT = 3  # GraphProto reserves 3, 4 and 6 to 9 (numbers of removed fields): parsers skip them
_RESERVED_BYTES = 4
_VARINT = 0
_LENGTH_DELIMITED = 2


@dataclasses.dataclass(frozen=True)
class BlockedOutput:
    """A probe output returned in the blocked layout: ``name`` in the session stands for ``tensor``."""

    tensor: str
    name: str
    channels: int


@dataclasses.dataclass
class ProbeEdit:
    """An edit of ``data`` (a serialized ModelProto): the graph's fields as ``pieces``, each in the slot of a field."""

    data: memoryview
    #: (start, end) of every field of the graph, in order.
    fields: list[tuple[int, int]]
    #: The numbers of those fields.
    numbers: list[int]
    #: (slot, bytes): what the edited graph holds, in order; a piece's slot is the index of the field whose place it
    #: takes (moved Observe nodes take the place of the last other node).
    pieces: list[tuple[int, bytes | memoryview]]
    blocked: list[BlockedOutput]

    def rewritten(self) -> bytes:
        """The whole edited model."""
        graph = [piece for _, piece in self.pieces]
        rest = [self.data[start:end] for number, _, start, _, end in _fields(self.data, 0, len(self.data))
                if number != _MODEL_GRAPH]
        header = _encode_varint(_MODEL_GRAPH << 3 | _LENGTH_DELIMITED) + _encode_varint(sum(map(len, graph)))
        edited = b"".join([*rest, header, *graph])
        for piece in rest:
            piece.release()
        return edited

    def patches(self) -> list[tuple[int, bytes]] | None:
        """``(offset, bytes)`` patches of ``data`` that make the edit without moving any field (see the module)."""
        patches = []
        for first, last in self._runs():
            start, end = self.fields[first][0], self.fields[last][1]
            new = b"".join(bytes(piece) for slot, piece in self.pieces if first <= slot <= last)
            if new == self.data[start:end]:
                continue
            filler = _filler(end - start - len(new))
            if filler is None:
                return None
            patches.append((start, new + filler))
        return patches

    def release(self) -> None:
        """Release the views of ``data`` (an mmap cannot close while they live)."""
        for _, piece in self.pieces:
            if isinstance(piece, memoryview):
                piece.release()
        self.data.release()

    def _runs(self) -> Iterator[tuple[int, int]]:
        """(first, last) field indices of each run of consecutive fields that are not initializers."""
        first = None
        for index, number in enumerate(self.numbers):
            if number == _GRAPH_INITIALIZER:
                if first is not None:
                    yield first, index - 1
                first = None
            elif first is None:
                first = index
        if first is not None:
            yield first, len(self.numbers) - 1


def plan_edit(model: bytes | mmap.mmap, order_free: frozenset[str]) -> ProbeEdit | None:
    """The edit of ``model``; None when no ReorderOutput is removable and the graph has no Observe node.

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
        data.release()
        return None
    # one scan of the graph: every field's span, nodes and outputs parsed (a few kB; initializers are not)
    fields: list[tuple[int, int]] = []
    numbers: list[int] = []
    nodes: dict[int, onnx.NodeProto] = {}
    outputs: dict[int, onnx.ValueInfoProto] = {}
    for index, (number, wire_type, field_start, body, end) in enumerate(_fields(data, *graph_span)):
        fields.append((field_start, end))
        numbers.append(number)
        if wire_type == _LENGTH_DELIMITED and number == _GRAPH_NODE:
            nodes[index] = onnx.NodeProto.FromString(bytes(data[body:end]))
        elif wire_type == _LENGTH_DELIMITED and number == _GRAPH_OUTPUT:
            outputs[index] = onnx.ValueInfoProto.FromString(bytes(data[body:end]))
    removed, removed_fields, renamed_inputs = _removable_reorders(nodes, outputs, order_free)
    if not removed_fields and not any(node.domain == OBSERVE_DOMAIN for node in nodes.values()):
        data.release()
        return None
    pieces = _edited_pieces(data, fields, nodes, outputs, removed, removed_fields, renamed_inputs)
    return ProbeEdit(data, fields, numbers, pieces, list(removed.values()))


def remove_output_reorders(
    model: bytes | mmap.mmap, order_free: frozenset[str]
) -> tuple[bytes | None, list[BlockedOutput]]:
    """``model`` edited by :func:`plan_edit`, rewritten whole, and the outputs now blocked; (None, []) for no edit."""
    edit = plan_edit(model, order_free)
    if edit is None:
        return None, []
    edited = edit.rewritten()
    edit.release()
    return edited, edit.blocked


def _removable_reorders(
    nodes: dict[int, onnx.NodeProto], outputs: dict[int, onnx.ValueInfoProto], order_free: frozenset[str]
) -> tuple[dict[str, BlockedOutput], set[int], dict[str, str]]:
    """The blocked outputs by plain name, the fields of the removable reorders, and the Observe inputs renamed."""
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
    return removed, removed_fields, renamed_inputs


def _edited_pieces(
    data: memoryview,
    fields: list[tuple[int, int]],
    nodes: dict[int, onnx.NodeProto],
    outputs: dict[int, onnx.ValueInfoProto],
    removed: dict[str, BlockedOutput],
    removed_fields: set[int],
    renamed_inputs: dict[str, str],
) -> list[tuple[int, bytes | memoryview]]:
    """Every field of the graph but the removed nodes, the replaced outputs and the Observe nodes, as it is; the
    Observe nodes after the last other node.

    onnxruntime's default execution order is a depth-first search from the graph's sinks, the last sink in the node
    list first: with the Observe nodes last, those of the earliest activations last of all, each runs right after the
    node producing its activation (its buffer reused as in plain inference, no arena growth on the first run).
    """
    producers = {output: index for index, node in nodes.items() for output in node.output}
    last_node = max(
        (index for index, node in nodes.items() if node.domain != OBSERVE_DOMAIN and index not in removed_fields),
        default=-1,
    )
    pieces: list[tuple[int, bytes | memoryview]] = []
    observers: list[tuple[int, bytes | memoryview]] = []  # (producer's field index, Observe node)
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
            pieces.append((index, _length_delimited(_GRAPH_OUTPUT, replacement.SerializeToString())))
        elif node is not None and node.domain == OBSERVE_DOMAIN:
            piece: bytes | memoryview = data[field_start:end]
            if node.input[0] in renamed_inputs:
                node.input[0] = renamed_inputs[node.input[0]]
                piece = _length_delimited(_GRAPH_NODE, node.SerializeToString())
            observers.append((producers.get(node.input[0], -1), piece))
        else:
            pieces.append((index, data[field_start:end]))
    observers.sort(key=lambda item: item[0], reverse=True)
    # the Observe nodes take the last other node's slot (or the first field's, in a graph with no other node)
    slot = last_node if last_node >= 0 else 0
    position = next((position + 1 for position, (index, _) in enumerate(pieces) if index == slot), 0)
    pieces[position:position] = [(slot, piece) for _, piece in observers]
    return pieces


def _filler(size: int) -> bytes | None:
    """A reserved GraphProto field of exactly ``size`` bytes (nothing for 0; None for 1, which no field fits)."""
    if size == 0:
        return b""
    if size == 1 or size < 0:
        return None
    if size == 2:
        return bytes([_RESERVED_VARINT << 3 | _VARINT, 0])
    # a tag byte, the length as a varint of a chosen width (a varint may carry leading zero groups), then zeros
    tag = bytes([_RESERVED_BYTES << 3 | _LENGTH_DELIMITED])
    for width in range(1, 6):
        length = size - 1 - width
        if 0 <= length < 1 << (7 * width):
            groups = [(length >> (7 * index)) & 0x7F for index in range(width)]
            encoded = bytes(group | 0x80 for group in groups[:-1]) + bytes(groups[-1:])
            return tag + encoded + bytes(length)
    return None  # pragma: no cover - some width always fits


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
