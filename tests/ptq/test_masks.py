"""Additive attention masks (-inf, -1e4, -3.4e38) must not enter activation ranges.

A small attention block, as torch.onnx writes scaled dot-product attention::

    Q, K, V = x Wq, x Wk, x Wv
    scores  = MatMul(Q, Transpose(K)) / sqrt(d)
    probs   = Softmax(scores + mask)           mask: 0 where attended, a huge negative number (or -inf) elsewhere
    y       = MatMul(probs, V) Wo

The ``Add(scores, mask)`` and the Softmax input stay FP32 (the annotator records why); everything else quantizes,
and the int8 model's output stays within cosine similarity 0.99 of the FP32 model's.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph import runtime
from qgraph.annotate.annotator import AnnotationRules, annotate
from qgraph.calibrate.driver import CalibrationConfig
from qgraph.ptq import QuantizeOptions, quantize
from qgraph.targets import TargetOptions, get_target

SEQUENCE = 8
WIDTH = 16
MASK_ADD = "mask_add"


def _causal(fill: float) -> np.ndarray:
    mask = np.zeros((SEQUENCE, SEQUENCE), np.float32)
    mask[np.triu_indices(SEQUENCE, k=1)] = fill
    return mask


def attention_block(mask: str = "constant", fill: float = -np.inf, seed: int = 0) -> onnx.ModelProto:
    """One attention head on x (batch, SEQUENCE, WIDTH).

    ``mask``: ``constant`` (a causal (SEQUENCE, SEQUENCE) initializer holding ``fill`` above the diagonal) or
    ``computed`` (a padding input (batch, SEQUENCE) of 1/0 turned into ``(1 - padding) * fill``, broadcast over
    the query axis, as Hugging Face models build their extended attention mask).
    """
    generator = np.random.default_rng(seed)

    def weight(name: str) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (generator.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32), name
        )

    initializers = [weight(name) for name in ("wq", "wk", "wv", "wo")]
    initializers.append(numpy_helper.from_array(np.float32(np.sqrt(WIDTH)), "root_width"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQUENCE, WIDTH])]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="query"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="key"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="value"),
        helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 2, 1], name="key_transpose"),
        helper.make_node("MatMul", ["q", "k_t"], ["scores"], name="scores"),
        helper.make_node("Div", ["scores", "root_width"], ["scaled"], name="scale"),
    ]
    if mask == "constant":
        initializers.append(numpy_helper.from_array(_causal(fill), "mask"))
    else:
        inputs.append(helper.make_tensor_value_info("padding", TensorProto.FLOAT, ["batch", SEQUENCE]))
        initializers += [
            numpy_helper.from_array(np.float32(1.0), "one"),
            numpy_helper.from_array(np.float32(fill), "fill"),
            numpy_helper.from_array(np.array([1], np.int64), "query_axis"),
        ]
        nodes += [
            helper.make_node("Sub", ["one", "padding"], ["inverted"], name="invert_padding"),
            helper.make_node("Mul", ["inverted", "fill"], ["flat_mask"], name="mask_fill"),
            helper.make_node("Unsqueeze", ["flat_mask", "query_axis"], ["mask"], name="mask_unsqueeze"),
        ]
    nodes += [
        helper.make_node("Add", ["scaled", "mask"], ["masked"], name=MASK_ADD),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probs", "v"], ["context"], name="context"),
        helper.make_node("MatMul", ["context", "wo"], ["y"], name="output"),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SEQUENCE, WIDTH])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)


def _batches(mask: str, count: int = 4, batch: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    generator = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        feeds = {"x": generator.standard_normal((batch, SEQUENCE, WIDTH)).astype(np.float32)}
        if mask == "computed":
            lengths = generator.integers(2, SEQUENCE + 1, size=batch)
            feeds["padding"] = (np.arange(SEQUENCE)[np.newaxis, :] < lengths[:, np.newaxis]).astype(np.float32)
        batches.append(feeds)
    return batches


def _cosine(first: np.ndarray, second: np.ndarray) -> float:
    first, second = first.ravel().astype(np.float64), second.ravel().astype(np.float64)
    return float(first @ second / (np.linalg.norm(first) * np.linalg.norm(second)))


CASES = [
    ("constant", -np.inf),
    ("constant", -3.4e38),
    ("constant", -1e4),
    ("computed", -3.4e38),
    ("computed", -1e4),
]


@pytest.mark.parametrize(("mask", "fill"), CASES, ids=[f"{mask}{fill:g}" for mask, fill in CASES])
@pytest.mark.parametrize("target_format", ["qoperator", "qdq"])
def test_masked_attention_quantizes_with_the_mask_add_in_fp32(mask, fill, target_format):
    model = attention_block(mask, fill)
    options = QuantizeOptions(
        target_options=TargetOptions(format=target_format), calibration=CalibrationConfig(method="minmax")
    )
    result = quantize(ir.serde.deserialize_model(model), _batches(mask), options)
    plan = result.plan

    assert MASK_ADD in plan.fp32_nodes, plan.fp32_nodes
    assert "mask" in plan.fp32_nodes[MASK_ADD]
    assert "softmax" in plan.fp32_nodes
    assert "masked" not in plan.activations and "mask" not in plan.activations
    for tensor, (low, high) in result.calibration.ranges.items():
        assert np.isfinite(low) and np.isfinite(high) and max(abs(low), abs(high)) < 1e3, (tensor, low, high)
    assert {"query", "key", "value", "scores", "context", "output"} <= set(plan.quantized_nodes)

    quantized = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(quantized, full_check=True)
    held_out = _batches(mask, count=1, batch=16, seed=7)[0]
    expected = runtime.run(runtime.create_session(model), held_out)["y"]
    actual = runtime.run(runtime.create_session(quantized), held_out)["y"]
    assert np.all(np.isfinite(actual))
    assert _cosine(actual, expected) >= 0.99


def test_an_add_that_only_feeds_softmax_stays_fp32_whatever_its_operands():
    model = ir.serde.deserialize_model(attention_block("computed", -3.4e38))
    plan = annotate(model, get_target("ort-cpu", TargetOptions()).rules())
    assert "Softmax" in plan.fp32_nodes[MASK_ADD]


def test_an_ordinary_add_of_a_small_constant_keeps_its_reason():
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "shift"], ["y"], name="shift_add")],
        "shift",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.array([0.5, -1.0, 2.0, 9999.0], np.float32), "shift")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rules: AnnotationRules = get_target("ort-cpu", TargetOptions()).rules()
    plan = annotate(ir.serde.deserialize_model(model), rules)
    reason = plan.fp32_nodes["shift_add"]
    assert "constant operand" in reason and "mask" not in reason
