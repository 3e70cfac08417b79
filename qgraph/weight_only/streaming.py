"""Weight-only quantization of models too large for memory: one weight at a time, memory-mapped in, spilled out.

A model loaded with external data keeps its tensors memory-mapped (:func:`qgraph.ir.load_model`): nothing is read
until a weight is used. The streamed flow quantizes the layers one at a time, in graph order:

1. read one float weight from the mapping (a float32 copy), round it (RTN, or GPTQ with its input's Hessian);
2. rewrite that one node (``QuantizeWeightsBlockwise``, then ``LowerMatMulNBits``), exactly the rewrite of the
   in-memory flow, so the result is the same model;
3. append the new codes, scales and zero points to a spill file of external data (:class:`SpillFile`), replace
   them in the graph by references to it, and close the input weight's mapping (its pages leave the process).

Memory is then one float weight and its codes, plus whatever stays inline (norm gains, rotary tables); saving
copies every external tensor file to file (``copy_file_range``), never through memory.

**GPTQ statistics by segments.** A model over 2 GB cannot be handed to onnxruntime as bytes, and by path it would
load every weight at once. The graph is cut instead, in topological order, into *segments* of at most
``segment_bytes`` of weights (about half a decoder layer). Each segment becomes a small model of its own: its nodes,
its weights by reference, as inputs the values it reads from earlier segments (or the graph inputs) and as outputs the
values later segments read plus the layer inputs whose Hessians are wanted. The calibration batches run through the
segments in order, every batch's live boundary values (the residual stream, the attention bias, the rotary rows)
kept between segments and dropped after their last reader. After a segment has run over every batch, the Hessians
``H = 2XᵀX`` of its layers' inputs are complete (an input is produced no later than its reader), so its layers are
quantized and the Hessians freed. A segment is written as a small model file whose external weights are references,
through links in a temporary folder, to the model's own data file: no weight byte is copied into this process or a
proto, and onnxruntime (prepacking off) maps them. Memory is then one segment's weights, mapped, the boundary
activations of the calibration set (each dropped after its last reader) and O(K²) per layer input in flight,
whatever the model size. The layer inputs are those of the FP32 model, as in the in-memory flow without
``sequential``, and computed by the same onnxruntime kernels (graph optimisation off), so the Hessians are the
in-memory flow's.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qgraph import runtime
from qgraph.errors import DataError, QGraphError
from qgraph.weight_only.feeds import complete_feeds, model_inputs
from qgraph.weight_only.gptq import HessianAccumulator

logger = logging.getLogger(__name__)

#: In-memory initializers at least this large are moved to the spill file.
SPILL_THRESHOLD_BYTES = 1024
#: Weights per segment of the statistics run (about half a 2048-wide decoder layer): what onnxruntime maps at
#: once, and how many layer inputs' Hessians are accumulated together.
SEGMENT_BYTES = 128 * 2**20


def has_external_data(model: ir.Model) -> bool:
    """Whether any initializer of ``model`` is read from external data (the streamed flow's trigger)."""
    return any(isinstance(value.const_value, ir.ExternalTensor)
               for graph in model.graphs() for value in graph.initializers.values())


def release(value: ir.Value | None) -> None:
    """Close the memory mapping of an external initializer (its touched pages leave the process)."""
    if value is not None and isinstance(value.const_value, ir.ExternalTensor):
        try:
            value.const_value.release()
        except BufferError:  # a view of the mapping is still referenced; it is unmapped when that view goes
            logger.debug("%s: still referenced, left mapped", value.name)


class SpillFile:
    """One external data file in a private temporary folder, removed when ``owner`` is collected or at exit."""

    def __init__(self, owner: object) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="qgraph-weight-only-"))
        self.location = "spilled.data"
        self._file = open(self.folder / self.location, "wb")  # noqa: SIM115 (closed by close() / the finalizer)
        self.bytes = 0
        self._finalizer = weakref.finalize(owner, _remove, self._file, self.folder)

    def spill(self, graph: ir.Graph) -> int:
        """Move every in-memory initializer of ``graph`` over the threshold to the file; returns bytes moved."""
        moved = 0
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < SPILL_THRESHOLD_BYTES:
                continue
            offset = self._file.tell()
            data = tensor.tobytes()
            self._file.write(data)
            self._file.flush()
            value.const_value = ir.ExternalTensor(self.location, offset, len(data), tensor.dtype, shape=tensor.shape,
                                                  name=value.name or tensor.name or "", base_dir=os.fspath(self.folder))
            moved += len(data)
        self.bytes += moved
        return moved


