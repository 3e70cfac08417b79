"""The regions the speed choice can keep FP32 (:mod:`qgraph.speed_choice`): region classes and integer regions.

A *region class* is a kind of node whose integer kernel onnxruntime may run slower than FP32 on some CPUs, with the
elementwise nodes only it feeds (docs/runtime-facts.md has the timings):

- ``stem``: a convolution reading the graph input, directly or through layout operators (the Unsqueeze before a
  Conv1d front end);
- ``depthwise``: convolutions with one input channel per group;
- ``squeeze-excite``: GlobalAveragePool → … → gate → Mul back onto the pooled tensor;
- ``small-matmul``: MatMul/Gemm whose constant weight has at most ``small_matmul_weights`` elements;

each with the elementwise nodes that only it feeds (ReLU6, HardSwish in any spelling) and, for depthwise
convolutions and small MatMuls, the float-only elementwise node that only feeds it (an unfused HardSwish, the Relu
before a decoder), so that a float region does not pay a Q/DQ pair per activation.

A *connected integer region* (:func:`find_integer_regions`) is a set of nodes linked through Q/DQ pairs, with the
float nodes at its border: a stream model whose float LSTM separates its Conv1d front end from its decoder has two,
a CNN one.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from qgraph.ir.values import is_op

REGION_CLASSES = ("stem", "depthwise", "squeeze-excite", "small-matmul")

_QUANTIZE_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: Elementwise activations and arithmetic that a float region takes along (they hold no weights).
_ELEMENTWISE_OPS = frozenset({"Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "LeakyRelu", "Tanh",
                              "Add", "Sub", "Mul", "Div"})
#: What may lie between a GlobalAveragePool and the gate Mul of a squeeze-and-excitation block.
_GATE_OPS = _ELEMENTWISE_OPS | {"Conv", "Gemm", "MatMul", "Flatten", "Reshape", "Unsqueeze"}
_POOL_OPS = frozenset({"GlobalAveragePool", "ReduceMean"})
_GATE_DEPTH = 16


def _source(value: ir.Value | None) -> ir.Value | None:
    """The float tensor behind ``DQ(Q(t))`` (``t``), or ``value`` itself."""
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "DequantizeLinear":
        quantize = producer.inputs[0].producer()
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            return quantize.inputs[0]
    return value


def _float_readers(value: ir.Value) -> list[ir.Node]:
    """Nodes reading ``value`` directly or through ``Q → DQ``."""
    readers = []
    for node, _ in value.uses():
        if node.op_type == "QuantizeLinear":
            for dequantize, _ in node.outputs[0].uses():
                if dequantize.op_type == "DequantizeLinear":
                    readers += [reader for reader, _ in dequantize.outputs[0].uses()]
        elif node.op_type != "DequantizeLinear":
            readers.append(node)
    return readers


def _activation_inputs(node: ir.Node) -> list[ir.Value]:
    """Inputs that are not constants (initializers, or DQ of initializers)."""
    inputs = []
    for value in node.inputs:
        if value is None or (value.const_value is not None and not value.is_graph_input()):
            continue
        producer = value.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            integer = producer.inputs[0]
            if integer.const_value is not None and not integer.is_graph_input():
                continue
        inputs.append(value)
    return inputs


def _followers(node: ir.Node) -> set[str]:
    """Elementwise nodes fed only by ``node``'s output and by each other (ReLU6, HardSwish in any spelling)."""
    reached = {id(node.outputs[0])}
    taken: set[str] = set()
    frontier = [node.outputs[0]]
    while frontier:
        value = frontier.pop()
        for reader in _float_readers(value):
            if reader.name in taken or reader.op_type not in _ELEMENTWISE_OPS:
                continue
            if all(id(_source(operand)) in reached for operand in _activation_inputs(reader)):
                taken.add(reader.name)
                reached.add(id(reader.outputs[0]))
                frontier.append(reader.outputs[0])
    return taken


