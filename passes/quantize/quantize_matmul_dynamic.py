"""QuantizeMatMulDynamic: MatMul/Gemm with a constant weight → onnxruntime's dynamically quantized kernels.

``--activations dynamic`` (or ``auto``, per layer) plans a compute node for this pass instead of static QDQ: its
weight is quantized once, here, and its activation at run time, per call, by the kernel. No calibration range is
needed for such a node. For a weight ``W`` of shape ``[K, N]`` (MatMul; Gemm's ``B`` transposed when ``transB=1``
and multiplied by ``alpha``), symmetric int8 per output column ``n``::

    s_w[n] = max_k |W[k, n]| / qmax        (1 where the column is zero)        W_q = clip(round(W / s_w), −qmax, qmax)

and at run time onnxruntime's ``DynamicQuantizeLinear`` quantizes the activation over its whole range (with 0
representable): ``s_x = (max(x, 0) − min(x, 0)) / 255``, ``z_x = round(−min(x, 0) / s_x)``, ``x_q = clip(round(x / s_x)
+ z_x, 0, 255)`` (uint8). The integer product and the float result are::

    y[m, n] = s_x · s_w[n] · Σ_k (x_q[m, k] − z_x) · W_q[k, n]  +  b[n]

Kernels (onnxruntime contrib operators, com.microsoft opset 1):

- ``DynamicQuantizeMatMul(A, B, b_scale, b_zero_point, bias)``: float ``A``, quantized inside the kernel; used when
  the planned node is the only planned reader of its input;
- ``DynamicQuantizeLinear(x) → MatMulIntegerToFloat(A_q, B, a_scale, b_scale, a_zero_point, b_zero_point, bias)``
  for each of several planned nodes reading the same input (attention's query, key and value projections): the
  activation is quantized once and shared, as onnxruntime's own quantizer writes it.

The bias: a MatMul whose output alone feeds ``Add(·, b)`` (either operand order) with a constant ``b`` of shape
``[N]`` absorbs the Add (``bias`` input); Gemm's ``C`` (times ``beta``) of shape ``[N]`` or a scalar becomes the bias.

``reduce_range`` is carried by ``qmax`` (63 for 7-bit weights on CPUs without VNNI); with ``guard_saturation`` a
weight whose codes exceed ±64 is stored as uint8 ``W_q + 128`` with zero point 128, which onnxruntime runs on its
exact u8·u8 path (see :mod:`qgraph.passes.lower._qdq_patterns`).

Refused (logged, the node stays float): a weight that is not a 2-D float32 constant, Gemm with ``transA=1``, an
input of rank < 2 (MatMul) or not 2 (Gemm), a Gemm bias of another shape.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.ir.edit import drop_unused_initializers, new_initializer
from qgraph.ir.naming import NameScope
from qgraph.ir.values import MICROSOFT_DOMAIN, constant_array, is_op, sole_consumer
from qgraph.passes.infrastructure import register
from qgraph.passes.quantize._dynamic_weights import DynamicWeightPass

#: Largest int8 weight code for which the AVX2 u8·s8 kernels cannot saturate (docs/runtime-facts.md).
SAFE_INT8_WEIGHT_MAGNITUDE = 64


def quantize_columns(weight: np.ndarray, *, qmax: int, per_channel: bool,
                     guard_saturation: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[K, N]`` float → (codes, scales ``[N]`` or scalar, zero points of the codes' type)."""
    weight = weight.astype(np.float32)
    largest = np.max(np.abs(weight), axis=0) if per_channel else np.max(np.abs(weight)).reshape(())
    scale = np.where(largest > 0, largest / qmax, 1.0).astype(np.float32)
    codes = np.clip(np.rint(weight / scale), -qmax, qmax).astype(np.int8)
    if guard_saturation and int(np.abs(codes.astype(np.int16)).max(initial=0)) > SAFE_INT8_WEIGHT_MAGNITUDE:
        return (codes.astype(np.int16) + 128).astype(np.uint8), scale, np.full(scale.shape, 128, np.uint8)
    return codes, scale, np.zeros(scale.shape, np.int8)


def _bias_add(matmul: ir.Node, columns: int) -> tuple[ir.Node, np.ndarray] | None:
    """The ``Add(·, b)`` alone reading the MatMul output, with constant ``b`` of shape ``[N]``."""
    add = sole_consumer(matmul.outputs[0])
    if not is_op(add, "Add"):
        return None
    other = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
    bias = constant_array(other)
    if bias is None or bias.dtype != np.float32 or bias.shape != (columns,):
        return None
    return add, bias


