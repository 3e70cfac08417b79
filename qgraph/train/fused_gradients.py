"""Fused backward kernels for QAT's learnable activation quantizers, swapped into the written training graph.

The gradient of a learnable activation quantizer (``com.microsoft::PassThrough(t̂, t, S, low, high)``, see
:func:`qgraph.train.ort_training.register_gradient_overrides`) is, for the input and the scale,

    dt = dY · 1[low ≤ t ≤ high]                       (straight-through estimator)
    dS = Σ (dY · t̂ − dt · t) / S                       (LSQ)

which onnxruntime-training builds from nine kernels: ``Clip``, ``Equal``, ``FakeQuantGrad``, ``Identity``, two
``Mul``, ``Sub``, ``ReduceSum`` and ``Div``, each a pass over the tensor (about 280 µs for 200,704 values here,
``FakeQuantGrad`` alone 105 µs). ``qgraph.training::QuantizerGradient`` (``_quantizer_gradient.c``, an onnxruntime
custom-operator library built with the package) computes both in one pass (about 50 µs).

``generate_artifacts`` cannot emit it: its gradient builder resolves every node against onnxruntime's registered
schemas, and a custom operator has none there ("is not a registered function/op"). So the gradient is generated with
the nine-kernel definition, then :func:`fuse_quantizer_gradients` replaces each group of those nodes in
``training_model.onnx`` by one ``QuantizerGradient`` node, and training sessions load the library
(:func:`library_path`). Where the library was not built (no C compiler), the graph keeps the nine kernels; the two
compute the same input gradients bit for bit and the same scale gradient up to float32 rounding of the sum (the
fused kernel sums in double).
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
_LIBRARY_MODULE = "qgraph.train._quantizer_gradient"
#: The nodes of the registered PassThrough gradient, in definition order (their names end in ``_<index>``).
_GRADIENT_NODES = ("Clip", "Equal", "FakeQuantGrad", "Identity", "Mul", "Mul", "Sub", "ReduceSum", "Div")


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


def uses_fused_gradients(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds a node that needs the library."""
    return any(node.domain == DOMAIN for node in model.graph.node)


def fuse_quantizer_gradients(path: str | os.PathLike) -> int:
    """Replace each activation quantizer's nine-kernel gradient in the training model at ``path``; returns how many.

    The model is rewritten in place only if at least one group was replaced. External data (a model over 2 GB) is
    left where it is: only the graph is read and written.
    """
    path = Path(path)
    model = onnx.load(path, load_external_data=False)
    nodes = list(model.graph.node)
    by_name = {node.name: index for index, node in enumerate(nodes)}
    consumers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    graph_outputs = {output.name for output in model.graph.output}
    removed: set[int] = set()
    placed: dict[int, onnx.NodeProto] = {}
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
    logger.debug("fused the gradients of %d activation quantizers in %s", len(placed), path)
    return len(placed)
