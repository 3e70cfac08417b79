"""The BERT encoder builder: valid graphs as both exporters write them, the same function, and INT8 through
qgraph with dynamic and static activations, SmoothQuant on injected outliers, and the issue's bad inputs."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph import runtime
from qgraph.models.bert import BertLayout, BertOptions, build_bert, example_inputs, random_weights
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions

LAYOUT = BertLayout(layers=2, hidden=64, heads=4, intermediate=128, vocabulary=256, max_positions=64)


def _cosine(reference: np.ndarray, other: np.ndarray) -> float:
    a, b = reference.reshape(len(reference), -1), other.reshape(len(other), -1)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _outputs(model, feeds):
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return runtime.run(runtime.create_session(proto), feeds)


def _quantize(proto, batches, **options):
    quantization = QuantizeOptions(min_sqnr=None, **options)
    return optimize(ir.serde.deserialize_model(proto), None, OptimizeOptions(quantization=quantization),
                    calibration_data=batches)


@pytest.mark.parametrize("options", [
    BertOptions(), BertOptions(exporter="dynamo"), BertOptions(layer_norm="decomposed", pooling="mean"),
    BertOptions(mask_value="-inf", mask_dtype="bool", head="mlm"), BertOptions(mask_value="large", mask_dtype="int32"),
], ids=["torchscript", "dynamo", "decomposed-mean", "inf-bool-mlm", "large-int32"])
def test_every_spelling_is_valid_and_computes_the_same_encoder(options):
    weights = random_weights(LAYOUT, seed=3, head=options.head, pooling=options.pooling)
    proto = build_bert(LAYOUT, weights, options)
    onnx.checker.check_model(proto, full_check=True)
    feeds = example_inputs(LAYOUT, 3, 20, seed=1, mask_dtype=options.mask_dtype)
    reference = _outputs(build_bert(LAYOUT, random_weights(LAYOUT, seed=3)), example_inputs(LAYOUT, 3, 20, seed=1))
    outputs = _outputs(proto, feeds)
    np.testing.assert_allclose(outputs["last_hidden_state"], reference["last_hidden_state"], atol=2e-4)
    ops = Counter(node.op_type for node in proto.graph.node)
    assert ops["Softmax"] == LAYOUT.layers and ops["Erf"] == LAYOUT.layers + (options.head == "mlm")
    if options.exporter == "dynamo":
        assert ops["Expand"] == 1 and ops["Div"] == 0
    if options.layer_norm == "decomposed":
        assert ops["LayerNormalization"] == 0 and ops["ReduceMean"] == 2 * (2 * LAYOUT.layers + 1)


def test_bad_weights_are_refused():
    weights = random_weights(LAYOUT)
    with pytest.raises(ValueError, match="missing"):
        build_bert(LAYOUT, {name: value for name, value in weights.items() if "query" not in name})
    weights["embeddings.LayerNorm.weight"] = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="shape"):
        build_bert(LAYOUT, weights)
    with pytest.raises(ValueError):
        BertLayout(hidden=65, heads=4)


@pytest.mark.parametrize("activations", ["static", "dynamic", "auto"])
def test_int8_encoder_on_dynamic_sequence_lengths(activations):
    """Calibration batches of two lengths (padded), evaluation on a third: every MatMul integer, cosine >= 0.99."""
    proto = build_bert(LAYOUT)
    batches = [example_inputs(LAYOUT, 4, length, seed=length) for length in (12, 24)]
    result = _quantize(proto, batches, activations=activations)
    ops = Counter(node.op_type for node in result.model.graph)
    assert ops["MatMul"] == 0 and ops["Gemm"] == 0
    if activations == "dynamic":
        assert ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] == 6 * LAYOUT.layers + 1
        # only attention's activation x activation products keep static ranges
        activations = result.quantization.plan.activations
        assert activations and all("/attention/self/" in name for name in activations)
    feeds = example_inputs(LAYOUT, 3, 17, seed=5)
    reference, quantized = _outputs(proto, feeds), _outputs(result.model, feeds)
    assert _cosine(reference["last_hidden_state"], quantized["last_hidden_state"]) >= 0.99


@pytest.mark.parametrize("mask_dtype", ["int32", "bool"])
def test_all_ones_calibration_masks_are_safe_on_padded_input(mask_dtype):
    proto = build_bert(LAYOUT, options=BertOptions(mask_dtype=mask_dtype, mask_value="-inf"))
    batches = [example_inputs(LAYOUT, 4, 16, seed=seed, padded=False, mask_dtype=mask_dtype) for seed in (1, 2)]
    result = _quantize(proto, batches)
    feeds = example_inputs(LAYOUT, 4, 16, seed=9, padded=True, mask_dtype=mask_dtype)
    quantized = _outputs(result.model, feeds)["last_hidden_state"]
    assert np.all(np.isfinite(quantized))
    assert _cosine(_outputs(proto, feeds)["last_hidden_state"], quantized) >= 0.99


def test_tied_embedding_and_decoder_weights_are_quantized_once():
    layout = dataclasses.replace(LAYOUT, vocabulary=1024)  # a vocabulary: its table is looked up in int8
    proto = build_bert(layout, options=BertOptions(head="mlm", pooling="none"))
    batches = [example_inputs(layout, 4, 16, seed=seed) for seed in (1, 2)]
    result = _quantize(proto, batches)
    model = result.model
    decoder = [node for node in model.graph if "decoder" in node.name and node.op_type == "MatMulIntegerToFloat"]
    assert len(decoder) == 1
    gather = next(node for node in model.graph if node.op_type == "Gather" and node.inputs[1].name == "input_ids")
    # the embedding lookup reads the int8 table and scales only the rows it looked up, per hidden channel
    assert gather.inputs[0].dtype == ir.DataType.INT8 and gather.inputs[0].const_value is not None
    (cast,) = gather.outputs[0].consumers()
    assert cast.op_type == "Cast" and [node.op_type for node in cast.outputs[0].consumers()] == ["Mul"]
    feeds = example_inputs(layout, 2, 16, seed=4)
    assert _cosine(_outputs(proto, feeds)["logits"], _outputs(model, feeds)["logits"]) >= 0.99


def test_smooth_quant_recovers_injected_outlier_channels():
    """Three LayerNorm channels 80x the others (the readers' weight rows divided by 80, so the function is the
    model's): per-tensor static INT8 loses the rest of the channels; SmoothQuant alpha 0.5 recovers them."""
    layout = BertLayout(layers=2, hidden=128, heads=4, intermediate=256, vocabulary=512, max_positions=64)
    weights = random_weights(layout, seed=1, head="mlm")
    channels = [5, 40, 99]
    for name in weights:
        if name.endswith("LayerNorm.weight") and not name.startswith("cls"):
            weights[name][channels] = 80.0
        if name.endswith(("query.weight", "key.weight", "value.weight", "intermediate.dense.weight",
                          "transform.dense.weight")):
            weights[name][channels, :] /= 80.0
    proto = build_bert(layout, weights, BertOptions(head="mlm"))
    batches = [example_inputs(layout, 8, 32, seed=seed) for seed in range(4)]
    feeds = example_inputs(layout, 16, 32, seed=50)
    reference = _outputs(proto, feeds)["logits"]
    plain = _cosine(reference, _outputs(_quantize(proto, batches).model, feeds)["logits"])
    smoothed = _cosine(reference, _outputs(_quantize(proto, batches, smooth_quant=0.5).model, feeds)["logits"])
    assert plain < 0.95, plain        # measured 0.864
    assert smoothed >= 0.99, smoothed  # measured 0.9999


def test_probabilities_get_the_fixed_scale_and_are_not_calibrated():
    proto = build_bert(LAYOUT)
    batches = [example_inputs(LAYOUT, 4, 16, seed=seed) for seed in (1, 2)]
    result = _quantize(proto, batches)
    softmax_outputs = [node.outputs[0].name for node in ir.serde.deserialize_model(proto).graph
                       if node.op_type == "Softmax"]
    for name in softmax_outputs:
        params = result.quantization.parameters[name]
        assert float(np.asarray(params.scale)) == pytest.approx(1 / 255) and int(np.asarray(params.zero_point)) == 0
        assert result.quantization.calibration.ranges[name] == (0.0, 1.0)
    context = [node for node in result.model.graph if node.op_type == "QLinearMatMul" and "MatMul_1" in node.name]
    assert len(context) == LAYOUT.layers
    assert all(float(node.inputs[1].const_value.numpy()) == pytest.approx(1 / 255) for node in context)


@pytest.mark.qat  # trains through onnxruntime-training
def test_qat_distils_an_encoder_with_a_pooler_and_an_int8_vocabulary():
    """QAT trains on the first output (the hidden states); the pooler, which only the second output reads, keeps its
    calibrated values instead of making onnxruntime-training refuse the graph; the vocabulary stays int8."""
    from qgraph.data import dataset_from_arrays
    from qgraph.qat.options import QATOptions

    layout = dataclasses.replace(LAYOUT, layers=1, vocabulary=1024)
    proto = build_bert(layout, options=BertOptions())
    batches = [example_inputs(layout, 8, 16, seed=seed) for seed in range(3)]
    train = dataset_from_arrays({key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]})
    options = OptimizeOptions(quantization=QuantizeOptions(min_sqnr=None, speed_choice=False),
                              qat=QATOptions(loss="distill", epochs=1, batch_size=8, patience=None, threads=1))
    result = optimize(ir.serde.deserialize_model(proto), None, options, calibration_data=batches, train_data=train)
    model = ir.serde.serialize_model(result.model)
    assert [output.name for output in model.graph.output] == ["last_hidden_state", "pooler_output"]
    lookup = next(node for node in model.graph.node if node.op_type == "Gather" and node.input[1] == "input_ids")
    codes = {tensor.name: tensor for tensor in model.graph.initializer}[lookup.input[0]]
    assert codes.data_type == onnx.TensorProto.INT8
    feeds = example_inputs(layout, 4, 16, seed=9)
    for name in ("last_hidden_state", "pooler_output"):
        assert _cosine(_outputs(proto, feeds)[name], _outputs(model, feeds)[name]) >= 0.99, name
