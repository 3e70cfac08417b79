"""The switchable graph of the sensitivity analysis: one QDQ model whose quantization is chosen per layer at run time.

**Layers.** A *layer* is a node of ``plan.quantized_nodes`` (a Conv/ConvTranspose/Gemm/MatMul, an Add/Mul, a Concat,
a pass-through or an own-range op, in the main graph or an If branch) with the quantization it is responsible for; a
Relu/Clip fused into its producer belongs to its producer's layer. A layer ``N`` owns

- its weight and its bias (the ``WeightPlan``/``BiasPlan`` whose consumer is ``N``),
- the annotated activations it reads (its quantized inputs) and writes (its output; for a fused Conv+Relu, the
  Relu's output).

An activation read or written by several layers (a residual branch, a Concat input) is owned by each of them and is
quantized — for every reader, as in the QDQ graph — when any owner is. "Only layer ``N`` quantized" is then the plan
with every other layer excluded. Excluding ``N`` (``AnnotationOverrides.exclude``) likewise leaves one of its tensors
quantized exactly when another layer still owns it.

**One switchable graph.** ONNX has no switch, so the enable flags become a graph input ``e ∈ {0,1}^L`` (bool) and the
QDQ graph that ``InsertQuantizeDequantize`` writes gets a selection after every DequantizeLinear::

    x̃ = Where(e_a ∨ e_b ∨ …, DQ(Q(x; s, z)), x)     activation x owned by layers a, b, …
    W̃ = Where(e_N, DQ(W_q; s_w, z_w), W)            weight (and likewise bias) of layer N

``Where`` selects without arithmetic, so ``e = 1`` is the QDQ model bit for bit and ``e = 0`` the FP32 model bit for
bit. :mod:`qgraph.sensitivity` measures the output SQNR of this graph for chosen ``e`` and searches the layers to
put back to FP32.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.ir.edit import new_initializer
from qgraph.ir.naming import NameScope
from qgraph.passes.quantize.insert_quantize_dequantize import InsertQuantizeDequantize, dequantized_tensors
from qgraph.quant.plan import QuantPlan

logger = logging.getLogger(__name__)

#: The bool graph input ``e`` (one flag per layer, in :func:`find_layers` order).
ENABLE_INPUT = "qgraph_sensitivity_enable"
_FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})


@dataclasses.dataclass(frozen=True)
class Layer:
    """A quantized node and the quantization it owns (see the module docstring)."""

    node: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    constants: tuple[str, ...]

    @property
    def tensors(self) -> tuple[str, ...]:
        return self.inputs + self.constants + self.outputs


def find_layers(model: ir.Model, plan: QuantPlan) -> tuple[Layer, ...]:
    """The layers of ``plan`` in graph order (fused activations folded into their producer)."""
    quantized = set(plan.quantized_nodes)
    annotated = set(plan.activations)
    fused_into: dict[int, ir.Node] = {}
    for node in model.graph.all_nodes():
        if node.op_type in _FUSED_ACTIVATIONS and node.name in quantized and node.inputs and node.inputs[0] is not None:
            producer = node.inputs[0].producer()
            if producer is not None and producer.name in quantized and producer.op_type not in _FUSED_ACTIVATIONS:
                fused_into[id(producer)] = node
    fused_nodes = {id(node) for node in fused_into.values()}
    constants: dict[str, list[str]] = {}
    for entry in (*plan.weights, *plan.biases):
        constants.setdefault(entry.consumer, []).append(entry.name)
    layers = []
    for node in model.graph.all_nodes():
        if node.name not in quantized or id(node) in fused_nodes:
            continue
        inputs = _unique(value.name for value in node.inputs if value is not None and value.name in annotated)
        produced = list(node.outputs)
        if id(node) in fused_into:
            produced += list(fused_into[id(node)].outputs)
        outputs = _unique(value.name for value in produced if value.name in annotated)
        layers.append(Layer(node.name, node.op_type, inputs, outputs, tuple(constants.get(node.name, ()))))
    return tuple(layers)


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def copy_model(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def build_qdq(model: ir.Model, plan: QuantPlan, parameters: Mapping[str, object]) -> ir.Model:
    """A copy of the float ``model`` with ``plan`` written as QDQ (the original is left untouched)."""
    working = copy_model(model)
    InsertQuantizeDequantize(plan=plan, parameters=parameters)(working)
    return working


def build_switchable_model(
    model: ir.Model, plan: QuantPlan, parameters: Mapping[str, object], layers: Sequence[Layer],
    *, probes: dict[str, tuple[str, str]] | None = None,
) -> onnx.ModelProto:
    """The QDQ graph of ``plan`` whose quantization is selected per layer by the bool input ``ENABLE_INPUT``.

    With a ``probes`` dict, every switched activation ``x`` also gets two scalar graph outputs, the squared error
    of its own quantization and its squared value, ``Σ(DQ(Q(x)) − x)²`` and ``Σx²``; ``probes`` receives
    ``{x: (error output, signal output)}``.
    """
    working = build_qdq(model, plan, parameters)
    graph = working.graph
    names = NameScope(working)
    owners: dict[str, set[int]] = {}
    for index, layer in enumerate(layers):
        for tensor in layer.tensors:
            owners.setdefault(tensor, set()).add(index)

    names.reserve([ENABLE_INPUT])
    enable = ir.Value(name=ENABLE_INPUT, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([len(layers)]))
    graph.inputs.append(enable)
    flags: dict[frozenset[int], ir.Value] = {}
    flag_nodes: list[ir.Node] = []

    def flag(members: frozenset[int]) -> ir.Value:
        if members in flags:
            return flags[members]
        ordered = sorted(members)
        if len(ordered) == 1:
            index = new_initializer(
                graph, names, f"qgraph_sensitivity_index_{ordered[0]}", np.array(ordered[0], np.int64)
            )
            node = ir.node(
                "Gather", [enable, index], {"axis": 0}, name=names.fresh(f"qgraph_sensitivity_flag_{ordered[0]}")
            )
        else:
            node = ir.node("Or", [flag(frozenset(ordered[:-1])), flag(frozenset(ordered[-1:]))],
                           name=names.fresh("qgraph_sensitivity_flag_" + "_".join(map(str, ordered))))
        node.outputs[0].name = node.name
        node.outputs[0].type = ir.TensorType(ir.DataType.BOOL)
        node.outputs[0].shape = ir.Shape([])
        flag_nodes.append(node)
        flags[members] = node.outputs[0]
        return node.outputs[0]

    constant_names = {entry.name for entry in (*plan.weights, *plan.biases)}
    planned = dequantized_tensors(working, plan)
    unowned = []
    # Every graph: If branches hold quantized tensors too; the flags, computed in the main graph, reach them as
    # outer-scope values.
    for dequantize in [node for node in graph.all_nodes() if node.op_type == "DequantizeLinear"]:
        dequantized = dequantize.outputs[0]
        name = planned.get(dequantize)
        if name in constant_names:
            float_value = _float_constant(dequantize.graph, model, name)
        elif name in plan.activations:
            quantize = dequantize.inputs[0].producer()
            if quantize is None or quantize.op_type != "QuantizeLinear":
                continue
            float_value = quantize.inputs[0]
        else:
            continue
        if not owners.get(name):
            unowned.append(name)  # stays quantized in every run, like in the QDQ model
            continue
        uses = list(dequantized.uses())
        where = ir.node("Where", [flag(frozenset(owners[name])), dequantized, float_value],
                        name=names.fresh(f"{dequantized.name}_switch"))
        where.outputs[0].name = where.name
        where.outputs[0].type = float_value.type
        where.outputs[0].shape = float_value.shape
        dequantize.graph.insert_after(dequantize, where)
        for user, index in uses:
            user.replace_input_with(index, where.outputs[0])
        if probes is not None and name in plan.activations and dequantize.graph is graph:
            probes[name] = _add_error_probe(graph, names, where, dequantized, float_value)
    if unowned:
        logger.warning("%d quantized tensors belong to no layer and stay quantized in the analysis: %s",
                       len(unowned), ", ".join(unowned[:5]))
    if flag_nodes:
        graph.insert_before(graph[0], flag_nodes)
    logger.debug("switchable model: %d layers, %d flags", len(layers), len(flags))
    return ir.serde.serialize_model(working)


def _add_error_probe(graph: ir.Graph, names: NameScope, after: ir.Node, dequantized: ir.Value,
                     float_value: ir.Value) -> tuple[str, str]:
    """Scalar outputs ``Σ(dequantized − float)²`` and ``Σ float²`` (float32 sums), computed after ``after``."""
    difference = ir.node("Sub", [dequantized, float_value], name=names.fresh(f"{dequantized.name}_error"))
    error = ir.node("ReduceSumSquare", [difference.outputs[0]], {"keepdims": 0},
                    name=names.fresh(f"{dequantized.name}_error_power"))
    signal = ir.node("ReduceSumSquare", [float_value], {"keepdims": 0},
                     name=names.fresh(f"{dequantized.name}_signal_power"))
    for node in (difference, error, signal):
        node.outputs[0].name = node.name
        node.outputs[0].type = float_value.type
    graph.insert_after(after, [difference, error, signal])
    for node in (error, signal):
        node.outputs[0].shape = ir.Shape([])
        graph.outputs.append(node.outputs[0])
    return error.outputs[0].name, signal.outputs[0].name


def _float_constant(graph: ir.Graph, model: ir.Model, name: str) -> ir.Value:
    """The float weight/bias ``name`` in ``graph``, registered again from ``model`` when QDQ dropped it."""
    if name in graph.initializers:
        return graph.initializers[name]
    original = next(initializers[name] for initializers in (each.initializers for each in model.graphs())
                    if name in initializers)
    value = ir.Value(name=name, const_value=original.const_value)
    value.type = original.type
    value.shape = original.shape
    graph.register_initializer(value)
    return value
