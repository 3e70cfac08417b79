"""qgraph's canonicalization passes inside a plain onnx-ir PassManager, the way another toolchain would embed them.

The embedding code below knows nothing of qgraph except the pass classes: it loads with ``onnx_ir.load``, runs an
``onnx_ir.passes.PassManager`` and saves with ``onnx_ir.save``. The test around it checks the result with onnx's
checker and onnxruntime directly.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

# The only qgraph imports: the pass classes.
from qgraph.passes.canonicalize.decompose_batch_norm import DecomposeBatchNorm
from qgraph.passes.canonicalize.eliminate_dead_code import EliminateDeadCode
from qgraph.passes.canonicalize.eliminate_identity import EliminateIdentity
from qgraph.passes.canonicalize.fold_batch_norm import FoldBatchNorm
from qgraph.passes.canonicalize.fold_constants import FoldConstants
from qgraph.passes.canonicalize.lift_constants import LiftConstants
from qgraph.passes.canonicalize.merge_bias_add import MergeBiasAdd


def conv_bn_model() -> onnx.ModelProto:
    """Conv (weight from a Constant node, bias initializer) → BatchNorm → Identity → Relu."""
    generator = np.random.default_rng(7)
    weight = generator.standard_normal((6, 3, 3, 3)).astype(np.float32)
    initializers = [
        numpy_helper.from_array(generator.standard_normal(6).astype(np.float32), "conv_bias"),
        numpy_helper.from_array(generator.uniform(0.5, 1.5, 6).astype(np.float32), "gamma"),
        numpy_helper.from_array(generator.standard_normal(6).astype(np.float32), "beta"),
        numpy_helper.from_array(generator.standard_normal(6).astype(np.float32), "mean"),
        numpy_helper.from_array(generator.uniform(0.5, 2.0, 6).astype(np.float32), "variance"),
    ]
    nodes = [
        helper.make_node("Constant", [], ["weight"], value=numpy_helper.from_array(weight, "weight")),
        helper.make_node("Conv", ["input", "weight", "conv_bias"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "variance"], ["normalized"],
                         epsilon=1e-3),
        helper.make_node("Identity", ["normalized"], ["copy"]),
        helper.make_node("Relu", ["copy"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "embedding",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 6, 8, 8])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def embedder_canonicalize(source: str, destination: str) -> onnx_ir.passes.PassResult:
    """What a foreign toolchain writes: onnx-ir's own load, PassManager and save, with qgraph's pass classes."""
    model = onnx_ir.load(source)
    manager = onnx_ir.passes.PassManager(
        [
            LiftConstants(),
            EliminateIdentity(),
            FoldConstants(),
            MergeBiasAdd(),
            FoldBatchNorm(),
            DecomposeBatchNorm(),
            EliminateDeadCode(),
        ],
        steps=3,
    )
    result = manager(model)
    onnx_ir.save(result.model, destination)
    return result


def run(path_or_proto, feeds):
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(path_or_proto, onnx.ModelProto):
        path_or_proto = path_or_proto.SerializeToString()
    session = onnxruntime.InferenceSession(path_or_proto, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_plain_onnx_ir_pass_manager_runs_qgraph_passes(tmp_path):
    original = conv_bn_model()
    onnx.checker.check_model(original, full_check=True)
    source, destination = tmp_path / "model.onnx", tmp_path / "canonical.onnx"
    onnx.save(original, source)

    result = embedder_canonicalize(str(source), str(destination))

    assert result.modified
    produced = onnx.load(destination)
    onnx.checker.check_model(produced, full_check=True)
    operators = [node.op_type for node in produced.graph.node]
    assert "BatchNormalization" not in operators
    assert "Identity" not in operators and "Constant" not in operators
    assert operators == ["Conv", "Relu"]
    # Only what the graph reads is left: the folded weight and bias.
    assert len(produced.graph.initializer) == 2

    feeds = {"input": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(produced, feeds), run(original, feeds), rtol=1e-4, atol=1e-5)


def test_the_passes_are_plain_onnx_ir_passes():
    for pass_class in (LiftConstants, EliminateIdentity, FoldConstants, MergeBiasAdd, FoldBatchNorm,
                       DecomposeBatchNorm, EliminateDeadCode):
        assert issubclass(pass_class, onnx_ir.passes.InPlacePass)
        instance = pass_class()
        assert instance.in_place and instance.changes_input
