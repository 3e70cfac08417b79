"""Deploy parity: the lowered model on onnxruntime's integer kernels against the QDQ simulation (qgraph.parity)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from qgraph.parity import check_parity, quantized_tensors
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions
from qgraph.targets import TargetOptions
from tests.ptq.small_models import calibration_batches, residual_cnn

MODELS = Path(__file__).resolve().parents[1] / "models"


def _quantized(model, batches, kernels: str = "exact"):
    """The QDQ and the lowered model; the exact transformer kernels unless asked (parity is what they keep)."""
    quantization = QuantizeOptions(target_options=TargetOptions(transformer_kernels=kernels))
    result = optimize(ir.serde.deserialize_model(model) if isinstance(model, onnx.ModelProto) else model, None,
                      OptimizeOptions(quantization=quantization), calibration_data=batches)
    return result.quantization.qdq_model, ir.serde.serialize_model(result.model)


def _fashion_batches(count: int = 2, size: int = 8):
    images = np.load(MODELS / "data" / "fashion_mnist_calibration.npz")["input"].astype(np.float32)
    return [{"input": images[index * size:(index + 1) * size]} for index in range(count)]


@pytest.mark.parametrize("name", ["resnet_small_fmnist", "mobilenet_v2_small_fmnist", "vit_small_fmnist"])
def test_reference_models_are_clean(name):
    batches = _fashion_batches()
    qdq, lowered = _quantized(MODELS / "trained" / f"{name}.onnx", batches)
    result = check_parity(qdq, lowered, batches)
    assert result.clean, result.flagged
    # every quantized tensor of the QDQ graph is found again in the lowered graph under its name
    assert len(result.tensors) == len(quantized_tensors(qdq)) > 10
    assert not result.not_compared
    assert any(tensor.producer.startswith("QLinearConv") or tensor.producer.startswith("QLinearMatMul")
               or tensor.producer.startswith("MatMulInteger") for tensor in result.tensors)
    # end to end the rounding differences accumulate, but the outputs stay close
    assert all(value > 40 for value in result.outputs.values())
    assert all(tensor.max_steps <= tensor.end_to_end_max_steps for tensor in result.tensors)


def test_the_default_on_the_vit_takes_the_fast_kernels_and_leaves_parity_only_there():
    """auto's fast kernels leave the simulation on purpose: the ViT's flagged tensors are its attention outputs."""
    batches = _fashion_batches()
    model = ir.serde.deserialize_model(onnx.load(MODELS / "trained" / "vit_small_fmnist.onnx"))
    result = optimize(model, None, OptimizeOptions(quantization=QuantizeOptions()), calibration_data=batches)
    assert result.quantization.kernels.kernels == "fast"
    lowered = ir.serde.serialize_model(result.model)
    assert any(node.op_type == "QAttention" for node in lowered.graph.node)
    parity = check_parity(result.quantization.qdq_model, lowered, batches, expected_reason="fast kernels")
    assert parity.flagged and all("attention" in tensor.tensor for tensor in parity.flagged), parity.flagged


def _break_zero_point(lowered: onnx.ModelProto, op_type: str, shift: int) -> str:
    """Move the output zero point of the first ``op_type`` node by ``shift``; returns the tensor it writes."""
    node = next(node for node in lowered.graph.node if node.op_type == op_type)
    position = {"QLinearConv": 7, "QLinearMatMul": 7, "QLinearAdd": 7}[op_type]
    initializers = {initializer.name: initializer for initializer in lowered.graph.initializer}
    zero_point = numpy_helper.to_array(initializers[node.input[position]])
    broken = (zero_point.astype(np.int32) + shift).astype(zero_point.dtype)
    name = f"{node.input[position]}__broken"
    lowered.graph.initializer.append(numpy_helper.from_array(broken, name))
    node.input[position] = name
    return node.output[0]


def test_a_wrong_zero_point_is_flagged_on_its_layer_alone():
    batches = calibration_batches(count=2)
    qdq, lowered = _quantized(residual_cnn(), batches)
    assert check_parity(qdq, lowered, batches).clean
    convs = [node for node in lowered.graph.node if node.op_type == "QLinearConv"]
    assert len(convs) >= 2
    broken = _break_zero_point(lowered, "QLinearConv", 5)
    result = check_parity(qdq, lowered, batches)
    assert [tensor.tensor for tensor in result.flagged] == [broken]
    flagged = result.flagged[0]
    assert flagged.max_steps >= 4 and flagged.mismatch_fraction > 0.5
    assert flagged.producer.startswith("QLinearConv")
    # the layers after it are fed the simulation's codes in isolation: not flagged, but they drift end to end
    later = [tensor for tensor in result.tensors if tensor.tensor != broken]
    assert all(tensor.max_steps <= 1 for tensor in later)
    assert max(tensor.end_to_end_max_steps for tensor in later) > 1
    markdown = "\n".join(result.to_markdown())
    assert broken in markdown and "**yes**" in markdown


def test_an_expected_departure_is_reported_without_a_warning(caplog):
    batches = calibration_batches(count=1)
    qdq, lowered = _quantized(residual_cnn(), batches)
    broken = _break_zero_point(lowered, "QLinearConv", 5)
    with caplog.at_level("INFO", logger="qgraph.parity"):
        result = check_parity(qdq, lowered, batches, expected_reason="a lowering that leaves the simulation")
    assert [tensor.tensor for tensor in result.flagged] == [broken]  # still measured and flagged
    assert not [record for record in caplog.records if record.levelname == "WARNING"]
    assert "1 tensor(s) off by more than 1 step, as expected: a lowering that leaves the simulation" in caplog.text
    assert "Departures expected: a lowering that leaves the simulation." in result.to_markdown()


def test_a_qdq_model_without_lowering_compares_itself_exactly():
    batches = calibration_batches(count=1)
    qdq, _ = _quantized(residual_cnn(), batches)
    result = check_parity(qdq, qdq, batches)
    # onnxruntime fuses the QDQ graph at full optimisation: still within a step of the simulation
    assert result.clean and result.tensors