def _feeders(node: ir.Node) -> set[str]:
    """The elementwise node producing ``node``'s data input when it reads only dequantized integers (a float
    island of its own, such as an unfused HardSwish) and feeds nothing else."""
    data = _source(node.inputs[0])
    producer = data.producer() if data is not None else None
    if producer is None or producer.op_type not in _ELEMENTWISE_OPS:
        return set()
    operands = _activation_inputs(producer)
    if not operands or any(operand.producer() is None or operand.producer().op_type != "DequantizeLinear"
                           for operand in operands):
        return set()
    if any(reader is not node for reader in _float_readers(data)):
        return set()
    return {producer.name}


#: Operators that only move a tensor's values (a stem may read the graph input through them).
_LAYOUT_OPS = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Transpose", "Flatten", "Identity"})


def _layout_path_to_input(value: ir.Value | None) -> set[str] | None:
    """The layout nodes between a graph input and ``value`` (``Unsqueeze(input)`` feeding a Conv1d front end), or
    None when ``value`` is not the graph input moved about."""
    names: set[str] = set()
    for _ in range(_GATE_DEPTH):
        value = _source(value)
        if value is None:
            return None
        if value.is_graph_input():
            return names
        producer = value.producer()
        if producer is None or producer.op_type not in _LAYOUT_OPS or producer.domain != "":
            return None
        names.add(producer.name)
        value = producer.inputs[0]
    return None


def _is_depthwise(node: ir.Node) -> bool:
    group = node.attributes.get("group")
    weight = _weight_shape(node)
    return group is not None and group.as_int() > 1 and weight is not None and len(weight) == 4 and weight[1] == 1


def _weight_shape(node: ir.Node) -> tuple[int, ...] | None:
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    weight = node.inputs[1]
    producer = weight.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        weight = producer.inputs[0]
    if weight.const_value is None:
        return None
    return tuple(int(size) for size in weight.const_value.shape)


def _squeeze_excite(mul: ir.Node) -> set[str] | None:
    """The nodes of a squeeze-and-excitation block ending in ``mul``: pool → … → gate → Mul(x, gate)."""
    operands = [_source(value) for value in mul.inputs]
    if len(operands) != 2 or any(value is None for value in operands):
        return None
    for gate_index in (0, 1):
        gated = operands[1 - gate_index]
        found: set[str] = set()
        value = operands[gate_index]
        for _ in range(_GATE_DEPTH):
            producer = value.producer() if value is not None else None
            if producer is None:
                break
            if producer.op_type in _POOL_OPS:
                if _source(producer.inputs[0]) is gated:
                    return found | {producer.name, mul.name}
                break
            if producer.op_type not in _GATE_OPS:
                break
            activation = _activation_inputs(producer)
            if len(activation) != 1:
                break
            found.add(producer.name)
            value = _source(activation[0])
    return None


def find_regions(model: ir.Model, *, small_matmul_weights: int = 16384) -> dict[str, frozenset[str]]:
    """The node names of each region class in ``model``'s main graph (QDQ or FP32 form; names are shared)."""
    graph = model.graph
    regions: dict[str, set[str]] = {name: set() for name in REGION_CLASSES}
    for node in graph:
        if node.op_type == "Conv" and node.domain == "":
            layout_nodes = _layout_path_to_input(node.inputs[0])
            if layout_nodes is not None:
                regions["stem"] |= {node.name} | _followers(node) | layout_nodes
            if _is_depthwise(node):
                regions["depthwise"] |= {node.name} | _followers(node) | _feeders(node)
        elif node.op_type in ("MatMul", "Gemm") and node.domain == "":
            shape = _weight_shape(node)
            if shape is not None and math.prod(shape) <= small_matmul_weights:
                regions["small-matmul"] |= {node.name} | _followers(node) | _feeders(node)
        elif node.op_type == "Mul" and node.domain == "":
            block = _squeeze_excite(node)
            if block is not None:
                regions["squeeze-excite"] |= block
    return {name: frozenset(nodes) for name, nodes in regions.items()}


