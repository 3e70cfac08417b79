"""ort-cpu's transformer_kernels option: "fast" adds QAttention, FastGelu and float residuals to the lowering, "exact"
not; "auto" (default) lowers exactly, and after PTQ adds the fast kernels where they hold against FP32."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph import runtime
from qgraph.errors import QGraphError
from qgraph.models.bert import BertLayout, BertOptions, build_bert, example_inputs
from qgraph.passes.lower.bypass_float_dequantize import BypassFloatDequantize
from qgraph.passes.lower.lower_fast_gelu import LowerFastGelu
from qgraph.passes.lower.lower_quantized_attention import LowerQuantizedAttention
from qgraph.passes.lower.lower_quantized_gather import LowerQuantizedGather
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions
from qgraph.targets import TargetOptions, get_target

FAST = (LowerQuantizedAttention, LowerFastGelu, BypassFloatDequantize)
LAYOUT = BertLayout(layers=2, hidden=64, heads=4, intermediate=256, vocabulary=256, max_positions=64)


@pytest.mark.parametrize("kernels", ["auto", "exact"])
def test_the_target_lowering_keeps_exact_kernels(kernels):
    passes = get_target("ort-cpu", TargetOptions(transformer_kernels=kernels)).lowering_passes()
    assert not set(FAST) & set(passes)
    assert TargetOptions().transformer_kernels == "auto"


def test_fast_adds_the_fused_passes_after_the_lowering():
    passes = get_target("ort-cpu", TargetOptions(transformer_kernels="fast")).lowering_passes()
    assert passes[-3:] == FAST
    assert get_target("ort-cpu", TargetOptions(transformer_kernels="fast", format="qdq")).lowering_passes() == (
        LowerQuantizedGather,)


def test_an_unknown_choice_names_itself():
    with pytest.raises(QGraphError, match="transformer_kernels must be one of auto, exact, fast, got 'quick'"):
        get_target("ort-cpu", TargetOptions(transformer_kernels="quick")).lowering_passes()


def _cosine(reference: np.ndarray, other: np.ndarray) -> float:
    a, b = reference.reshape(len(reference), -1), other.reshape(len(other), -1)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_a_fast_encoder_runs_fused_and_stays_close_to_fp32(activations):
    proto = onnx.shape_inference.infer_shapes(build_bert(LAYOUT, options=BertOptions(), seed=3))
    batches = [example_inputs(LAYOUT, 4, 16, seed=seed) for seed in range(3)]
    outputs = {}
    for kernels in ("exact", "fast"):
        quantization = QuantizeOptions(min_sqnr=None, activations=activations, speed_choice=False,
                                       target_options=TargetOptions(reduce_range="off", transformer_kernels=kernels))
        result = optimize(ir.serde.deserialize_model(proto), None, OptimizeOptions(quantization=quantization),
                          calibration_data=batches)
        written = ir.serde.serialize_model(result.model)
        onnx.checker.check_model(written, full_check=True)
        op_types = [node.op_type for node in written.graph.node]
        assert (op_types.count("QAttention") == LAYOUT.layers) == (kernels == "fast")
        # static activations quantize the GELU output with a constant scale; dynamic ones at run time (kept exact)
        assert ("FastGelu" in op_types) == (kernels == "fast" and activations == "static")
        # static activations: each LayerNorm output is quantized for a projection and dequantized for the residual
        # Add; fast lets the Add read the float output, exact keeps the simulation's view
        producers = {output: node.op_type for node in written.graph.node for output in node.output}
        residual_pairs = sum(node.op_type == "DequantizeLinear" and producers.get(node.input[0]) == "QuantizeLinear"
                             for node in written.graph.node)
        assert (residual_pairs > 0) == (kernels == "exact" and activations == "static")
        feeds = example_inputs(LAYOUT, 3, 16, seed=11)  # padded rows included
        session = runtime.create_session(written, optimize=True)
        outputs[kernels] = session.run(["last_hidden_state"], feeds)[0]
    reference = runtime.create_session(proto).run(["last_hidden_state"], feeds)[0]
    assert _cosine(reference, outputs["fast"]) >= 0.99
    assert _cosine(reference, outputs["fast"]) >= _cosine(reference, outputs["exact"]) - 0.002


def test_the_command_line_option_reaches_the_lowering(tmp_path):
    from click.testing import CliRunner

    from qgraph.cli import cli

    proto = onnx.shape_inference.infer_shapes(build_bert(LAYOUT, options=BertOptions(), seed=3))
    onnx.save(proto, tmp_path / "bert.onnx")
    batch = example_inputs(LAYOUT, 4, 16, seed=0)
    np.savez(tmp_path / "calib.npz", **batch)
    arguments = ["--quiet", "optimize", str(tmp_path / "bert.onnx"), "--calib", str(tmp_path / "calib.npz"),
                 "--no-speed-choice", "--min-sqnr", "off", "--reduce-range", "off"]
    for kernels in ("exact", "fast"):
        output = tmp_path / f"{kernels}.onnx"
        report = tmp_path / f"{kernels}.md"
        result = CliRunner().invoke(cli, [*arguments, "-o", str(output), "--transformer-kernels", kernels,
                                          "--report", str(report)])
        assert result.exit_code == 0, result.output
        op_types = [node.op_type for node in onnx.load(output).graph.node]
        assert (op_types.count("QAttention") == LAYOUT.layers) == (kernels == "fast")
        # the report's parity section says the fast kernels leave the simulation on purpose, and names them
        text = report.read_text()
        assert ("Departures expected: the fast transformer kernels ran (BypassFloatDequantize, LowerFastGelu, "
                "LowerQuantizedAttention;" in text) == (kernels == "fast")
    page = tmp_path / "fast.html"
    result = CliRunner().invoke(cli, [*arguments, "-o", str(tmp_path / "fast2.onnx"), "--transformer-kernels", "fast",
                                      "--report", str(page)])
    assert result.exit_code == 0 and "Departures expected: the fast transformer kernels ran" in page.read_text()
    refused = CliRunner().invoke(cli, [*arguments, "-o", str(tmp_path / "x.onnx"), "--transformer-kernels", "quick"])
    assert refused.exit_code == 2 and "'quick' is not one of 'auto', 'exact', 'fast'" in refused.output


def _auto_result(proto, batches, **quantize_options):
    quantization = QuantizeOptions(speed_choice=False, target_options=TargetOptions(reduce_range="off"),
                                   **quantize_options)
    return optimize(ir.serde.deserialize_model(proto), None, OptimizeOptions(quantization=quantization),
                    calibration_data=batches)


def test_auto_takes_the_fast_kernels_on_an_encoder_whose_output_holds():
    proto = onnx.shape_inference.infer_shapes(build_bert(LAYOUT, options=BertOptions(), seed=3))
    batches = [example_inputs(LAYOUT, 4, 16, seed=seed) for seed in range(3)]
    result = _auto_result(proto, batches)
    choice = result.quantization.kernels
    assert choice is not None and choice.kernels == "fast", choice
    written = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(written, full_check=True)
    assert [node.op_type for node in written.graph.node].count("QAttention") == LAYOUT.layers
    # the choice was measured: the fast model's SQNR against FP32, within the tolerance of the simulation's
    simulated = result.quantization.sensitivity.final_output_sqnr_db
    assert choice.output_sqnr_db >= simulated - 0.5
    assert "LowerQuantizedAttention" in choice.reason


def test_auto_keeps_the_exact_kernels_when_the_fast_ones_fall_short(monkeypatch):
    """A tolerance no model can meet: the fast lowering is measured, found short, and the exact one written."""
    import qgraph.transformer_kernels as kernels

    monkeypatch.setattr(kernels, "TOLERANCE_DB", -1000.0)
    proto = onnx.shape_inference.infer_shapes(build_bert(LAYOUT, options=BertOptions(), seed=3))
    batches = [example_inputs(LAYOUT, 4, 16, seed=seed) for seed in range(3)]
    result = _auto_result(proto, batches)
    choice = result.quantization.kernels
    assert choice.kernels == "exact" and choice.output_sqnr_db is not None and "below" in choice.reason
    assert "QAttention" not in [node.op_type for node in ir.serde.serialize_model(result.model).graph.node]
    assert not {record.name for record in result.quantization.records if record.modified} & {
        "LowerQuantizedAttention", "LowerFastGelu"}


def test_auto_keeps_the_exact_kernels_without_a_reference_or_a_transformer():
    from tests.ptq.small_models import calibration_batches, residual_cnn

    proto = onnx.shape_inference.infer_shapes(build_bert(LAYOUT, options=BertOptions(), seed=3))
    batches = [example_inputs(LAYOUT, 4, 16, seed=seed) for seed in range(2)]
    unchecked = _auto_result(proto, batches, min_sqnr=None).quantization.kernels
    assert unchecked.kernels == "exact" and "no FP32 reference" in unchecked.reason
    cnn = _auto_result(residual_cnn(), list(calibration_batches(count=3))).quantization.kernels
    assert cnn.kernels == "exact" and "no attention block or GELU" in cnn.reason
    asked = QuantizeOptions(speed_choice=False, target_options=TargetOptions(transformer_kernels="exact"))
    result = optimize(ir.serde.deserialize_model(proto), None, OptimizeOptions(quantization=asked),
                      calibration_data=batches)
    assert result.quantization.kernels is None
