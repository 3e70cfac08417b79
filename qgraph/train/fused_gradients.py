"""Fused kernels for QAT's learnable activation quantizers, swapped into the written training graph.

A learnable activation quantizer runs forward as ``com.microsoft`` QuantizeLinear → DequantizeLinear →
``PassThrough(t̂, t, S, low, high)`` (see :func:`qgraph.train.ort_training.register_gradient_overrides`), and its
gradient, for the input and the scale, is

    dt = dY · 1[low ≤ t ≤ high]                       (straight-through estimator)
    dS = Σ (dY · t̂ − dt · t) / S                       (LSQ)

which onnxruntime-training builds from nine kernels: ``Clip``, ``Equal``, ``FakeQuantGrad``, ``Identity``, two
``Mul``, ``Sub``, ``ReduceSum`` and ``Div``, each a pass over the tensor (about 280 µs for 200,704 values here,
``FakeQuantGrad`` alone 105 µs). ``_quantizer_gradient.c``, an onnxruntime custom-operator library built with the
package, holds ``qgraph.training::QuantizerGradient``, which computes both in one pass (about 50 µs), and
``qgraph.training::FakeQuantize``, the QuantizeLinear → DequantizeLinear pair in one pass, bit for bit (31 against
21 µs).

``generate_artifacts`` cannot emit them: its gradient builder resolves every node against onnxruntime's registered
schemas, and a custom operator has none there ("is not a registered function/op"). So the graph is generated with
onnxruntime's operators, then :func:`fuse_quantizers` rewrites ``training_model.onnx`` (the eval model, which
export reads, keeps them), and training sessions load the library (:func:`library_path`). Where the library was not
built (no C compiler), the graph keeps onnxruntime's kernels; the two compute the same values and input gradients
bit for bit, and the same scale gradient up to the float32 rounding of the sum (the fused kernel sums in double).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
from pathlib import Path

import onnx
from onnx import helper

logger = logging.getLogger(__name__)

DOMAIN = "qgraph.training"
OPERATOR = "QuantizerGradient"
FORWARD_OPERATOR = "FakeQuantize"
_LIBRARY_MODULE = "qgraph.train._quantizer_gradient"
#: The nodes of the registered PassThrough gradient, in definition order (their names end in ``_<index>``).
_GRADIENT_NODES = ("Clip", "Equal", "FakeQuantGrad", "Identity", "Mul", "Mul", "Sub", "ReduceSum", "Div")
_EIGHT_BIT_TYPES = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)


#: The library, loaded once for the life of the process (see :func:`library_path`).
_loaded: list[ctypes.CDLL] = []


@functools.cache
def library_path() -> str | None:
    """The built custom-operator library, or None when the package was installed without a C compiler.

    The library is also loaded here and never unloaded: each ``SessionOptions.register_custom_ops_library`` opens
    it once more and closes it when the options object is collected, which, with no other reference, unmapped the
    kernels of sessions still running (a segmentation fault).
    """
    spec = importlib.util.find_spec(_LIBRARY_MODULE)
    if spec is None or spec.origin is None or not os.path.isfile(spec.origin):
        return None
    try:
        _loaded.append(ctypes.CDLL(spec.origin))
    except OSError as error:
        logger.warning("qgraph's fused QAT gradient library %s did not load (%s): using onnxruntime's kernels",
                       spec.origin, error)
        return None
    return spec.origin


def fuse_quantizers(path: str | os.PathLike) -> int:
    """Fuse each activation quantizer of the training model at ``path`` (forward pair, gradient); returns how many
    quantizers changed.

    The model is rewritten in place only if something was replaced. External data (a model over 2 GB) is left
    where it is: only the graph is read and written.
    """
    path = Path(path)
    model = onnx.load(path, load_external_data=False)
    nodes = list(model.graph.node)
    by_name = {node.name: index for index, node in enumerate(nodes)}
    producers = {output: index for index, node in enumerate(nodes) for output in node.output}
    consumers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    graph_outputs = {output.name for output in model.graph.output}
    zero_point_types = {tensor.name: tensor.data_type for tensor in model.graph.initializer}
    removed: set[int] = set()
    placed: dict[int, onnx.NodeProto] = {}
    changed: set[str] = set()  # the PassThrough nodes whose quantizer was fused
    for node in nodes:
        if node.op_type != "PassThrough" or node.domain != "com.microsoft":
            continue
        group = [by_name.get(f"{node.name}_Grad/{op_type}_{index}") for index, op_type in enumerate(_GRADIENT_NODES)]
        if any(index is None for index in group):
            continue
        members = [nodes[index] for index in group]
        if [member.op_type for member in members] != list(_GRADIENT_NODES):
            continue
        clip, _, mask_gradient, identity, output_products, _, _, _, divide = members
        inputs = [
            mask_gradient.input[0],  # dY
            clip.input[0],  # t
            output_products.input[1],  # t̂
            divide.input[1],  # S
            clip.input[1],  # low
            clip.input[2],  # high
        ]
        outputs = [identity.output[0], divide.output[0]]
        internal = {name for member in members for name in member.output} - set(outputs)
        # an intermediate read outside the group would lose its producer
        inside = {name: sum(name in member.input for member in members) for name in internal}
        if any(consumers.get(name, 0) != inside[name] or name in graph_outputs for name in internal):
            continue
        removed.update(group)
        placed[max(group)] = helper.make_node(
            OPERATOR, inputs, outputs, name=f"{node.name}_Grad/{OPERATOR}", domain=DOMAIN
        )
        changed.add(node.name)
    for node in nodes:  # the forward pairs: QuantizeLinear → DequantizeLinear → PassThrough
        if node.op_type != "PassThrough" or node.domain != "com.microsoft":
            continue
        dequantize_index = producers.get(node.input[0])
        if dequantize_index is None:
            continue
        dequantize = nodes[dequantize_index]
        quantize_index = producers.get(dequantize.input[0])
        if dequantize.op_type != "DequantizeLinear" or dequantize.domain != "com.microsoft" or quantize_index is None:
            continue
        quantize = nodes[quantize_index]
        if (
            quantize.op_type != "QuantizeLinear"
            or quantize.domain != "com.microsoft"
            or len(quantize.input) != 3
            or list(quantize.input[1:]) != list(dequantize.input[1:3])
            or zero_point_types.get(quantize.input[2]) not in _EIGHT_BIT_TYPES  # the kernel's code ranges
            or consumers.get(quantize.output[0]) != 1
            or quantize.output[0] in graph_outputs
            or any(attribute.name == "axis" for attribute in quantize.attribute)
        ):
            continue
        removed.add(quantize_index)
        removed.add(dequantize_index)
        placed[dequantize_index] = helper.make_node(
            FORWARD_OPERATOR, list(quantize.input), [dequantize.output[0]],
            name=f"{dequantize.name}/{FORWARD_OPERATOR}", domain=DOMAIN,
        )
        changed.add(node.name)
    if not placed:
        return 0
    rewritten = []
    for index, node in enumerate(nodes):
        if index in placed:  # the group's last node: every input of the group is computed by then
            rewritten.append(placed[index])
        elif index not in removed:
            rewritten.append(node)
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    if not any(opset.domain == DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    onnx.save(model, path)
    logger.debug("fused %d activation quantizers in %s", len(changed), path)
    return len(changed)