def _remove(file, folder: Path) -> None:
    file.close()
    shutil.rmtree(folder, ignore_errors=True)


class _Segment:
    def __init__(self, nodes: list[ir.Node]) -> None:
        self.nodes = nodes
        self.inputs: list[str] = []
        self.outputs: list[str] = []


def segments(graph: ir.Graph, segment_bytes: int = SEGMENT_BYTES) -> list[_Segment]:
    """Cut ``graph`` in topological order into segments of at most ``segment_bytes`` of weights each (a weight
    larger than that gets a segment of its own), with each segment's boundary inputs and outputs."""
    cuts: list[_Segment] = []
    current: list[ir.Node] = []
    seen: set[str] = set()
    size = 0
    for node in graph:
        weights = [value for value in node.inputs
                   if value is not None and value.is_initializer() and value.name not in seen]
        extra = sum(value.const_value.nbytes for value in weights if value.const_value is not None)
        if current and size + extra > segment_bytes:
            cuts.append(_Segment(current))
            current, seen, size = [], set(), 0
        current.append(node)
        seen.update(value.name for value in weights)
        size += extra
    if current:
        cuts.append(_Segment(current))
    index_of = {node: index for index, segment in enumerate(cuts) for node in segment.nodes}
    for index, segment in enumerate(cuts):
        inputs: dict[str, None] = {}
        for node in segment.nodes:
            for value in node.inputs:
                if value is None or value.is_initializer():
                    continue
                producer = value.producer()
                if producer is None or index_of[producer] != index:
                    inputs[value.name] = None
        segment.inputs = list(inputs)
        outputs: dict[str, None] = {}
        for node in segment.nodes:
            for value in node.outputs:
                if any(index_of.get(use.node, index) > index for use in value.uses()):
                    outputs[value.name] = None
        segment.outputs = list(outputs)
    return cuts


def _external_reference(value: ir.Value, tensor: ir.ExternalTensor, links: dict[str, str],
                        folder: Path) -> onnx.TensorProto:
    """A TensorProto of ``value``'s shape and type whose data is ``tensor``'s bytes, read through a link in
    ``folder`` to its data file (one link per file, named in ``links``).

    A hard link where the file system allows it: onnxruntime 1.32 refuses external data whose resolved path leaves
    the model's folder, which a symbolic link does; 1.19 follows either. A symbolic link across file systems.
    """
    target = os.path.realpath(tensor.path)
    if target not in links:
        links[target] = f"external{len(links)}.data"
        try:
            os.link(target, folder / links[target])
        except OSError:
            os.symlink(target, folder / links[target])
    proto = onnx.TensorProto(name=value.name, data_type=int(tensor.dtype), dims=list(tensor.shape.numpy()))
    proto.data_location = onnx.TensorProto.EXTERNAL
    for key, entry in (("location", links[target]), ("offset", str(tensor.offset or 0)),
                       ("length", str(tensor.nbytes))):
        field = proto.external_data.add()
        field.key, field.value = key, entry
    return proto


