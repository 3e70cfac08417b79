"""Random small graphs of the operators the canonical passes touch keep their outputs through the pipeline.

Each example is a chain built with ``onnx.helper`` from a random recipe: image ops (Conv with or without bias,
BatchNormalization, Add/Mul by a per-channel or scalar constant, Relu, Identity, Transpose and back, a residual Add),
then a flatten through shape arithmetic (Shape → Gather → Concat → Reshape, foldable because shapes are static) or a
plain Reshape, then matrix ops (Gemm with optional transB and bias, MatMul + Add, BatchNormalization over features).
Parameters come from a seeded generator, as initializers or Constant nodes at random. The model is checker-valid
before and after :func:`qgraph.pipeline.optimize`, onnxruntime (optimisation disabled) gives the same
outputs within rtol 1e-4, and a second run of the pipeline changes nothing.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qgraph import runtime
from qgraph.pipeline import optimize

IMAGE_OPS = ("conv", "conv_bias", "batch_norm", "add_channel", "add_scalar", "mul_channel", "relu", "identity",
             "transpose", "residual")
MATRIX_OPS = ("gemm", "gemm_transposed", "matmul_add", "batch_norm", "relu", "identity", "mul_scalar")


class Builder:
    """Accumulates nodes and constants; constants become initializers or Constant nodes at random."""

    def __init__(self, seed: int, constant_nodes: list[bool]) -> None:
        self.generator = np.random.default_rng(seed)
        self.constant_nodes = constant_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def constant(self, array: np.ndarray, stem: str = "c") -> str:
        name = self.name(stem)
        as_node = self.constant_nodes[self.count % len(self.constant_nodes)]
        tensor = numpy_helper.from_array(array, name)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        else:
            self.initializers.append(tensor)
        return name

    def node(self, op_type: str, inputs: list[str], **attributes) -> str:
        output = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attributes))
        return output

    def normal(self, *shape: int, scale: float = 1.0) -> np.ndarray:
        return (self.generator.standard_normal(shape) * scale).astype(np.float32)

    def uniform(self, low: float, high: float, *shape: int) -> np.ndarray:
        return self.generator.uniform(low, high, shape).astype(np.float32)

    def batch_norm(self, value: str, channels: int) -> str:
        params = [
            self.constant(self.uniform(0.5, 1.5, channels), "gamma"),
            self.constant(self.normal(channels, scale=0.2), "beta"),
            self.constant(self.normal(channels, scale=0.2), "mean"),
            self.constant(self.uniform(0.5, 2.0, channels), "var"),
        ]
        return self.node("BatchNormalization", [value, *params], epsilon=float(self.generator.choice([1e-5, 1e-3])))


@st.composite
def random_models(draw) -> onnx.ModelProto:
    seed = draw(st.integers(0, 2**31 - 1))
    constant_nodes = draw(st.lists(st.booleans(), min_size=1, max_size=4))
    channels = draw(st.integers(1, 4))
    size = draw(st.integers(2, 5))
    image_ops = draw(st.lists(st.sampled_from(IMAGE_OPS), max_size=6))
    flatten = draw(st.sampled_from(["shape_arithmetic", "reshape_constant"]))
    matrix_ops = draw(st.lists(st.sampled_from(MATRIX_OPS), max_size=4))

    builder = Builder(seed, constant_nodes)
    value = "input"
    shape = [1, channels, size, size]
    for operation in image_ops:
        c = shape[1]
        if operation in ("conv", "conv_bias"):
            out_channels = int(builder.generator.integers(1, 5))
            kernel = int(builder.generator.choice([1, 3]))
            inputs = [value, builder.constant(builder.normal(out_channels, c, kernel, kernel, scale=0.5), "w")]
            if operation == "conv_bias":
                inputs.append(builder.constant(builder.normal(out_channels, scale=0.5), "b"))
            pad = kernel // 2
            value = builder.node("Conv", inputs, pads=[pad] * 4)
            shape[1] = out_channels
        elif operation == "batch_norm":
            value = builder.batch_norm(value, c)
        elif operation == "add_channel":
            value = builder.node("Add", [value, builder.constant(builder.normal(1, c, 1, 1), "a")])
        elif operation == "add_scalar":
            value = builder.node("Add", [builder.constant(builder.normal(1), "a"), value])
        elif operation == "mul_channel":
            value = builder.node("Mul", [value, builder.constant(builder.uniform(0.5, 1.5, c, 1, 1), "m")])
        elif operation == "relu":
            value = builder.node("Relu", [value])
        elif operation == "identity":
            value = builder.node("Identity", [value])
        elif operation == "transpose":
            moved = builder.node("Transpose", [value], perm=[0, 2, 3, 1])
            value = builder.node("Transpose", [moved], perm=[0, 3, 1, 2])
        elif operation == "residual":
            branch = builder.node("Relu", [value])
            value = builder.node("Add", [value, branch])

    features = shape[1] * shape[2] * shape[3]
    if flatten == "shape_arithmetic":
        full_shape = builder.node("Shape", [value])
        batch = builder.node("Gather", [full_shape, builder.constant(np.array([0], np.int64), "index")], axis=0)
        target = builder.node("Concat", [batch, builder.constant(np.array([-1], np.int64), "rest")], axis=0)
        value = builder.node("Reshape", [value, target])
    else:
        value = builder.node("Reshape", [value, builder.constant(np.array([1, features], np.int64), "shape")])

    width = features
    for operation in matrix_ops:
        if operation in ("gemm", "gemm_transposed"):
            out = int(builder.generator.integers(1, 6))
            transposed = operation == "gemm_transposed"
            weight = builder.normal(*((out, width) if transposed else (width, out)), scale=0.5)
            inputs = [value, builder.constant(weight, "gw"), builder.constant(builder.normal(out), "gb")]
            value = builder.node("Gemm", inputs, transB=int(transposed))
            width = out
        elif operation == "matmul_add":
            out = int(builder.generator.integers(1, 6))
            product = builder.node("MatMul", [value, builder.constant(builder.normal(width, out, scale=0.5), "mw")])
            value = builder.node("Add", [product, builder.constant(builder.normal(out), "mb")])
            width = out
        elif operation == "batch_norm":
            value = builder.batch_norm(value, width)
        elif operation == "relu":
            value = builder.node("Relu", [value])
        elif operation == "identity":
            value = builder.node("Identity", [value])
        elif operation == "mul_scalar":
            value = builder.node("Mul", [value, builder.constant(builder.uniform(0.5, 2.0, 1), "s")])

    builder.nodes.append(helper.make_node("Identity", [value], ["output"]))
    graph = helper.make_graph(
        builder.nodes,
        "random",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, width])],
        initializer=builder.initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_models())
def test_canonical_pipeline_keeps_outputs(model):
    onnx.checker.check_model(model, full_check=True)
    session = runtime.create_session(model)
    feeds = runtime.random_inputs(session, seed=0)
    expected = runtime.run(session, feeds)["output"]

    result = optimize(ir.serde.deserialize_model(model))
    produced = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(produced, full_check=True)
    actual = runtime.run(runtime.create_session(produced), feeds)["output"]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)

    operators = [node.op_type for node in produced.graph.node]
    assert "Identity" not in operators or operators == ["Identity"], operators
    assert "Constant" not in operators, operators

    again = optimize(result.model)
    assert not any(record.modified for record in again.records), [r.name for r in again.records if r.modified]
