"""The speed choice per connected integer region, on the stream VAD: its two integer regions (the Conv1d front end,
the decoder behind the float LSTM), each kept FP32 on its own, the rescue of a model still slower than FP32, and the
FP32 model as the last resort, loudly; with a fake latency function (deterministic) and once for real."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph import runtime, speed_regions
from qgraph.data import DataLayout, dataset_from_arrays
from qgraph.errors import QGraphError
from qgraph.latency import LatencyOptions, LatencyTable
from qgraph.models.stream_vad import build_stream_vad, stream_feeds, synthetic_speech
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions
from qgraph.speed_choice import FLOAT, QDQ, QOPERATOR, Candidate, SpeedChoiceOptions, build_candidate, choose_speed
from qgraph.targets import TargetOptions
from tests.speed_choice_fakes import TARGET_OPTIONS, fake_measure, lowering, ops

FRONT_END = "region:front_end_16k.conv"
DECODER = "region:decoder_matmul"


def stream_data(seconds: float = 0.5):
    feeds = list(stream_feeds(build_stream_vad("LSTM"), synthetic_speech(seconds)))
    return dataset_from_arrays({"input": np.concatenate([feed["input"] for feed in feeds]),
                                "state": np.concatenate([feed["state"] for feed in feeds], axis=1)},
                               layout=DataLayout({"state": 1}))


@functools.cache
def _vad(speed_choice: bool = False) -> tuple[bytes, bytes]:
    options = OptimizeOptions(quantization=QuantizeOptions(target_options=TARGET_OPTIONS, min_sqnr=None,
                                                           speed_choice=speed_choice),
                              fixed_inputs={"sr": 16000})
    result = optimize(ir.serde.deserialize_model(build_stream_vad("LSTM")), None, options,
                      calibration_data=stream_data())
    return result.float_model.SerializeToString(), result.quantization.qdq_model.SerializeToString()


def vad() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    float_bytes, qdq_bytes = _vad()
    return onnx.ModelProto.FromString(float_bytes), onnx.ModelProto.FromString(qdq_bytes)




def feeds_of(batch: int = 3) -> dict[str, np.ndarray]:
    feeds = list(stream_feeds(build_stream_vad("LSTM"), synthetic_speech(0.2, seed=4)))[:batch]
    return {"input": np.concatenate([feed["input"] for feed in feeds]),
            "state": np.concatenate([feed["state"] for feed in feeds], axis=1)}



def choice_options(**changes) -> SpeedChoiceOptions:
    """Options for the region trials: every candidate timed, whatever the lead."""
    return SpeedChoiceOptions(latency=LatencyOptions(batch_sizes=(1, 8), rounds=4),
                              **{"decisive_speedup": None, **changes})


def test_the_stream_vad_has_two_integer_regions_closed_under_their_qdq_pairs():
    _, qdq_model = vad()
    regions = speed_regions.find_integer_regions(ir.serde.deserialize_model(qdq_model))
    assert regions == {
        FRONT_END: {"front_end_16k.unsqueeze", "front_end_16k.conv", "front_end_relu", "encoder", "encoder_relu",
                    "pool"},
        # the float LSTM writes the quantized h and c; the Concat of the next state reads them through DQ
        DECODER: {"lstm", "next_state", "last_hidden", "decoder_relu", "decoder_matmul", "probability"},
    }
    # a CNN's integer nodes form one region: nothing to try beyond the region classes
    from qgraph.models.mobilenet_v3 import build_mobilenet_v3

    options = OptimizeOptions(quantization=QuantizeOptions(target_options=TARGET_OPTIONS, min_sqnr=None))
    generator = np.random.default_rng(0)
    batches = [{"input": generator.standard_normal((2, 1, 28, 28)).astype(np.float32)}]
    result = optimize(ir.serde.deserialize_model(build_mobilenet_v3("tiny")), None, options, calibration_data=batches)
    assert len(speed_regions.find_integer_regions(ir.serde.deserialize_model(result.quantization.qdq_model))) == 1


def test_a_region_kept_fp32_leaves_no_qdq_inside_or_at_its_border():
    float_model, qdq_model = vad()
    regions = speed_regions.find_integer_regions(ir.serde.deserialize_model(qdq_model))
    front_end_float = build_candidate(qdq_model, QOPERATOR, regions[FRONT_END], lowering())
    decoder_float = build_candidate(qdq_model, QOPERATOR, regions[DECODER], lowering())
    integer = build_candidate(qdq_model, QOPERATOR, frozenset(), lowering())
    assert ops(integer)["QLinearConv"] == 2 and ops(integer)["QGemm"] == 1
    assert ops(front_end_float)["QLinearConv"] == 0 and ops(front_end_float)["Conv"] == 2
    assert ops(front_end_float)["QGemm"] == 1
    assert ops(decoder_float)["QLinearConv"] == 2 and ops(decoder_float)["QGemm"] == 0
    # the decoder region reaches back to the LSTM: no Q/DQ on h and c is left
    lstm_outputs = {"lstm_h", "lstm_c"}
    assert not any(node.op_type == "QuantizeLinear" and node.input[0] in lstm_outputs
                   for node in decoder_float.graph.node)
    both = build_candidate(qdq_model, QOPERATOR, regions[FRONT_END] | regions[DECODER], lowering())
    assert ops(both)["QuantizeLinear"] == 0 and ops(both)["DequantizeLinear"] == 0
    feeds = feeds_of()
    expected = runtime.run(runtime.create_session(float_model), feeds)
    for model in (front_end_float, decoder_float, both):
        onnx.checker.check_model(model, full_check=True)
        actual = runtime.run(runtime.create_session(model), feeds)
        assert np.abs(actual["output"] - expected["output"]).max() < 0.05
        assert actual["stateN"].shape == expected["stateN"].shape
    # all regions FP32: only the weights' rounding is left
    actual = runtime.run(runtime.create_session(both), feeds)
    assert np.abs(actual["output"] - expected["output"]).max() < 0.01


def test_a_region_that_is_faster_in_fp32_is_kept_fp32():
    float_model, qdq_model = vad()
    decoder = Candidate(QOPERATOR, (DECODER,)).name
    measure, calls = fake_measure({FLOAT: 1.0, QOPERATOR: 1.05, QDQ: 1.2, decoder: 0.95, "*": 1.05})
    choice = choose_speed(float_model, qdq_model, lowering(), choice_options(), measure=measure)
    assert choice.candidate == Candidate(QOPERATOR, (DECODER,))
    assert choice.speedup == {1: pytest.approx(1 / 0.95), 8: pytest.approx(1 / 0.95)}
    assert ops(choice.model)["QLinearConv"] == 2 and ops(choice.model)["QGemm"] == 0
    # the second table tried both region classes present and both integer regions, each on its own
    assert set(calls[1]) == {FLOAT, QOPERATOR, Candidate(QOPERATOR, ("stem",)).name,
                             Candidate(QOPERATOR, ("small-matmul",)).name, decoder,
                             Candidate(QOPERATOR, (FRONT_END,)).name}
    # 1.05× FP32 is near 1×: confirmed by the two alone
    assert len(calls) == 3 and calls[2] == (FLOAT, decoder) and f"fp32 {DECODER} (6 nodes)" in choice.reason
    assert "confirmed on 2 tables" in choice.reason  # the trials' table and the confirmation
    assert choice.regions[DECODER] == 6 and not choice.describe().startswith("WARNING")


def test_a_model_still_slower_keeps_every_region_that_did_not_pay_fp32():
    float_model, qdq_model = vad()
    stem = Candidate(QOPERATOR, ("stem",)).name
    small_matmul = Candidate(QOPERATOR, ("small-matmul",)).name
    rescued = Candidate(QOPERATOR, ("stem", "small-matmul")).name
    # each class alone gains less than the margin (not taken) and leaves the model slower than FP32; together
    # they make it faster
    measure, calls = fake_measure({FLOAT: 1.0, QOPERATOR: 1.1, QDQ: 1.2, stem: 1.09, small_matmul: 1.08,
                                   rescued: 0.98, "*": 1.2})
    choice = choose_speed(float_model, qdq_model, lowering(), choice_options(), measure=measure)
    assert choice.candidate == Candidate(QOPERATOR, ("stem", "small-matmul"))
    assert len(calls) == 4 and calls[2] == (FLOAT, QOPERATOR, rescued) and calls[3] == (FLOAT, rescued)
    assert "every region not slower in FP32" in choice.reason
    assert min(choice.speedup.values()) >= 1.0


def test_the_fp32_model_is_the_last_resort_and_says_so(caplog):
    float_model, qdq_model = vad()
    # every region helps a little (within the margin), never enough: keeping them all FP32 is the FP32 model, not
    # measured again
    measure, calls = fake_measure({FLOAT: 1.0, QOPERATOR: 1.2, QDQ: 1.3, "*": 1.19})
    with caplog.at_level("WARNING", logger="qgraph.speed_choice"):
        choice = choose_speed(float_model, qdq_model, lowering(), choice_options(), measure=measure)
    assert choice.candidate == Candidate(FLOAT) and choice.model is float_model
    assert len(calls) == 3 and calls[2] == (FLOAT, QOPERATOR)  # the verdict confirmed, no rescue
    assert choice.describe().startswith("WARNING: FP32 kept")
    assert any("FP32 model is written" in record.getMessage() for record in caplog.records
               if record.levelname == "WARNING")
    # asked for an integer model whatever its speed: the fastest one, marked
    integer = choose_speed(float_model, qdq_model, lowering(), choice_options(keep_float_when_slower=False),
                           measure=measure)
    assert integer.slower_than_float and integer.candidate.format == QOPERATOR
    assert integer.describe().startswith("WARNING: the integer model runs SLOWER")


def test_max_regions_bounds_the_trials():
    float_model, qdq_model = vad()
    measure, calls = fake_measure({FLOAT: 2.0, QOPERATOR: 1.0})
    choose_speed(float_model, qdq_model, lowering(), choice_options(max_regions=0), measure=measure)
    assert not any(name.startswith(f"{QOPERATOR}+fp32[region:") for name in calls[1])
    calls.clear()
    choose_speed(float_model, qdq_model, lowering(), choice_options(max_regions=1, region_classes=()),
                 measure=measure)
    assert len(calls[1]) == 3  # FP32, the format, one region
    with pytest.raises(QGraphError, match="max_regions"):
        SpeedChoiceOptions(max_regions=-1)
    with pytest.raises(QGraphError, match="confirm_band"):
        SpeedChoiceOptions(confirm_band=-0.1)


def test_a_slow_verdict_is_confirmed_on_the_pooled_runs_before_fp32_is_kept():
    """A candidate that one table puts below FP32 at batch 8 and the confirmation above: the pooled fast quartiles
    keep the integer model (noise on a loaded machine must not throw away a 1.4× model)."""
    float_model, qdq_model = vad()
    tables_made: list[tuple[str, ...]] = []

    def measure(models, options: LatencyOptions, *, reference: str) -> LatencyTable:
        tables_made.append(tuple(models))
        first = len(tables_made) == 1
        samples = {}
        for size in options.batch_sizes:
            samples[size] = {}
            for name in models:
                if name == FLOAT:
                    seconds = 1.0
                elif name == QOPERATOR and size == 8 and first:
                    seconds = 1.3  # a noisy first table: 0.77× at batch 8
                elif name == QOPERATOR:
                    seconds = 0.7
                else:
                    seconds = 0.75  # every region FP32 slower than the integer model
                samples[size][name] = tuple(seconds * size for _ in range(options.rounds))
        return LatencyTable(reference, samples, options.threads)

    options = choice_options(region_classes=(), max_regions=0)
    choice = choose_speed(float_model, qdq_model, lowering(), options, measure=measure)
    assert tables_made == [(FLOAT, QOPERATOR, QDQ), (FLOAT, QOPERATOR)]
    assert choice.candidate == Candidate(QOPERATOR)
    # pooled: FP32's q25 is 8 at batch 8; QOPERATOR's runs are 4 of 10.4 and 4 of 5.6, q25 5.6
    assert choice.speedup[8] == pytest.approx(8 / 5.6) and choice.speedup[1] == pytest.approx(1 / 0.7)


@pytest.mark.speed_choice
def test_the_default_run_on_the_stream_vad_is_never_slower_than_fp32():
    """A real measurement: whatever the machine says, the written model is FP32 or measured at least as fast."""
    options = OptimizeOptions(quantization=QuantizeOptions(target_options=TargetOptions(reduce_range="off"),
                                                           min_sqnr=None, speed_choice_seconds=2.0),
                              fixed_inputs={"sr": 16000})
    result = optimize(ir.serde.deserialize_model(build_stream_vad("LSTM")), None, options,
                      calibration_data=stream_data())
    speed = result.quantization.speed
    assert speed is not None and set(speed.speedup) == {1, 15}  # the first sample and the calibration batch
    assert speed.regions[FRONT_END] == 6 and speed.regions[DECODER] == 6
    if speed.candidate.format == FLOAT:
        assert speed.describe().startswith("WARNING: FP32 kept") and speed.model is not None
        assert ops(ir.serde.serialize_model(result.model))["QuantizeLinear"] == 0
    else:
        assert min(speed.speedup.values()) >= 1.0
    last = speed.tables[-1]
    assert FLOAT in last.models and set(last.batch_sizes) == {1, 15}
    written = ir.serde.serialize_model(result.model)
    outputs = runtime.run(runtime.create_session(written), feeds_of())
    assert outputs["output"].shape == (3, 1) and outputs["stateN"].shape == (2, 3, 64)


def test_an_embedding_lookup_is_in_no_region_and_the_qdq_candidate_looks_up_integers():
    """The speed choice never keeps an int8 vocabulary float (its rows' dequantization against a table four times
    the size), and its QDQ candidate is the explicit QDQ that --format qdq writes: the lookup reads the codes."""
    from qgraph.models.bert import BertLayout, BertOptions, build_bert, example_inputs
    from qgraph.speed_choice import target_lowering
    from qgraph.targets import get_target

    layout = BertLayout(layers=1, hidden=64, heads=4, intermediate=128, vocabulary=2048, max_positions=64)
    options = OptimizeOptions(quantization=QuantizeOptions(min_sqnr=None, speed_choice=False))
    result = optimize(ir.serde.deserialize_model(build_bert(layout, options=BertOptions())), None, options,
                      calibration_data=[example_inputs(layout, 4, 16, seed=seed) for seed in (1, 2)])
    qdq_model = result.quantization.qdq_model
    graph = ir.serde.deserialize_model(qdq_model).graph
    lookup = next(node for node in graph if node.op_type == "Gather" and node.inputs[1].name == "input_ids")
    assert lookup.inputs[0].producer().op_type == "DequantizeLinear"  # the simulation: Gather(DQ(codes))
    regions = speed_regions.find_integer_regions(ir.serde.deserialize_model(qdq_model))
    assert regions and not any(lookup.name in nodes for nodes in regions.values())
    target = get_target("ort-cpu")
    explicit = build_candidate(qdq_model, QDQ, frozenset(), target_lowering(target), target_lowering(target, QDQ))
    lowered = next(node for node in explicit.graph.node if node.op_type == "Gather" and node.input[1] == "input_ids")
    codes = {tensor.name: tensor for tensor in explicit.graph.initializer}[lowered.input[0]]
    assert codes.data_type == onnx.TensorProto.INT8
    assert "QuantizeLinear" in ops(explicit)  # the rest stays explicit QDQ
    feeds = example_inputs(layout, 2, 16, seed=5)
    np.testing.assert_array_equal(runtime.run(runtime.create_session(explicit), feeds)["last_hidden_state"],
                                  runtime.run(runtime.create_session(qdq_model), feeds)["last_hidden_state"])
