"""InsertQuantizeDequantize: write a calibrated quantization plan into the graph as QDQ (docs/qdq-format.md).

For an activation ``t`` with parameters (s, z)::

    t ─▶ QuantizeLinear(t, s, z) ─▶ DequantizeLinear(·, s, z) ─▶ every former consumer of t

so each consumer computes on ``s · (clamp(round(t / s) + z, qmin, qmax) − z)``, exactly what the integer kernel
will see. A graph output keeps its name and its float value. A weight ``W`` becomes ``Wq = clamp(round(W / s_w) +
z_w)`` stored as int8 and read through one DequantizeLinear on its channel axis; a bias becomes
``bq = round(b / (s_x · s_w))`` stored as int32 (scale ``s_x · s_w``, zero point 0), so that the integer accumulator
of ``x_q · W_q`` and ``bq`` share one scale. A weight that several planned consumers read (tied weights) is stored
once per consumer, each copy behind its own DequantizeLinear, as the QDQ form wants one DequantizeLinear per reader.
The pass is idempotent: a tensor already followed by a
QuantizeLinear → DequantizeLinear pair, or a weight already read through a DequantizeLinear, is left alone.

If branches are quantized too (see :mod:`qgraph.ir.subgraphs`): the pass visits the main graph and then every
branch, recursively. An activation is quantized in the graph that defines it, so when a branch reads (captures) a
quantized outer value, its readers inside the branch read the outer DequantizeLinear output like any other reader.
A weight or bias is found among its consumer's inputs (a branch may read an initializer of an enclosing graph) and
stored quantized in the consumer's graph.

Every name the pass writes (initializers, Q/DQ outputs, nodes) comes from one model-wide
:class:`~qgraph.ir.naming.NameScope`, since ONNX forbids a branch to reuse a name of an enclosing scope and the model
may already hold a name such as ``t_quantized``: ``t_quantized``/``t_dequantized`` when free, else with a suffix. So
code that looks for the DequantizeLinear of a planned tensor asks :func:`dequantized_tensors`, which follows the
graph, instead of building the name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult

from qgraph.ir.edit import drop_unused_initializers, new_initializer
from qgraph.ir.naming import NameScope
from qgraph.ir.subgraphs import quantized_graphs
from qgraph.ir.traversal import defined_values
from qgraph.ir.values import default_opset, is_constant
from qgraph.passes.infrastructure import Phase, QGraphPass, register

logger = logging.getLogger(__name__)

_INT32_LIMIT = 2**31 - 1


def _input_named(node: ir.Node, name: str) -> ir.Value | None:
    return next((value for value in node.inputs if value is not None and value.name == name), None)


def _pair_dequantizer(value: ir.Value) -> ir.Node | None:
    """The DequantizeLinear of the QuantizeLinear → DequantizeLinear pair that reads ``value`` (None: no pair)."""
    for consumer in value.consumers():
        if consumer.op_type == "QuantizeLinear":
            return next((node for node in consumer.outputs[0].consumers() if node.op_type == "DequantizeLinear"), None)
    return None


def _constant_dequantizers(consumer: ir.Node, *, bias: bool) -> list[ir.Node]:
    """The DequantizeLinear nodes of stored constants that ``consumer`` reads: int32 biases, or the other weights."""
    found = []
    for value in consumer.inputs:
        dequantize = value.producer() if value is not None else None
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or not is_constant(dequantize.inputs[0]):
            continue
        if (dequantize.inputs[0].const_value.dtype == ir.DataType.INT32) == bias:
            found.append(dequantize)
    return found


def dequantized_tensors(model: ir.Model, plan) -> dict[ir.Node, str]:
    """Each DequantizeLinear that this pass wrote into ``model`` for ``plan``, and the planned tensor it stands for.

    The answer follows the graph, not the names the pass chose (a fresh name may carry a suffix): an activation
    ``t`` is the input of the QuantizeLinear whose DequantizeLinear is its pair; a weight (bias) is the stored
    non-int32 (int32) constant whose DequantizeLinear its planned consumer reads. The annotator plans at most one
    weight and one bias per consumer; a consumer with several planned weights (or biases) cannot be told apart
    from the graph, and those are left out with a warning.
    """
    found: dict[ir.Node, str] = {}
    for graph in quantized_graphs(model.graph):
        values = defined_values(graph)
        for tensor in plan.activations:
            value = values.get(tensor)
            dequantize = _pair_dequantizer(value) if value is not None else None
            if dequantize is not None:
                found.setdefault(dequantize, tensor)
        nodes = {node.name: node for node in graph if node.name}
        for entries, bias in ((plan.weights, False), (plan.biases, True)):
            by_consumer: dict[str, list[str]] = {}
            for entry in entries:
                if entry.consumer in nodes:
                    by_consumer.setdefault(entry.consumer, []).append(entry.name)
            for consumer, tensors in by_consumer.items():
                dequantizers = _constant_dequantizers(nodes[consumer], bias=bias)
                if len(set(tensors)) > 1 or len(dequantizers) > 1:
                    logger.warning("%s: node %r reads %d stored %s for the planned %s; they are not told apart",
                                   InsertQuantizeDequantize.__name__, consumer, len(dequantizers),
                                   "biases" if bias else "weights", ", ".join(sorted(set(tensors))))
                    continue
                for dequantize in dequantizers:
                    found.setdefault(dequantize, tensors[0])
    return found


def _parameter_arrays(params) -> tuple[np.ndarray, np.ndarray]:
    scale = np.asarray(params.scale, dtype=np.float32)
    zero_point = np.asarray(params.zero_point)
    return scale, zero_point


@register
class InsertQuantizeDequantize(QGraphPass):
    """Write QuantizeLinear/DequantizeLinear pairs, int8 weights and int32 biases from a calibrated plan."""

    phase = Phase.QUANTIZE

    def __init__(self, *, plan, parameters: Mapping[str, object]) -> None:
        super().__init__()
        self.plan = plan
        self.parameters = parameters

    def requires(self, model: ir.Model) -> None:
        opset = default_opset(model)
        if opset < 13:
            raise ir.passes.PreconditionError(f"QDQ with per-channel weights needs opset >= 13, the model has {opset}")

    def call(self, model: ir.Model) -> PassResult:
        names = NameScope(model, node_names=True)
        modified = False
        graphs = list(quantized_graphs(model.graph))
        for graph in graphs:
            modified = self._quantize_graph(graph, names) or modified
        if modified:
            for graph in graphs:
                drop_unused_initializers(graph.initializers.values())
        return PassResult(model, modified)

    def _quantize_graph(self, graph: ir.Graph, names: NameScope) -> bool:
        values = defined_values(graph)
        modified = False
        for tensor in self.plan.activations:
            value = values.get(tensor)
            if value is None or value.is_initializer() and value.graph is not graph:
                continue
            if tensor not in self.parameters or _pair_dequantizer(value) is not None:
                continue
            self._quantize_activation(graph, names, value, self.parameters[tensor])
            modified = True
        nodes = {node.name: node for node in graph}
        for weight in self.plan.weights:
            consumer = nodes.get(weight.consumer)
            value = _input_named(consumer, weight.name) if consumer is not None else None
            if not is_constant(value) or weight.name not in self.parameters:
                continue
            self._quantize_weight(graph, names, consumer, value, weight.axis, self.parameters[weight.name])
            modified = True
        for bias in self.plan.biases:
            consumer = nodes.get(bias.consumer)
            value = _input_named(consumer, bias.name) if consumer is not None else None
            if not is_constant(value):
                continue
            if bias.activation not in self.parameters or bias.weight not in self.parameters:
                continue
            self._quantize_bias(
                graph, names, consumer, value, self.parameters[bias.activation], self.parameters[bias.weight]
            )
            modified = True
        return modified

    def _quantize_activation(self, graph: ir.Graph, names: NameScope, value: ir.Value, params) -> None:
        scale, zero_point = _parameter_arrays(params)
        scale_value = new_initializer(graph, names, f"{value.name}_scale", scale.reshape(()))
        zero_value = new_initializer(graph, names, f"{value.name}_zero_point", zero_point.reshape(()))
        uses = [(node, index) for node, index in value.uses()]
        quantize = ir.node(
            "QuantizeLinear", [value, scale_value, zero_value], name=names.fresh(f"{value.name}_QuantizeLinear")
        )
        quantize.outputs[0].name = names.fresh(f"{value.name}_quantized")
        quantize.outputs[0].shape = value.shape
        quantize.outputs[0].type = ir.TensorType(zero_value.const_value.dtype)
        dequantize = ir.node(
            "DequantizeLinear", [quantize.outputs[0], scale_value, zero_value],
            name=names.fresh(f"{value.name}_DequantizeLinear"),
        )
        dequantize.outputs[0].name = names.fresh(f"{value.name}_dequantized")
        dequantize.outputs[0].shape = value.shape
        dequantize.outputs[0].type = value.type
        producer = value.producer()
        if producer is not None:
            graph.insert_after(producer, [quantize, dequantize])
        else:
            graph.insert_before(graph[0], [quantize, dequantize])
        for node, index in uses:
            node.replace_input_with(index, dequantize.outputs[0])

    def _quantize_weight(
        self, graph: ir.Graph, names: NameScope, consumer: ir.Node, value: ir.Value, axis, params
    ) -> None:
        from qgraph.quant.numerics import quantize

        scale, zero_point = _parameter_arrays(params)
        weights = value.const_value.numpy()
        quantized = quantize(weights, params, clip_to_spec=True)
        quantized_value = new_initializer(graph, names, f"{value.name}_quantized", quantized)
        per_channel = scale.ndim == 1 and scale.size > 1
        scale_value = new_initializer(
            graph, names, f"{value.name}_scale", scale if per_channel else scale.reshape(())
        )
        zero_value = new_initializer(
            graph, names, f"{value.name}_zero_point", zero_point if per_channel else zero_point.reshape(())
        )
        attributes = {"axis": axis} if per_channel else {}
        _dequantize_for(graph, names, consumer, value, [quantized_value, scale_value, zero_value], attributes)

    def _quantize_bias(
        self, graph: ir.Graph, names: NameScope, consumer: ir.Node, value: ir.Value, activation, weight
    ) -> None:
        activation_scale, _ = _parameter_arrays(activation)
        weight_scale, _ = _parameter_arrays(weight)
        bias = value.const_value.numpy().astype(np.float64)
        scale = (activation_scale.astype(np.float64).reshape(()) * weight_scale.astype(np.float64)).reshape(-1)
        if scale.size == 1:
            scale = np.full(bias.shape, scale[0])
        quantized = np.clip(np.rint(bias / scale), -_INT32_LIMIT, _INT32_LIMIT).astype(np.int32)
        quantized_value = new_initializer(graph, names, f"{value.name}_quantized", quantized)
        scale_value = new_initializer(graph, names, f"{value.name}_scale", scale.astype(np.float32))
        zero_value = new_initializer(graph, names, f"{value.name}_zero_point", np.zeros(bias.shape, np.int32))
        _dequantize_for(graph, names, consumer, value, [quantized_value, scale_value, zero_value], {"axis": 0})


def _dequantize_for(
    graph: ir.Graph, names: NameScope, consumer: ir.Node, value: ir.Value, inputs: list[ir.Value],
    attributes: dict[str, int],
) -> None:
    """A DequantizeLinear of the stored constant ``inputs`` (integers, scale, zero point) standing for the float
    constant ``value`` in ``consumer`` only (another consumer of ``value`` gets a DequantizeLinear of its own)."""
    dequantize = ir.node(
        "DequantizeLinear", inputs, attributes, name=names.fresh(f"{value.name}_DequantizeLinear")
    )
    output = dequantize.outputs[0]
    output.name = names.fresh(f"{value.name}_dequantized")
    output.shape, output.type = ir.Shape(value.const_value.shape), value.type
    graph.insert_before(consumer, dequantize)
    for index, current in enumerate(consumer.inputs):
        if current is value:
            consumer.replace_input_with(index, output)
