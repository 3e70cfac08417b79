"""ort-cpu's transformer_kernels option: "fast" adds QAttention, FastGelu and float residuals to the lowering, "exact"
(default) not."""

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
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions
from qgraph.targets import TargetOptions, get_target

FAST = (LowerQuantizedAttention, LowerFastGelu, BypassFloatDequantize)
LAYOUT = BertLayout(layers=2, hidden=64, heads=4, intermediate=256, vocabulary=256, max_positions=64)


def test_the_default_lowering_keeps_exact_kernels():
    passes = get_target("ort-cpu", TargetOptions()).lowering_passes()
    assert not set(FAST) & set(passes)


def test_fast_adds_the_fused_passes_after_the_lowering():
    passes = get_target("ort-cpu", TargetOptions(transformer_kernels="fast")).lowering_passes()
    assert passes[-3:] == FAST
    assert get_target("ort-cpu", TargetOptions(transformer_kernels="fast", format="qdq")).lowering_passes() == ()


def test_an_unknown_choice_names_itself():
    with pytest.raises(QGraphError, match="transformer_kernels must be exact or fast, got 'quick'"):
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
        assert ("Departures expected: --transformer-kernels fast ran BypassFloatDequantize, LowerFastGelu, "
                "LowerQuantizedAttention" in text) == (kernels == "fast")
    page = tmp_path / "fast.html"
    result = CliRunner().invoke(cli, [*arguments, "-o", str(tmp_path / "fast2.onnx"), "--transformer-kernels", "fast",
                                      "--report", str(page)])
    assert result.exit_code == 0 and "Departures expected: --transformer-kernels fast ran" in page.read_text()
    refused = CliRunner().invoke(cli, [*arguments, "-o", str(tmp_path / "x.onnx"), "--transformer-kernels", "quick"])
    assert refused.exit_code == 2 and "'quick' is not one of 'exact', 'fast'" in refused.output
