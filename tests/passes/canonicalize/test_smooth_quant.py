"""SmoothQuant: exact in FP32 for every way 1/s is absorbed, outlier test, refusals, and the quantized gain."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph import runtime
from qgraph.passes.canonicalize.smooth_quant import SmoothQuant, has_outliers, smoothing_scales
from qgraph.testing import check_pass

RNG = np.random.default_rng(0)
K, N = 16, 8


def _initializer(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _graph(nodes, initializers, outputs=("y",)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, K])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 3, N if name == "y" else K])
                               for name in outputs],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _statistics(proto, tensor, feeds):
    """max |tensor| per channel, read from a model exposing it."""
    exposed = onnx.ModelProto.FromString(proto.SerializeToString())
    exposed.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    value = runtime.run(runtime.create_session(exposed), feeds)[tensor]
    return np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)


def _outlier_input():
    x = RNG.standard_normal((2, 3, K)).astype(np.float32)
    x[..., [2, 9]] *= 80.0
    return {"x": x}


def _layer_norm_model(extra_reader: bool):
    gamma = RNG.uniform(0.5, 1.5, K)
    gamma[[2, 9]] = 80.0
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1),
             helper.make_node("MatMul", ["h", "wq"], ["q"]), helper.make_node("MatMul", ["h", "wk"], ["k"]),
             helper.make_node("Add", ["q", "k"], ["y"])]
    outputs = ["y"]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["h"], ["r"]))
        outputs.append("r")
    initializers = [_initializer("gamma", gamma), _initializer("beta", RNG.standard_normal(K)),
                    _initializer("wq", RNG.standard_normal((K, N))), _initializer("wk", RNG.standard_normal((K, N)))]
    return _graph(nodes, initializers, outputs)


def test_folds_into_layer_norm_gamma_and_beta_exactly():
    proto = _layer_norm_model(extra_reader=False)
    feeds = _outlier_input()
    statistics = {"h": _statistics(proto, "h", feeds)}
    check = check_pass(proto, SmoothQuant(alpha=0.5, statistics=statistics), feeds=feeds, rtol=1e-4, atol=1e-4)
    assert Counter(node.op_type for node in check.proto.graph.node) == {"LayerNormalization": 1, "MatMul": 2,
                                                                        "Add": 1}
    gamma = next(numpy_helper.to_array(t) for t in check.proto.graph.initializer
                 if t.name == check.proto.graph.node[0].input[1])
    assert gamma[2] < 80.0 / 2  # the outlier channel's scale moved into the weights


def test_another_reader_gets_an_explicit_mul_in_front_of_the_matmuls_only():
    proto = _layer_norm_model(extra_reader=True)
    feeds = _outlier_input()
    statistics = {"h": _statistics(proto, "h", feeds)}
    check = check_pass(proto, SmoothQuant(alpha=0.5, statistics=statistics), feeds=feeds, rtol=1e-4, atol=1e-4)
    mul = next(node for node in check.proto.graph.node if node.op_type == "Mul")
    relu = next(node for node in check.proto.graph.node if node.op_type == "Relu")
    assert relu.input[0] == "h"
    assert all(node.input[0] == mul.output[0] for node in check.proto.graph.node if node.op_type == "MatMul")


def test_folds_into_a_preceding_matmul_and_bias():
    weight = RNG.standard_normal((K, K))
    weight[:, [3, 11]] *= 60.0
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["p"]), helper.make_node("Add", ["b0", "p"], ["h"]),
             helper.make_node("MatMul", ["h", "w1"], ["y"])]
    proto = _graph(nodes, [_initializer("w0", weight), _initializer("b0", RNG.standard_normal(K)),
                           _initializer("w1", RNG.standard_normal((K, N)))])
    feeds = {"x": RNG.standard_normal((2, 3, K)).astype(np.float32)}
    check = check_pass(proto, SmoothQuant(alpha=0.5, statistics={"h": _statistics(proto, "h", feeds)}),
                       feeds=feeds, rtol=1e-4, atol=1e-3)
    assert [node.op_type for node in check.proto.graph.node] == ["MatMul", "Add", "MatMul"]


def test_gemm_with_trans_b_scales_columns():
    nodes = [helper.make_node("Gemm", ["x2", "w"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x2", TensorProto.FLOAT, [5, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, N])],
                              [_initializer("w", RNG.standard_normal((N, K)))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = RNG.standard_normal((5, K)).astype(np.float32)
    x[:, 4] *= 90.0
    statistics = {"x2": np.abs(x).max(axis=0)}
    check = check_pass(proto, SmoothQuant(alpha=0.5, statistics=statistics), feeds={"x2": x}, rtol=1e-4, atol=1e-3)
    assert [node.op_type for node in check.proto.graph.node] == ["Mul", "Gemm"]  # a graph input: explicit Mul


def test_no_outliers_or_unusable_readers_change_nothing():
    proto = _layer_norm_model(extra_reader=False)
    flat = {"h": np.ones(K)}
    check_pass(proto, SmoothQuant(alpha=0.5, statistics=flat), expect_modified=False)
    wrong = {"h": np.arange(1, K // 2 + 1, dtype=np.float64) ** 3}
    check_pass(proto, SmoothQuant(alpha=0.5, statistics=wrong), expect_modified=False)
    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    relu = _graph(nodes, [], outputs=("r",))
    outliers = np.ones(K)
    outliers[0] = 100.0
    check_pass(relu, SmoothQuant(alpha=0.5, statistics={"x": outliers}), expect_modified=False)
    with pytest.raises(ValueError):
        SmoothQuant(alpha=1.5)


def test_scales_formula():
    scales = smoothing_scales(np.array([4.0, 0.0, 100.0]), np.array([1.0, 2.0, 0.25]), 0.5)
    np.testing.assert_allclose(scales, [2.0, 1.0, 20.0])
    assert has_outliers(np.array([1.0, 1.0, 1.0, 50.0]), 4.0)
    assert not has_outliers(np.array([1.0, 2.0, 1.5, 3.0]), 4.0)