def _plan(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None, ir.Node | None] | str:
    """(weight [K, N], bias or None, the Add absorbed or None), or why the node cannot be lowered."""
    data, weight_value = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    weight = constant_array(weight_value)
    if weight is None or weight.dtype != np.float32 or weight.ndim != 2:
        return "its weight is not a 2-D float32 constant"
    rank = len(data.shape) if data is not None and data.shape is not None else None
    if node.op_type == "MatMul":
        if rank is not None and rank < 2:
            return "its input has rank < 2"
        found = _bias_add(node, weight.shape[1])
        return (weight, found[1], found[0]) if found else (weight, None, None)
    if node.attributes.get_int("transA", 0):
        return "Gemm with transA=1"
    if rank is not None and rank != 2:
        return "Gemm input is not 2-D"
    if node.attributes.get_int("transB", 0):
        weight = weight.T
    weight = weight * np.float32(node.attributes.get_float("alpha", 1.0))
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    if bias_value is None:
        return weight, None, None
    bias = constant_array(bias_value)
    if bias is None or bias.dtype != np.float32 or bias.size not in (1, weight.shape[1]) or bias.ndim > 1:
        return "its bias is not a float32 constant of shape [N] or a scalar"
    bias = np.broadcast_to(bias.reshape(-1) * np.float32(node.attributes.get_float("beta", 1.0)), (weight.shape[1],))
    return weight, np.ascontiguousarray(bias, np.float32), None


@register
class QuantizeMatMulDynamic(DynamicWeightPass):
    """Replace planned MatMul/Gemm nodes by DynamicQuantizeMatMul or shared DynamicQuantizeLinear +
    MatMulIntegerToFloat (int8 weights per column, activations quantized at run time)."""

    summary = "MatMul/Gemm with a constant weight → DynamicQuantizeMatMul/MatMulIntegerToFloat (--activations dynamic)"

    op_types = ("MatMul", "Gemm")
    replacement = "DynamicQuantizeMatMul/MatMulIntegerToFloat (activations quantized at run time)"

    def plan(self, node: ir.Node) -> tuple | str:
        return _plan(node)

    def replace_planned(self, graph: ir.Graph, planned: list[tuple[ir.Node, object]], names: NameScope) -> None:
        """Replace the planned nodes, those reading one activation together (they share its quantization)."""
        groups: dict[int, list[tuple[ir.Node, object]]] = {}
        for node, plan in planned:
            groups.setdefault(id(node.inputs[0]), []).append((node, plan))
        for members in groups.values():
            self._replace_group(graph, members[0][0].inputs[0], members, names)

    def _replace_group(self, graph: ir.Graph, data: ir.Value, members: list, names: NameScope) -> None:
        shared = None
        if len(members) > 1:
            first = members[0][0]
            shared = ir.Node("", "DynamicQuantizeLinear", [data], num_outputs=3,
                             name=names.fresh(f"{data.name}_DynamicQuantizeLinear"))
            for output, suffix, dtype in zip(shared.outputs, ("quantized", "scale", "zero_point"),
                                             (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8)):
                output.name = names.fresh(f"{data.name}_{suffix}")
                output.type = ir.TensorType(dtype)
            shared.outputs[0].shape = data.shape
            shared.outputs[1].shape = ir.Shape([])
            shared.outputs[2].shape = ir.Shape([])
            graph.insert_before(first, shared)
        for node, (weight, bias, add) in members:
            self._replace(graph, node, weight, bias, add, shared, names)

    def _replace(self, graph: ir.Graph, node: ir.Node, weight: np.ndarray, bias: np.ndarray | None,
                 add: ir.Node | None, shared: ir.Node | None, names: NameScope) -> None:
        codes, scale, zero_point = quantize_columns(weight, qmax=self.qmax, per_channel=self.per_channel,
                                                    guard_saturation=self.guard_saturation)
        base = node.name or "matmul"
        weight_value = new_initializer(graph, names, f"{base}_weight_quantized", codes)
        scale_value = new_initializer(graph, names, f"{base}_weight_scale", scale)
        zero_value = new_initializer(graph, names, f"{base}_weight_zero_point", zero_point)
        bias_value = new_initializer(graph, names, f"{base}_bias", bias) if bias is not None else None
        if shared is None:
            inputs = [node.inputs[0], weight_value, scale_value, zero_value, bias_value]
            op_type = "DynamicQuantizeMatMul"
        else:
            quantized, activation_scale, activation_zero = shared.outputs
            inputs = [quantized, weight_value, activation_scale, scale_value, activation_zero, zero_value, bias_value]
            op_type = "MatMulIntegerToFloat"
        while inputs and inputs[-1] is None:
            inputs.pop()
        replacement = ir.Node(MICROSOFT_DOMAIN, op_type, inputs, name=names.fresh(f"{base}_{op_type}"))
        replaced = add if add is not None else node
        old = replaced.outputs[0]
        new = replacement.outputs[0]
        new.type, new.shape = old.type, old.shape
        graph.insert_before(node, replacement)
        originals = [value for value in node.inputs[1:] if value is not None]
        if add is not None:
            originals += [value for value in add.inputs if value is not None and value.is_initializer()]
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        if add is not None:
            graph.remove(add, safe=True)
        graph.remove(node, safe=True)
        new.name = name  # the tensor keeps its name: a graph output stays one, readers see the same edge
        drop_unused_initializers(originals)
