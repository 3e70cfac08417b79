"""LowerQuantizedAttention on BERT encoders as both exporters write them, quantized by qgraph (static and dynamic
activations): one QAttention per layer, valid, the same function, idempotent, and the spellings it must refuse."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph import runtime
from qgraph.models.bert import BertLayout, BertOptions, build_bert, example_inputs
from qgraph.passes.lower.lower_quantized_attention import LowerQuantizedAttention
from tests.passes.lower.attention_models import unfused_bert

LAYOUT = BertLayout(layers=2, hidden=64, heads=4, intermediate=128, vocabulary=256, max_positions=64)
SEQUENCE = 12


def _cosine(reference: np.ndarray, other: np.ndarray) -> float:
    a, b = reference.reshape(len(reference), -1), other.reshape(len(other), -1)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _run(model: ir.Model | onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return runtime.run(runtime.create_session(proto), feeds)


def _unfused(options: BertOptions, activations: str, *, exclude: frozenset[str] = frozenset(),
             reduce_range: str = "off", weight_scale: float = 1.0):
    """(FP32 proto, the quantized model lowered by every ort-cpu pass but LowerQuantizedAttention, feeds)."""
    proto = build_bert(LAYOUT, options=options, seed=3)
    if weight_scale != 1.0:  # peakier attention: larger query/key weights
        for tensor in proto.graph.initializer:
            if ".query.weight" in tensor.name or ".key.weight" in tensor.name:
                array = onnx.numpy_helper.to_array(tensor) * np.float32(weight_scale)
                tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    sequence = options.sequence or SEQUENCE
    model = unfused_bert(LAYOUT, options, activations, sequence=sequence, exclude=exclude, reduce_range=reduce_range,
                         proto=proto)
    feeds = example_inputs(LAYOUT, 3, sequence, seed=11, mask_dtype=options.mask_dtype)
    return proto, model, feeds


def _fuse(model: ir.Model) -> tuple[ir.Model, bool]:
    result = LowerQuantizedAttention()(model)
    return result.model, result.modified


def _ops(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


SPELLINGS = {
    "torchscript": BertOptions(),
    "dynamo": BertOptions(exporter="dynamo"),
    "decomposed-inf-bool": BertOptions(layer_norm="decomposed", mask_value="-inf", mask_dtype="bool"),
    "large-int32-mean": BertOptions(mask_value="large", mask_dtype="int32", pooling="mean"),
    "fixed-sequence": BertOptions(sequence=SEQUENCE),
}


@pytest.mark.parametrize("activations", ["static", "dynamic"])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_each_layer_becomes_one_qattention_and_stays_as_close_to_fp32(spelling, activations):
    proto, model, feeds = _unfused(SPELLINGS[spelling], activations)
    before = _run(model, feeds)
    reference = _run(proto, feeds)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    fused, modified = _fuse(model)
    assert modified
    counts = _ops(fused)
    assert counts.get("QAttention") == LAYOUT.layers
    assert "Softmax" not in counts and "QLinearMatMul" not in counts and "Transpose" not in counts
    proto_after = ir.serde.serialize_model(fused)
    onnx.checker.check_model(proto_after, full_check=True)
    after = _run(proto_after, feeds)
    for name, expected in reference.items():
        cosine_before, cosine_after = _cosine(expected, before[name]), _cosine(expected, after[name])
        assert cosine_after >= 0.999, (name, cosine_after)
        # The attention core leaves integer arithmetic: never further from FP32 than the unfused graph.
        assert 1 - cosine_after <= 1.2 * (1 - cosine_before) + 1e-6, (name, cosine_before, cosine_after)
    again = LowerQuantizedAttention()(fused)
    assert not again.modified


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_with_a_float_attention_core_the_function_is_the_same(activations):
    """With Q·Kᵀ and A·V left float, the unfused graph computes what QAttention computes, to float rounding."""
    exclude = frozenset(f"/encoder/layer.{layer}/attention/self/{name}"
                        for layer in range(LAYOUT.layers) for name in ("MatMul", "MatMul_1"))
    _, model, feeds = _unfused(BertOptions(), activations, exclude=exclude, weight_scale=20.0)
    before = _run(model, feeds)
    fused, modified = _fuse(model)
    assert modified and _ops(fused).get("QAttention") == LAYOUT.layers
    after = _run(fused, feeds)
    for name, expected in before.items():
        np.testing.assert_allclose(after[name], expected, rtol=1e-3, atol=2e-3 * float(np.abs(expected).max()))


def test_reduce_range_weights_and_the_mask_cast_is_shared():
    _, model, feeds = _unfused(BertOptions(mask_dtype="int64"), "static", reduce_range="on")
    fused, modified = _fuse(model)
    assert modified
    attentions = [node for node in fused.graph if node.op_type == "QAttention"]
    masks = {id(node.inputs[5]) for node in attentions}
    assert len(masks) == 1 and attentions[0].inputs[5].dtype == ir.DataType.INT32
    weight = attentions[0].inputs[1].const_value.numpy()
    assert weight.shape == (LAYOUT.hidden, 3 * LAYOUT.hidden) and np.abs(weight.astype(np.int16)).max() <= 63
    assert attentions[0].attributes["num_heads"].value == LAYOUT.heads
    assert attentions[0].attributes["scale"].value == pytest.approx(1 / np.sqrt(LAYOUT.head_size), rel=1e-6)


def test_an_int32_mask_is_read_directly_and_padding_never_reaches_kept_tokens():
    _, model, feeds = _unfused(BertOptions(mask_dtype="int32"), "static")  # dynamic scales see padding
    fused, _ = _fuse(model)
    attention = next(node for node in fused.graph if node.op_type == "QAttention")
    assert attention.inputs[5].is_graph_input() and attention.inputs[5].name == "attention_mask"
    # Changing the ids of padded positions must not change the outputs of kept positions.
    padded = dict(feeds)
    ids = padded["input_ids"].copy()
    ids[feeds["attention_mask"] == 0] = 1
    padded["input_ids"] = ids
    first, second = _run(fused, feeds)["last_hidden_state"], _run(fused, padded)["last_hidden_state"]
    kept = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(first[kept], second[kept], rtol=1e-5, atol=1e-5)


def _graph_with(model: ir.Model, edit) -> ir.Model:
    proto = ir.serde.serialize_model(model)
    edit(proto.graph)
    return ir.serde.deserialize_model(proto)


def _node(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    return next(node for node in graph.node if node.name == name)


def test_refusals_leave_the_graph_alone():
    _, model, feeds = _unfused(BertOptions(), "dynamic")

    def causal_softmax_axis(graph):
        for node in graph.node:
            if node.op_type == "Softmax":
                del node.attribute[:]
                node.attribute.append(onnx.helper.make_attribute("axis", 2))

    def mask_from_ids(graph):  # an additive "mask" that is not 0/very negative
        for node in graph.node:
            if node.op_type == "Mul" and node.name.startswith("/get_extended_attention_mask"):
                constant = next(tensor for tensor in graph.initializer if tensor.name == node.input[1])
                constant.CopyFrom(onnx.numpy_helper.from_array(np.array(-5.0, np.float32), constant.name))

    def wrong_key_perm(graph):
        for node in graph.node:
            if node.name.endswith("attention/self/Transpose_1"):
                del node.attribute[:]
                node.attribute.append(onnx.helper.make_attribute("perm", [0, 2, 1, 3]))

    for edit in (causal_softmax_axis, mask_from_ids, wrong_key_perm):
        edited = _graph_with(model, edit)
        result = LowerQuantizedAttention()(edited)
        assert not result.modified, edit.__name__
        assert "QAttention" not in _ops(result.model)


def test_a_projection_left_float_is_refused():
    exclude = frozenset({"/encoder/layer.0/attention/self/key/MatMul"})
    _, model, _ = _unfused(BertOptions(), "static", exclude=exclude)
    fused, modified = _fuse(model)
    assert modified
    assert _ops(fused).get("QAttention") == 1  # layer 1 only
    assert "Softmax" in _ops(fused)


def test_without_known_rank_nothing_is_fused():
    _, model, _ = _unfused(BertOptions(), "static")
    stripped = ir.serde.serialize_model(model)
    del stripped.graph.value_info[:]
    bare = ir.serde.deserialize_model(stripped)
    for value in bare.graph.inputs:
        value.shape = None
    result = LowerQuantizedAttention()(bare)
    assert not result.modified


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_the_hugging_face_spelling_of_the_trained_encoder_is_fused(activations):
    """The text encoder as torch.onnx writes Hugging Face's BertSelfAttention: the keys through permute(0, 2, 1, 3)
    then transpose(-1, -2), the head merge's target from ``context.size()[:-2]`` (Shape → Gather 0/1 of the
    merged input). Each layer becomes one QAttention, the Shapes read the attention input, the outputs stay close."""
    from qgraph.models.text_encoder import TextEncoderConfig, build_text_encoder, initial_weights
    from qgraph.pipeline import OptimizeOptions, optimize
    from qgraph.ptq import QuantizeOptions
    from qgraph.targets import TargetOptions

    config = TextEncoderConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                               max_positions=16)
    proto = onnx.shape_inference.infer_shapes(build_text_encoder(initial_weights(config, seed=1), config))
    generator = np.random.default_rng(0)

    def feeds(batch: int) -> dict[str, np.ndarray]:
        mask = np.ones((batch, 16), dtype=np.int64)
        mask[0, 12:] = 0
        return {"input_ids": generator.integers(0, 40, (batch, 16)).astype(np.int64), "attention_mask": mask,
                "token_type_ids": np.zeros((batch, 16), dtype=np.int64)}

    transposes = [node for node in proto.graph.node if node.op_type == "Transpose"]
    assert any(tuple(node.attribute[0].ints) == (0, 1, 3, 2) for node in transposes)  # the spelling under test
    written = {}
    for kernels in ("exact", "fast"):
        quantization = QuantizeOptions(min_sqnr=None, activations=activations, speed_choice=False,
                                       target_options=TargetOptions(reduce_range="off", transformer_kernels=kernels))
        result = optimize(ir.serde.deserialize_model(proto), None, OptimizeOptions(quantization=quantization),
                          calibration_data=[feeds(4) for _ in range(3)])
        written[kernels] = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(written["fast"], full_check=True)
    counts = _ops(ir.serde.deserialize_model(written["fast"]))
    assert counts.get("QAttention") == config.num_layers and "Softmax" not in counts
    test = feeds(3)
    reference = runtime.run(runtime.create_session(proto), test)["logits"]
    outputs = {kernels: runtime.run(runtime.create_session(model), test)["logits"]
               for kernels, model in written.items()}
    assert _cosine(reference, outputs["fast"]) >= 0.999
    assert 1 - _cosine(reference, outputs["fast"]) <= 1.2 * (1 - _cosine(reference, outputs["exact"])) + 1e-6
    assert not LowerQuantizedAttention()(ir.serde.deserialize_model(written["fast"])).modified


def test_a_shape_reader_asking_for_more_than_batch_and_sequence_is_refused():
    """A Gather of index 2 (the heads) from the head merge's input: nothing else would have that size."""
    from qgraph.models.text_encoder import TextEncoderConfig, build_text_encoder, initial_weights
    from qgraph.pipeline import OptimizeOptions, optimize
    from qgraph.ptq import QuantizeOptions
    from qgraph.targets import TargetOptions

    config = TextEncoderConfig(vocab_size=40, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                               max_positions=16)
    proto = onnx.shape_inference.infer_shapes(build_text_encoder(initial_weights(config, seed=1), config))
    batch = {"input_ids": np.arange(32, dtype=np.int64).reshape(2, 16) % 40,
             "attention_mask": np.ones((2, 16), dtype=np.int64), "token_type_ids": np.zeros((2, 16), dtype=np.int64)}
    quantization = QuantizeOptions(min_sqnr=None, speed_choice=False,
                                   target_options=TargetOptions(reduce_range="off", transformer_kernels="exact"))
    model = optimize(ir.serde.deserialize_model(proto), None, OptimizeOptions(quantization=quantization),
                     calibration_data=[batch]).model
    merge_input = next(node.outputs[0] for node in model.graph if node.op_type == "Transpose"
                       and any(use.node.op_type == "Reshape" for use in node.outputs[0].uses())
                       and len(node.outputs[0].uses()) > 1)
    gathers = [use.node for dequantize in merge_input.uses() for shape in dequantize.node.outputs[0].uses()
               if shape.node.op_type == "Shape" for use in shape.node.outputs[0].uses()]
    assert gathers and all(node.op_type == "Gather" for node in gathers)
    untouched = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    assert LowerQuantizedAttention()(untouched).modified  # as written, the layer is fused
    heads = ir.Value(name="heads_index", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]),
                     const_value=ir.tensor(np.array(2, dtype=np.int64)))
    model.graph.register_initializer(heads)
    gathers[0].replace_input_with(1, heads)
    result = LowerQuantizedAttention()(model)
    assert not result.modified and "QAttention" not in _ops(result.model)