def _write_segment(model: ir.Model, segment: _Segment, fetched: Sequence[str], feeds: Mapping[str, np.ndarray],
                   folder: Path) -> Path:
    """``segment`` as a model file in ``folder``: its external weights are references to the model's own data
    files (through links), so neither this process nor the proto holds their bytes: onnxruntime maps them."""
    initializers: dict[str, onnx.TensorProto] = {}
    links: dict[str, str] = {}
    for node in segment.nodes:
        for value in node.inputs:
            if value is None or not value.is_initializer() or value.name in initializers:
                continue
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                initializers[value.name] = _external_reference(value, tensor, links, folder)
            else:
                initializers[value.name] = ir.serde.serialize_tensor(tensor)
                initializers[value.name].name = value.name
    inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(feeds[name].dtype), None)
              for name in segment.inputs]
    outputs = [onnx.ValueInfoProto(name=name) for name in fetched]
    graph = onnx.helper.make_graph([ir.serde.serialize_node(node) for node in segment.nodes], "segment", inputs,
                                   outputs, list(initializers.values()))
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    # the model's local functions (a fused RMSNormalization, say) travel with every segment that may call them
    functions = [ir.serde.serialize_function(function) for function in model.functions.values()]
    path = folder / "segment.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version, functions=functions),
              os.fspath(path))
    return path


def run_by_segments(model: ir.Model, tensors: Mapping[str, int], batches: Sequence[Mapping[str, np.ndarray]],
                    on_segment: Callable[[list[ir.Node], dict[str, HessianAccumulator]], None], *,
                    segment_bytes: int = SEGMENT_BYTES, progress: Callable[[int], None] | None = None) -> None:
    """Run ``batches`` through ``model`` segment by segment, accumulating the Hessians of ``tensors`` (name -> K);
    after each segment, ``on_segment(nodes, accumulators)`` gets its nodes and every accumulator complete so far
    (it may quantize those nodes, and pops the accumulators it no longer needs)."""
    cuts = segments(model.graph, segment_bytes)
    header = onnx.ModelProto(graph=onnx.GraphProto(input=[ir.serde.serialize_value(value)
                                                          for value in model.graph.inputs]))
    inputs = model_inputs(header)
    environments = [complete_feeds(inputs, batch) for batch in batches]
    if not environments:
        raise DataError("the calibration data holds no samples")
    accumulators: dict[str, HessianAccumulator] = {}
    for name, size in tensors.items():  # a layer input that is a graph input
        if name in environments[0]:
            accumulators[name] = HessianAccumulator(size)
            for environment in environments:
                accumulators[name].add(environment[name])
    last_reader = {}
    for index, segment in enumerate(cuts):
        for name in segment.inputs:
            last_reader[name] = index
    logger.info("GPTQ statistics over %d segments of at most %.0f MB of weights", len(cuts), segment_bytes / 2**20)
    for index, segment in enumerate(cuts):
        produced = {value.name for node in segment.nodes for value in node.outputs}
        wanted = [name for name in tensors if name in produced]
        fetched = list(dict.fromkeys(segment.outputs + wanted))
        if fetched:
            with tempfile.TemporaryDirectory(prefix="qgraph-segment-") as folder:
                path = _write_segment(model, segment, fetched, environments[0], Path(folder))
                session = runtime.create_session(path, prepacking=False)
            for name in wanted:
                accumulators[name] = HessianAccumulator(tensors[name])
            for environment in environments:
                results = session.run(fetched, {name: environment[name] for name in segment.inputs})
                for name, array in zip(fetched, results):
                    if name in accumulators and name in wanted:
                        accumulators[name].add(array)
                    if name in segment.outputs:
                        environment[name] = array
                for name in segment.inputs:
                    if last_reader.get(name) == index:
                        environment.pop(name, None)
                if index == 0 and progress is not None:
                    progress(len(next(iter(environment.values()), [])))
            del session
        logger.info("segment %d/%d: %d nodes, %d layer inputs collected", index + 1, len(cuts),
                    len(segment.nodes), len(wanted))
        on_segment(segment.nodes, accumulators)
    if accumulators:
        logger.debug("accumulators left after the last segment: %s", sorted(accumulators))


def check_streamable(options) -> None:
    if options.algorithm == "awq":
        raise QGraphError("AWQ folds scales into producer weights across layers and is not streamed: a model with "
                          "external data is quantized with --algorithm rtn or gptq")
    if options.sequential:
        raise QGraphError("--sequential GPTQ is not streamed: a model with external data takes each layer's inputs "
                          "from the FP32 model (drop --sequential)")
