"""The speed choice as qgraph runs it by default: quantize() times its candidates on the first calibration batch,
writes the fastest integer model that is not slower than FP32, the FP32 model with a warning when none is, and the
command line says so."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from qgraph import ptq
from qgraph.cli import cli
from qgraph.errors import QGraphError
from qgraph.latency import LatencyOptions, LatencyTable
from qgraph.models.mobilenet_v3 import build_mobilenet_v3
from qgraph.ptq import QuantizeOptions, quantize
from qgraph.speed_choice import FLOAT, QDQ, QOPERATOR, Candidate, choose_speed
from qgraph.targets import TargetOptions

pytestmark = pytest.mark.speed_choice

TARGET_OPTIONS = TargetOptions(reduce_range="off", saturation_guard="off")


def batches(count: int = 2, batch: int = 4) -> list[dict[str, np.ndarray]]:
    generator = np.random.default_rng(0)
    return [{"input": generator.standard_normal((batch, 1, 28, 28)).astype(np.float32)} for _ in range(count)]


def model() -> ir.Model:
    return ir.serde.deserialize_model(build_mobilenet_v3("tiny"))


@pytest.fixture()
def fake_times(monkeypatch):
    """quantize()'s speed choice with fixed run times per candidate name (``times["*"]``, else 1.0, for names not
    listed); records the models and the feeds each measurement received."""
    times: dict[str, float] = {}
    calls: list[tuple[tuple[str, ...], dict]] = []

    def measure(models, options: LatencyOptions, *, reference: str, feeds=None) -> LatencyTable:
        calls.append((tuple(models), feeds))
        samples = {size: {name: tuple(times.get(name, times.get("*", 1.0)) * size for _ in range(options.rounds))
                          for name in models}
                   for size in options.batch_sizes}
        return LatencyTable(reference, samples, options.threads)

    monkeypatch.setattr(ptq, "choose_speed", lambda *args, **kwargs: choose_speed(*args, measure=measure, **kwargs))
    return times, calls


def ops(proto_or_model) -> Counter:
    proto = proto_or_model if isinstance(proto_or_model, onnx.ModelProto) else ir.serde.serialize_model(proto_or_model)
    return Counter(node.op_type for node in proto.graph.node)


def test_the_default_keeps_a_region_fp32_where_that_is_faster(fake_times):
    times, calls = fake_times
    depthwise = Candidate(QOPERATOR, ("depthwise",)).name
    times.update({FLOAT: 1.8, QOPERATOR: 1.0, QDQ: 1.5, depthwise: 0.8})  # a lead below the decisive 2x
    result = quantize(model(), batches(), QuantizeOptions(target_options=TARGET_OPTIONS, min_sqnr=None))
    assert result.speed.candidate == Candidate(QOPERATOR, ("depthwise",)) and not result.speed.slower_than_float
    assert ops(result.model)["Conv"] == 5 and ops(result.model)["QLinearConv"] > 0  # the 5 depthwise convs
    assert "nodes kept FP32 for speed" in result.speed.describe()
    # timed on the first calibration batch (4 samples) and its first sample
    first_models, feeds = calls[0]
    # the lead (the lowering against FP32), then the formats against each other, then FP32 beside the best and the
    # trials in the table that gives the verdict
    assert first_models == (FLOAT, QOPERATOR) and calls[1][0] == (QOPERATOR, QDQ)
    assert calls[2][0][:2] == (FLOAT, QOPERATOR) and len(calls[2][0]) > 2
    assert {size: array["input"].shape for size, array in feeds.items()} == {1: (1, 1, 28, 28), 4: (4, 1, 28, 28)}
    np.testing.assert_array_equal(feeds[4]["input"], batches()[0]["input"])


def test_when_every_integer_model_is_slower_the_fp32_model_is_written_with_a_loud_warning(fake_times, caplog):
    times, calls = fake_times
    times.update({FLOAT: 1.0, QOPERATOR: 1.3, QDQ: 1.2, "*": 1.25})  # every region variant slower too
    options = QuantizeOptions(target_options=TARGET_OPTIONS, min_sqnr=None)
    with caplog.at_level("WARNING", logger="qgraph.speed_choice"):
        result = quantize(model(), batches(), options)
    assert result.speed.candidate == Candidate(FLOAT) and not result.speed.slower_than_float
    assert ops(result.model)["QuantizeLinear"] == 0 and ops(result.model)["Conv"] == ops(build_mobilenet_v3("tiny"))[
        "Conv"]
    assert result.speed.describe().startswith("WARNING: FP32 kept")
    assert "FP32 (batch 1/4)" in result.speed.describe()
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any("slower than FP32" in message and "FP32 model is written" in message for message in warnings)
    # every region class was slower in FP32 too: nothing to rescue; the verdict confirmed by the two alone
    assert len(calls) == 4 and calls[3][0] == (FLOAT, QDQ)  # the lead, the formats, the trials, the confirmation


def test_the_plain_lowering_stays_unless_another_format_is_clearly_faster(fake_times):
    times, _ = fake_times
    times.update({FLOAT: 1.8, QOPERATOR: 1.0, QDQ: 0.99})  # within the margin: noise
    result = quantize(model(), batches(), QuantizeOptions(target_options=TARGET_OPTIONS, min_sqnr=None))
    assert result.speed.candidate == Candidate(QOPERATOR)
    times.update({QDQ: 0.8})
    result = quantize(model(), batches(), QuantizeOptions(target_options=TARGET_OPTIONS, min_sqnr=None))
    assert result.speed.candidate == Candidate(QDQ) and ops(result.model)["QLinearConv"] == 0


def test_a_decisive_lead_times_nothing_else(fake_times):
    times, calls = fake_times
    times.update({FLOAT: 2.5, QOPERATOR: 1.0, QDQ: 0.5, "*": 0.5})  # faster candidates that are never timed
    result = quantize(model(), batches(), QuantizeOptions(target_options=TARGET_OPTIONS, min_sqnr=None))
    assert [models for models, _ in calls] == [(FLOAT, QOPERATOR)]
    assert result.speed.candidate == Candidate(QOPERATOR) and result.speed.speedup == {1: 2.5, 4: 2.5}
    assert "past the decisive 2×: no other candidate timed" in result.speed.reason
    calls.clear()
    times.update({FLOAT: 1.9})  # just below: the search runs
    result = quantize(model(), batches(), QuantizeOptions(target_options=TARGET_OPTIONS, min_sqnr=None))
    assert len(calls) > 1 and result.speed.candidate != Candidate(QOPERATOR)
    calls.clear()
    times.update({FLOAT: 2.5})  # decisive again, but every candidate asked for
    options = QuantizeOptions(target_options=TARGET_OPTIONS, min_sqnr=None, speed_choice_lead=None)
    result = quantize(model(), batches(), options)
    assert calls[0][0] == (QOPERATOR, QDQ) and result.speed.candidate != Candidate(QOPERATOR)
    with pytest.raises(QGraphError, match="speed_choice_lead must be at least 1.1, got 1.05"):
        QuantizeOptions(speed_choice_lead=1.05)


def test_an_explicit_format_is_kept_and_the_choice_can_be_turned_off(fake_times):
    times, calls = fake_times
    times.update({FLOAT: 2.0, QOPERATOR: 1.0, QDQ: 0.5})
    options = QuantizeOptions(target_options=TargetOptions(format="qoperator", reduce_range="off"), min_sqnr=None)
    result = quantize(model(), batches(), options)
    # one format and region classes to try: no format table, the first is the trial table
    assert calls[0][0][:2] == (FLOAT, QOPERATOR) and all(QDQ not in models for models, _ in calls)
    assert result.speed.candidate.format == QOPERATOR
    calls.clear()
    result = quantize(model(), batches(), QuantizeOptions(target_options=TARGET_OPTIONS, min_sqnr=None,
                                                          speed_choice=False))
    assert result.speed is None and not calls
    result = quantize(model(), batches(), QuantizeOptions(target="tensorrt", min_sqnr=None))
    assert result.speed is None and not calls  # timing onnxruntime on this CPU says nothing about TensorRT
    with pytest.raises(QGraphError, match="speed_choice_seconds"):
        QuantizeOptions(speed_choice_seconds=0)


def test_a_real_default_run_measures_and_reports_its_choice():
    result = quantize(model(), batches(), QuantizeOptions(target_options=TARGET_OPTIONS, min_sqnr=None))
    speed = result.speed
    assert speed is not None and speed.tables and set(speed.speedup) == {1, 4}
    assert ops(result.model) == ops(speed.model)
    # the budget bounds the rounds: every table has at least min_rounds (2) and at most the rounds asked (200)
    assert FLOAT in speed.tables[-1].models
    for table in speed.tables:
        for size in table.batch_sizes:
            assert 2 <= len(table.samples[size][table.reference]) <= 200


def test_the_latency_budget_bounds_the_rounds():
    options = LatencyOptions(batch_sizes=(1, 8), rounds=50, min_rounds=3, budget_seconds=2.0)
    assert options.rounds_within_budget(0.001) == 50
    assert options.rounds_within_budget(0.1) == 10  # 1 s per batch size
    assert options.rounds_within_budget(5.0) == 3
    assert LatencyOptions(rounds=7).rounds_within_budget(10.0) == 7
    with pytest.raises(QGraphError, match="budget"):
        LatencyOptions(budget_seconds=0)


def test_timing_takes_the_batch_on_the_models_free_axis():
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, "batch", 4]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 8]),
              helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8]),
              helper.make_tensor_value_info("fixed", TensorProto.FLOAT, [1, 3])]
    graph = helper.make_graph([], "signature", inputs, [])
    proto = helper.make_model(graph)
    assert ptq._timing_axes(proto, None) == {"x": 1, "state": 1, "image": 0, "fixed": None}
    # the data's axis is taken where the model leaves that dimension free
    assert ptq._timing_axes(proto, {"x": 0, "image": 0})["x"] == 1


def test_cli_reports_the_speed_choice_and_can_turn_it_off(tmp_path):
    model_path = tmp_path / "model.onnx"
    onnx.save(build_mobilenet_v3("tiny"), model_path)
    np.savez(tmp_path / "calib.npz", input=np.concatenate([batch["input"] for batch in batches()]))
    runner = CliRunner()
    common = ["optimize", str(model_path), "--calib", str(tmp_path / "calib.npz"), "--min-sqnr", "off"]
    result = runner.invoke(cli, [*common, "-o", str(tmp_path / "default.onnx")])
    assert result.exit_code == 0, result.output
    assert "; speed: " in result.output and "FP32 (batch 1/8)" in result.output
    result = runner.invoke(cli, [*common, "-o", str(tmp_path / "plain.onnx"), "--no-speed-choice"])
    assert result.exit_code == 0, result.output
    assert "speed:" not in result.output
    assert "QLinearConv" in ops(onnx.load(tmp_path / "plain.onnx"))
    result = runner.invoke(cli, ["optimize", str(model_path), "-o", str(tmp_path / "x.onnx"), "--no-speed-choice"])
    assert result.exit_code != 0 and "--calib" in result.output
    help_text = runner.invoke(cli, ["optimize", "--help"]).output
    assert "--speed-choice / --no-speed-choice" in help_text and "slower" in help_text


def test_the_stream_models_regions_reach_through_layout_operators_and_feeders():
    from qgraph.data import DataLayout, dataset_from_arrays
    from qgraph.models.stream_vad import build_stream_vad, stream_feeds, synthetic_speech
    from qgraph.pipeline import OptimizeOptions, optimize
    from qgraph.speed_regions import find_regions

    float_model = build_stream_vad("LSTM")
    feeds = list(stream_feeds(float_model, synthetic_speech(0.5)))
    data = dataset_from_arrays({"input": np.concatenate([feed["input"] for feed in feeds]),
                                "state": np.concatenate([feed["state"] for feed in feeds], axis=1)},
                               layout=DataLayout({"state": 1}))
    options = OptimizeOptions(quantization=QuantizeOptions(min_sqnr=None, speed_choice=False),
                              fixed_inputs={"sr": 16000})
    result = optimize(ir.serde.deserialize_model(float_model), None, options, calibration_data=data)
    regions = find_regions(ir.serde.deserialize_model(result.quantization.qdq_model))
    # the Conv1d front end reads the audio through an Unsqueeze; the decoder Gemm is fed by a Relu of its own
    assert {"front_end_16k.conv", "front_end_16k.unsqueeze"} <= regions["stem"]
    assert {"decoder_matmul", "decoder_relu"} <= regions["small-matmul"]


def test_fast_transformer_kernels_are_not_claimed_when_the_speed_choice_writes_qdq(fake_times):
    """auto's fast kernels live in the QOperator lowering: when QDQ wins, the choice and the records say exact."""
    from qgraph.models.bert import BertLayout, BertOptions, build_bert, example_inputs

    times, _ = fake_times
    times.update({FLOAT: 1.5, QOPERATOR: 1.2, QDQ: 1.0})  # QDQ clearly faster, no lead past 2x
    layout = BertLayout(layers=1, hidden=32, heads=2, intermediate=64, vocabulary=64, max_positions=32)
    encoder = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(build_bert(layout, options=BertOptions())))
    calibration = [example_inputs(layout, 4, 16, seed=seed) for seed in range(2)]
    result = quantize(encoder, calibration, QuantizeOptions(target_options=TARGET_OPTIONS))
    assert result.speed.candidate == Candidate(QDQ)
    assert result.kernels.kernels == "exact" and "not written: the speed choice chose qdq" in result.kernels.reason
    assert not {record.name for record in result.records if record.modified} & {"LowerQuantizedAttention",
                                                                                   "LowerFastGelu"}
    assert ops(result.model)["QAttention"] == 0
