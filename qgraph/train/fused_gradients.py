"""Fused kernels for QAT's learnable activation quantizers, swapped into the written training graph.

A learnable activation quantizer runs forward as ``com.microsoft`` QuantizeLinear → DequantizeLinear →
``PassThrough(t̂, t, S, low, high)`` (see :func:`qgraph.train.ort_training.register_gradient_overrides`), and its
gradient, for the input and the scale, is

    dt = dY · 1[low ≤ t ≤ high]                       (straight-through estimator)
    dS = Σ (dY · t̂ − dt · t) / S                       (LSQ)

which onnxruntime-training builds from nine kernels: ``Clip``, ``Equal``, ``FakeQuantGrad``, ``Identity``, two
``Mul``, ``Sub``, ``ReduceSum`` and ``Div``, each a pass over the tensor (about 280 µs for 200,704 values here,
``FakeQuantGrad`` alone 105 µs). ``qgraph/native/quantizer_gradient.c``, an onnxruntime custom-operator library built
with the package, holds ``qgraph.training::QuantizerGradient``, which computes both in one pass (about 50 µs), and
``qgraph.training::FakeQuantize``, the QuantizeLinear → DequantizeLinear pair in one pass, bit for bit (31
against 21 µs).

``generate_artifacts`` cannot emit them: its gradient builder resolves every node against onnxruntime's registered
schemas, and a custom operator has none there ("is not a registered function/op"). So the graph is generated with
onnxruntime's operators, then :func:`fuse_quantizers` rewrites ``training_model.onnx`` (the eval model, which
export reads, keeps them), and training sessions load the library (:func:`library_path`). Where the library was not
built (no C compiler), the graph keeps onnxruntime's kernels; the two compute the same values and input gradients
bit for bit, and the same scale gradient up to the float32 rounding of the sum (the fused kernel sums in double).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import onnx
from onnx import helper

from qgraph.native import custom_operator_library

logger = logging.getLogger(__name__)

DOMAIN = "qgraph.training"
OPERATOR = "QuantizerGradient"
FORWARD_OPERATOR = "FakeQuantize"
_LIBRARY_MODULE = "qgraph.native._quantizer_gradient"
#: The nodes of the registered PassThrough gradient, in definition order (their names end in ``_<index>``).
_GRADIENT_NODES = ("Clip", "Equal", "FakeQuantGrad", "Identity", "Mul", "Mul", "Sub", "ReduceSum", "Div")
_EIGHT_BIT_TYPES = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)


def library_path() -> str | None:
    """The built custom-operator library, or None when the package was installed without a C compiler."""
    return custom_operator_library(_LIBRARY_MODULE)


@dataclasses.dataclass
class _GraphIndex:
    """Lookups over a training graph's node list, by position."""

    nodes: list[onnx.NodeProto]
    by_name: dict[str, int]
    producers: dict[str, int]
    consumers: dict[str, int]  # how many node inputs read each name
    graph_outputs: set[str]
    initializer_types: dict[str, int]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _GraphIndex:
        nodes = list(model.graph.node)
        consumers: dict[str, int] = {}
        for node in nodes:
            for name in node.input:
                consumers[name] = consumers.get(name, 0) + 1
        return cls(
            nodes,
            {node.name: index for index, node in enumerate(nodes)},
            {output: index for index, node in enumerate(nodes) for output in node.output},
            consumers,
            {output.name for output in model.graph.output},
            {tensor.name: tensor.data_type for tensor in model.graph.initializer},
        )


def _fused_gradient(graph: _GraphIndex, pass_through: onnx.NodeProto) -> tuple[list[int], onnx.NodeProto] | None:
    """The positions of ``pass_through``'s nine-kernel gradient and the node that replaces them, if it applies."""
    group = [graph.by_name.get(f"{pass_through.name}_Grad/{op_type}_{index}")
             for index, op_type in enumerate(_GRADIENT_NODES)]
    if any(index is None for index in group):
        return None
    members = [graph.nodes[index] for index in group]
    if [member.op_type for member in members] != list(_GRADIENT_NODES):
        return None
    clip, _, mask_gradient, identity, output_products, _, _, _, divide = members
    outputs = [identity.output[0], divide.output[0]]
    # an intermediate read outside the group would lose its producer
    internal = {name for member in members for name in member.output} - set(outputs)
    for name in internal:
        readers = sum(name in member.input for member in members)
        if graph.consumers.get(name, 0) != readers or name in graph.graph_outputs:
            return None
    inputs = [
        mask_gradient.input[0],  # dY
        clip.input[0],  # t
        output_products.input[1],  # t̂
        divide.input[1],  # S
        clip.input[1],  # low
        clip.input[2],  # high
    ]
    return group, helper.make_node(OPERATOR, inputs, outputs, name=f"{pass_through.name}_Grad/{OPERATOR}",
                                   domain=DOMAIN)


def _fused_forward(graph: _GraphIndex, pass_through: onnx.NodeProto) -> tuple[list[int], onnx.NodeProto] | None:
    """The positions of the QuantizeLinear → DequantizeLinear pair feeding ``pass_through`` and its replacement."""
    dequantize_index = graph.producers.get(pass_through.input[0])
    if dequantize_index is None:
        return None
    dequantize = graph.nodes[dequantize_index]
    quantize_index = graph.producers.get(dequantize.input[0])
    if dequantize.op_type != "DequantizeLinear" or dequantize.domain != "com.microsoft" or quantize_index is None:
        return None
    quantize = graph.nodes[quantize_index]
    if (
        quantize.op_type != "QuantizeLinear"
        or quantize.domain != "com.microsoft"
        or len(quantize.input) != 3
        or list(quantize.input[1:]) != list(dequantize.input[1:3])
        or graph.initializer_types.get(quantize.input[2]) not in _EIGHT_BIT_TYPES  # the kernel's code ranges
        or graph.consumers.get(quantize.output[0]) != 1
        or quantize.output[0] in graph.graph_outputs
        or any(attribute.name == "axis" for attribute in quantize.attribute)
    ):
        return None
    return [quantize_index, dequantize_index], helper.make_node(
        FORWARD_OPERATOR, list(quantize.input), [dequantize.output[0]], name=f"{dequantize.name}/{FORWARD_OPERATOR}",
        domain=DOMAIN,
    )


def fuse_quantizers(path: str | os.PathLike) -> int:
    """Fuse each activation quantizer of the training model at ``path`` (forward pair, gradient); returns how many
    quantizers changed.

    The model is rewritten in place only if something was replaced. External data (a model over 2 GB) is left
    where it is: only the graph is read and written.
    """
    path = Path(path)
    model = onnx.load(path, load_external_data=False)
    graph = _GraphIndex.of(model)
    removed: set[int] = set()
    # each replacement goes to the last position of what it replaces: every input it reads is computed by then
    placed: dict[int, onnx.NodeProto] = {}
    changed = 0
    for node in graph.nodes:
        if node.op_type != "PassThrough" or node.domain != "com.microsoft":
            continue
        fusions = [fusion for fusion in (_fused_gradient(graph, node), _fused_forward(graph, node)) if fusion]
        for positions, replacement in fusions:
            removed.update(positions)
            placed[max(positions)] = replacement
        changed += bool(fusions)
    if not placed:
        return 0
    rewritten = [placed[index] if index in placed else node
                 for index, node in enumerate(graph.nodes) if index in placed or index not in removed]
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    if not any(opset.domain == DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    onnx.save(model, path)
    logger.debug("fused %d activation quantizers in %s", changed, path)
    return changed
