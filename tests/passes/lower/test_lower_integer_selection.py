"""LowerIntegerPassThrough on the selection ops real CNNs need: Slice, Gather, Split, Resize(nearest).

Each island is checked the design notes' way (checker, onnxruntime with optimisations off, idempotence) and must
equal the QDQ graph exactly: these ops only copy elements, so no quantization step may change.
"""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.passes.lower.lower_integer_passthrough import LowerIntegerPassThrough
from tests.passes.lower.islands import assert_refused
from tests.passes.qdq_builders import QDQBuilder, count_ops, lower_and_check


def _island(op_type: str, *, same_params: bool = True, outputs: int = 1, read: tuple[int, ...] | None = None,
            **attributes):
    builder = QDQBuilder(seed=21)
    builder.opset = 18
    x = builder.quantize(builder.add_input("x", [1, 4, 6, 6]))
    inputs = [x]
    if op_type == "Slice":
        inputs += [builder.constant("starts", np.array([1, 0], np.int64)),
                   builder.constant("ends", np.array([3, 5], np.int64)),
                   builder.constant("axes", np.array([1, 3], np.int64))]
    elif op_type == "Gather":
        inputs.append(builder.constant("indices", np.array([3, 0, 0, 2], np.int64)))
    elif op_type == "Split":
        inputs.append(builder.constant("sizes", np.array([1, 3], np.int64)))
    elif op_type == "Resize":
        inputs += ["", builder.constant("scales", np.array([1, 1, 2, 2], np.float32))]
    results = builder.node(op_type, inputs, outputs=outputs, **attributes)
    results = results if isinstance(results, list) else [results]
    scale, zero_point = builder.scales[x]
    quantized = []
    for index, result in enumerate(results):
        if read is not None and index not in read:
            continue
        out = builder.quantize(result, scale=scale if same_params else scale * 2, zero_point=zero_point)
        quantized.append(builder.output(out))
    return builder, quantized


@pytest.mark.parametrize("op_type, attributes", [
    ("Slice", {}), ("Gather", {"axis": 1}), ("Resize", {"mode": "nearest"}),
    ("Resize", {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
])
def test_selection_runs_on_integers_exactly(op_type, attributes):
    builder, outs = _island(op_type, **attributes)
    _, lowered, before, after = lower_and_check(builder.model(), LowerIntegerPassThrough(),
                                                output_scales={out: builder.scales[out] for out in outs}, steps=0)
    assert count_ops(lowered) == {"QuantizeLinear": 1, op_type: 1, "DequantizeLinear": 1}
    for out in outs:
        np.testing.assert_array_equal(before[out], after[out])


@pytest.mark.parametrize("read", [(0, 1), (1,)])
def test_split_runs_on_integers_with_every_read_output_requantized_nowhere(read):
    builder, outs = _island("Split", outputs=2, read=read, axis=1)
    _, lowered, before, after = lower_and_check(builder.model(), LowerIntegerPassThrough(),
                                                output_scales={out: builder.scales[out] for out in outs}, steps=0)
    assert count_ops(lowered) == {"QuantizeLinear": 1, "Split": 1, "DequantizeLinear": len(read)}
    for out in outs:
        np.testing.assert_array_equal(before[out], after[out])


def test_resize_linear_is_refused(caplog):
    builder, _ = _island("Resize", mode="linear")
    assert_refused(builder.model(), LowerIntegerPassThrough(), caplog, "interpolates")


@pytest.mark.parametrize("second_reader, reason", [
    ("requantized", "quantized with other parameters"),
    ("float", "read as float"),
])
def test_split_with_a_second_output_off_the_integer_path_is_refused(caplog, second_reader, reason):
    builder = QDQBuilder(seed=3)
    builder.opset = 18
    x = builder.quantize(builder.add_input("x", [1, 4, 6, 6]))
    first, second = builder.node("Split", [x, builder.constant("sizes", np.array([2, 2], np.int64))], outputs=2,
                                 axis=1)
    scale, zero_point = builder.scales[x]
    builder.output(builder.quantize(first, scale=scale, zero_point=zero_point))
    if second_reader == "requantized":
        builder.output(builder.quantize(second, scale=scale * 2, zero_point=zero_point))
    else:
        builder.output(builder.node("Relu", [second]))
    assert_refused(builder.model(), LowerIntegerPassThrough(), caplog, reason)


@pytest.mark.parametrize("op_type", ["Slice", "Gather"])
def test_selection_with_different_params_is_refused(op_type, caplog):
    builder, _ = _island(op_type, same_params=False, **({"axis": 1} if op_type == "Gather" else {}))
    assert_refused(builder.model(), LowerIntegerPassThrough(), caplog, "requantization")


@pytest.mark.parametrize(("mode", "shared"), [("nearest", True), ("linear", False)])
def test_annotation_shares_a_nearest_resize_s_quantization_so_the_lowering_applies(mode, shared):
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from qgraph.annotate.annotator import annotate
    from qgraph.targets import get_target

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Resize", ["c", "", "scales"], ["r"], mode=mode),
         helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])],
        "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight, scales, numpy_helper.from_array(np.ones((2, 4, 3, 3), np.float32), "w2")],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    plan = annotate(model, get_target("ort-cpu").rules())
    assert {"c", "r"} <= set(plan.activations)
    assert ({"c", "r"} <= plan.group_of("r")) == shared
