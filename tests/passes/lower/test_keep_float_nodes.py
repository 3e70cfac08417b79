"""KeepFloatNodes on hand-built QDQ chains: the region computes in float, the integer nodes around it still lower."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from qgraph import runtime
from qgraph.passes.infrastructure import PassManager
from qgraph.passes.lower.keep_float_nodes import KeepFloatNodes
from qgraph.targets import TargetOptions, get_target
from tests.passes.qdq_builders import QDQBuilder, count_ops, run_both


def depthwise_chain(seed: int = 0):
    """x → Conv1x1 → Relu → depthwise Conv3x3 → Relu → Conv1x1 → out, every tensor quantized (QDQ form)."""
    builder = QDQBuilder(seed=seed)
    rng = np.random.default_rng(seed)
    x = builder.quantize(builder.add_input("x", [1, 4, 8, 8]))
    h = builder.node("Relu", [builder.conv(x, rng.standard_normal((8, 4, 1, 1)).astype(np.float32),
                                           rng.standard_normal(8).astype(np.float32))])
    h = builder.quantize(h)
    h = builder.node("Relu", [builder.conv(h, rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
                                           rng.standard_normal(8).astype(np.float32), group=8, pads=[1, 1, 1, 1])])
    h = builder.quantize(h)
    out = builder.output(builder.quantize(builder.conv(h, rng.standard_normal((6, 8, 1, 1)).astype(np.float32))))
    model = builder.model()
    names = {node.output[0]: node.name for node in model.graph.node}
    return builder, model, names, out


def node_names(model: onnx.ModelProto, op_type: str) -> list[str]:
    return [node.name for node in model.graph.node if node.op_type == op_type]


def run_pass(model: onnx.ModelProto, nodes, *, expect_modified: bool = True) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    result = KeepFloatNodes(nodes=frozenset(nodes))(ir.serde.deserialize_model(model))
    assert result.modified == expect_modified
    again = KeepFloatNodes(nodes=frozenset(nodes))(result.model)
    assert not again.modified, "KeepFloatNodes is not idempotent"
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def lower_for_ort_cpu(model: onnx.ModelProto) -> onnx.ModelProto:
    target = get_target("ort-cpu", TargetOptions(format="qoperator", saturation_guard="off", reduce_range="off"))
    ir_model = ir.serde.deserialize_model(model)
    PassManager(target.lowering_pipeline(), fixed_point=True).run(ir_model)
    return ir.serde.serialize_model(ir_model)


def test_depthwise_conv_keeps_float_weights_and_the_outputs_do_not_change():
    _, model, _, out = depthwise_chain()
    depthwise = node_names(model, "Conv")[1]
    edited = run_pass(model, {depthwise})
    before, after = run_both(model, edited)
    np.testing.assert_allclose(after[out], before[out], rtol=1e-6, atol=1e-6)
    conv = next(node for node in edited.graph.node if node.name == depthwise)
    initializers = {tensor.name: tensor for tensor in edited.graph.initializer}
    assert conv.input[1] in initializers and conv.input[2] in initializers
    assert initializers[conv.input[1]].data_type == onnx.TensorProto.FLOAT
    assert count_ops(edited)["DequantizeLinear"] == count_ops(model)["DequantizeLinear"] - 2


def test_lowering_leaves_the_region_float_and_lowers_its_neighbours():
    builder, model, _, out = depthwise_chain()
    depthwise = node_names(model, "Conv")[1]
    lowered = lower_for_ort_cpu(run_pass(model, {depthwise}))
    counts = count_ops(lowered)
    assert counts["QLinearConv"] == 2 and counts["Conv"] == 1 and counts["Relu"] == 1
    # the float depthwise conv reads the dequantized integer output of its producer and is quantized after its Relu
    assert counts["DequantizeLinear"] == 2 and counts["QuantizeLinear"] == 2
    # Each lowered conv may round its output one step away from the QDQ graph, and a step of the first conv can
    # move the last conv's output by about one more step.
    before, after = run_both(model, lowered)
    output_step = builder.scales[out][0]
    steps = np.abs(after[out] - before[out]) / output_step
    assert steps.max() <= 3 + 1e-3 and np.mean(steps < 0.5) > 0.8


def test_interior_quantization_is_dropped_inside_a_region():
    _, model, _, out = depthwise_chain()
    convs = node_names(model, "Conv")
    relus = node_names(model, "Relu")
    region = {convs[1], relus[1], convs[2]}
    edited = run_pass(model, region)
    # The same graph with the pair between the second Relu and the last Conv bypassed by hand:
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    relu_output = next(node.output[0] for node in expected.graph.node if node.name == relus[1])
    quantize = next(node for node in expected.graph.node
                    if node.op_type == "QuantizeLinear" and node.input[0] == relu_output)
    dequantize = next(node for node in expected.graph.node
                      if node.op_type == "DequantizeLinear" and node.input[0] == quantize.output[0])
    for node in expected.graph.node:
        for index, name in enumerate(node.input):
            if name == dequantize.output[0]:
                node.input[index] = relu_output
    expected.graph.node.remove(quantize)
    expected.graph.node.remove(dequantize)
    reference, actual = run_both(expected, edited)
    np.testing.assert_allclose(actual[out], reference[out], rtol=1e-6, atol=1e-6)
    assert count_ops(edited)["QuantizeLinear"] == count_ops(model)["QuantizeLinear"] - 1
    lowered = count_ops(lower_for_ort_cpu(edited))
    assert lowered["QLinearConv"] == 1 and lowered["Conv"] == 2


def test_border_only_binary_node_is_left_with_a_reason(caplog):
    builder = QDQBuilder()
    a = builder.quantize(builder.node("Relu", [builder.add_input("a", [1, 4])]))
    b = builder.quantize(builder.node("Relu", [builder.add_input("b", [1, 4])]))
    builder.output(builder.quantize(builder.node("Add", [a, b])))
    model = builder.model()
    with caplog.at_level("INFO"):
        run_pass(model, set(node_names(model, "Add")), expect_modified=False)
    assert "would fuse its Q/DQ again" in caplog.text


def test_shared_weight_keeps_its_dequantize_for_the_integer_reader():
    builder = QDQBuilder()
    rng = np.random.default_rng(3)
    x = builder.quantize(builder.add_input("x", [1, 3, 6, 6]))
    weight_value, _ = builder.weight(rng.standard_normal((2, 3, 1, 1)).astype(np.float32))
    first = builder.output(builder.quantize(builder.node("Conv", [x, weight_value])))
    second = builder.output(builder.quantize(builder.node("Conv", [x, weight_value])))
    model = builder.model()
    float_conv = node_names(model, "Conv")[1]
    edited = run_pass(model, {float_conv})
    before, after = run_both(model, edited)
    for name in (first, second):
        np.testing.assert_allclose(after[name], before[name], rtol=1e-6, atol=1e-6)
    lowered = count_ops(lower_for_ort_cpu(edited))
    assert lowered["QLinearConv"] == 1 and lowered["Conv"] == 1


def test_graph_output_dequantize_is_never_bypassed():
    builder = QDQBuilder()
    rng = np.random.default_rng(4)
    x = builder.quantize(builder.add_input("x", [1, 3, 6, 6]))
    out = builder.output(builder.quantize(builder.conv(x, rng.standard_normal((2, 3, 1, 1)).astype(np.float32))))
    model = builder.model()
    edited = run_pass(model, set(node_names(model, "Conv")))
    assert out in [output.name for output in edited.graph.output]
    # the input's pair goes (the region starts at the graph input), the output's stays: the graph output is its DQ
    assert count_ops(edited)["QuantizeLinear"] == 1 and count_ops(edited)["DequantizeLinear"] == 1
    session = runtime.create_session(edited)
    assert runtime.run(session, runtime.random_inputs(session))[out].dtype == np.float32


def test_a_region_that_starts_at_the_graph_input_reads_it_in_float():
    _, model, _, _ = depthwise_chain()
    convs, relus = node_names(model, "Conv"), node_names(model, "Relu")
    edited = run_pass(model, {convs[0], relus[0]})
    first = next(node for node in edited.graph.node if node.name == convs[0])
    assert first.input[0] == "x"
    assert count_ops(edited)["QuantizeLinear"] == count_ops(model)["QuantizeLinear"] - 1
    lowered = count_ops(lower_for_ort_cpu(edited))
    assert lowered["Conv"] == 1 and lowered["QLinearConv"] == 2