def _touches_quantization(node: ir.Node) -> bool:
    """``node`` reads a dequantized tensor or writes one that is quantized (it computes inside an integer region
    once lowered, or sits on its border)."""
    if node.op_type in _QUANTIZE_OPS:
        return False
    reads = any(value is not None and is_op(value.producer(), "DequantizeLinear") for value in node.inputs)
    return reads or any(reader.op_type == "QuantizeLinear" for value in node.outputs for reader, _ in value.uses())


def _is_embedding_lookup(node: ir.Node) -> bool:
    """A Gather of rows from a dequantized constant table (an int8 vocabulary)."""
    table = node.inputs[0] if node.op_type == "Gather" and node.inputs else None
    producer = table.producer() if table is not None else None
    return (is_op(producer, "DequantizeLinear") and producer.inputs[0] is not None
            and producer.inputs[0].const_value is not None)


def find_integer_regions(model: ir.Model) -> dict[str, frozenset[str]]:
    """The connected integer regions of a QDQ ``model``'s main graph, each named ``region:NODE`` after its first
    node with a dequantized constant input (a weight), in graph order.

    Two nodes belong to one region when a tensor links them through ``Q → DQ`` (the producer of the Q's input and
    every reader of its DQs), or when one reads the other's output directly and both touch quantization (read a
    DQ or feed a Q: a Conv and the Relu fused into it). A region is thus closed under the Q/DQ pairs between its
    nodes: kept FP32 (:class:`~qgraph.passes.lower.keep_float_nodes.KeepFloatNodes`), all of them go and it
    computes as the FP32 model does, no Q/DQ left at its border. A model whose integer nodes form one region (a
    CNN) has one; a stream model with float recurrent layers between its integer parts (the VAD's Conv1d front end,
    its decoder) has several.

    An embedding lookup is in no region: it dequantizes only the rows it reads (a few percent of a small encoder's
    time at most, none measurable on BERT-base), and its int8 table is what makes the model four times smaller
    there, which a choice that weighs time alone would give back for noise."""
    touched = [node for node in model.graph if _touches_quantization(node) and not _is_embedding_lookup(node)]
    import networkx as nx  # here: importing it takes 0.14 s, and a decisive speed choice never gets here

    links = nx.Graph()
    links.add_nodes_from(node.name for node in touched)
    for node in touched:
        for value in node.outputs:
            for reader, _ in value.uses():
                if reader.op_type == "QuantizeLinear":  # through Q -> DQ to the readers of the dequantized tensor
                    links.add_edges_from((node.name, dequantized_reader.name)
                                         for dequantize, _ in reader.outputs[0].uses()
                                         if dequantize.op_type == "DequantizeLinear"
                                         for dequantized_reader, _ in dequantize.outputs[0].uses())
                else:
                    links.add_edge(node.name, reader.name)
        for value in node.inputs:  # readers of one DQ (of a graph input, say) belong together
            producer = value.producer() if value is not None else None
            if is_op(producer, "DequantizeLinear"):
                links.add_edges_from((node.name, reader.name) for reader, _ in producer.outputs[0].uses())
    links = links.subgraph(node.name for node in touched)  # edges to nodes that touch no quantization drop out
    component_of = {name: index for index, component in enumerate(nx.connected_components(links))
                    for name in component}
    members: dict[int, list[ir.Node]] = {}
    for node in touched:  # graph order: regions by their first node, each region's nodes in order
        members.setdefault(component_of[node.name], []).append(node)
    regions: dict[str, frozenset[str]] = {}
    for nodes in members.values():
        weighted = [node for node in nodes if any(
            is_op(value.producer(), "DequantizeLinear") and value.producer().inputs[0] is not None
            and value.producer().inputs[0].const_value is not None
            for value in node.inputs if value is not None)]
        regions[f"region:{(weighted or nodes)[0].name}"] = frozenset(node.name for node in nodes)
    return regions
