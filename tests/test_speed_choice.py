"""qgraph.speed_choice: region classes found in a MobileNetV3, candidates that keep them FP32, and the decision."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph import runtime
from qgraph.calibrate.driver import CalibrationConfig
from qgraph.errors import QGraphError
from qgraph.latency import LatencyOptions
from qgraph.models.mobilenet_v3 import build_mobilenet_v3
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions
from qgraph.speed_choice import (
    FLOAT,
    QDQ,
    QOPERATOR,
    Candidate,
    Question,
    SpeedChoiceOptions,
    build_candidate,
    choose_speed,
    settled,
    stopping_rule,
)
from qgraph.speed_regions import find_regions
from tests.speed_choice_fakes import TARGET_OPTIONS, fake_measure, lowering, ops


@functools.cache
def _quantized(spelling: str) -> tuple[bytes, bytes]:
    model = build_mobilenet_v3("tiny", hardswish=spelling)
    generator = np.random.default_rng(0)
    batches = [{"input": generator.standard_normal((4, 1, 28, 28)).astype(np.float32)} for _ in range(2)]
    options = OptimizeOptions(quantization=QuantizeOptions(
        target_options=TARGET_OPTIONS, calibration=CalibrationConfig(batch_size=4), min_sqnr=None))
    result = optimize(ir.serde.deserialize_model(model), None, options, calibration_data=batches)
    return result.float_model.SerializeToString(), result.quantization.qdq_model.SerializeToString()


def quantized(spelling: str = "op") -> tuple[onnx.ModelProto, onnx.ModelProto]:
    float_bytes, qdq_bytes = _quantized(spelling)
    return onnx.ModelProto.FromString(float_bytes), onnx.ModelProto.FromString(qdq_bytes)




def test_regions_of_a_mobilenet_v3():
    float_model, qdq_model = quantized()
    regions = find_regions(ir.serde.deserialize_model(qdq_model))
    in_float = find_regions(ir.serde.deserialize_model(float_model))
    # The same nodes in both forms, except the float islands feeding a depthwise conv: only the QDQ form has them
    # (an unfused HardSwish reading a DQ)
    assert {name: nodes for name, nodes in in_float.items() if name != "depthwise"} == \
        {name: nodes for name, nodes in regions.items() if name != "depthwise"}
    assert in_float["depthwise"] < regions["depthwise"]
    assert all(name.startswith("hardswish") for name in regions["depthwise"] - in_float["depthwise"])
    assert regions["stem"] == {"stem", "hardswish_0"}
    depthwise = {name for name in regions["depthwise"] if name.endswith("_depthwise")}
    assert depthwise == {f"block{index}_depthwise" for index in range(1, 6)}
    # 3 SE blocks, each pool, two convolutions, Relu, HardSigmoid, Mul
    assert len(regions["squeeze-excite"]) == 18
    assert {f"block{index}_se_{part}" for index in (1, 3, 4) for part in ("pool", "fc1", "fc2", "scale")} \
        <= regions["squeeze-excite"]
    # both classifier Gemms hold at most 16384 weights (96·128 and 128·10)
    assert {"classifier_hidden", "classifier"} <= regions["small-matmul"]
    assert find_regions(ir.serde.deserialize_model(qdq_model), small_matmul_weights=2000)["small-matmul"] \
        >= {"classifier"}
    assert "classifier_hidden" not in find_regions(ir.serde.deserialize_model(qdq_model),
                                                   small_matmul_weights=2000)["small-matmul"]


@pytest.mark.parametrize("spelling", ["hardsigmoid", "relu6"])
def test_depthwise_regions_take_the_hardswish_spellings_along(spelling):
    _, qdq_model = quantized(spelling)
    regions = find_regions(ir.serde.deserialize_model(qdq_model))
    op_types = Counter(node.op_type for node in qdq_model.graph.node if node.name in regions["depthwise"])
    assert op_types["Conv"] == 5
    # blocks 3-5 use HardSwish after their depthwise convolution: x·HardSigmoid(x) or x·Clip(x+3)/6, which
    # canonicalisation fuses into HardSwish (FuseHardSwish) where the opset has it
    assert op_types["HardSwish"] + op_types["Mul"] >= 3
    if spelling == "relu6" and not op_types["HardSwish"]:
        assert op_types["Div"] >= 3 and op_types["Add"] >= 3


def test_candidates_keep_their_regions_float_and_stay_close():
    float_model, qdq_model = quantized()
    regions = find_regions(ir.serde.deserialize_model(qdq_model))
    integer = build_candidate(qdq_model, QOPERATOR, frozenset(), lowering())
    depthwise = build_candidate(qdq_model, QOPERATOR, regions["depthwise"], lowering())
    explicit = build_candidate(qdq_model, QDQ, regions["depthwise"], None)
    assert ops(integer)["QLinearConv"] == ops(float_model)["Conv"] and ops(integer)["Conv"] == 0
    assert ops(depthwise)["Conv"] == 5 and ops(depthwise)["QLinearConv"] == ops(float_model)["Conv"] - 5
    assert ops(explicit)["Conv"] == ops(float_model)["Conv"]
    for model in (integer, depthwise, explicit):
        onnx.checker.check_model(model, full_check=True)
    session = runtime.create_session(float_model)
    feeds = runtime.random_inputs(session, batch=3)
    expected = runtime.run(session, feeds)["logits"]
    spread = float(expected.max() - expected.min())
    for model in (integer, depthwise, explicit):
        actual = runtime.run(runtime.create_session(model), feeds)["logits"]
        assert np.abs(actual - expected).max() < 0.25 * spread
    with pytest.raises(QGraphError, match="lowering"):
        build_candidate(qdq_model, QOPERATOR, frozenset(), None)



def choice_options(**changes) -> SpeedChoiceOptions:
    """Options for the search itself: every candidate timed, whatever the lead (the decisive lead has its tests)."""
    return SpeedChoiceOptions(latency=LatencyOptions(batch_sizes=(1, 4), rounds=3),
                              **{"decisive_speedup": None, **changes})


def test_faster_region_classes_are_combined():
    float_model, qdq_model = quantized()
    depthwise = Candidate(QOPERATOR, ("depthwise",)).name
    stem = Candidate(QOPERATOR, ("stem",)).name
    combined = Candidate(QOPERATOR, ("stem", "depthwise")).name
    measure, calls = fake_measure({FLOAT: 2.0, QOPERATOR: 1.0, QDQ: 1.1, depthwise: 0.8, stem: 0.9, combined: 0.7})
    choice = choose_speed(float_model, qdq_model, lowering(), choice_options(), measure=measure)
    assert choice.candidate == Candidate(QOPERATOR, ("stem", "depthwise"))
    assert choice.speedup == {1: pytest.approx(2.0 / 0.7), 4: pytest.approx(2.0 / 0.7)}
    assert "fp32 depthwise" in choice.reason and "taken" in choice.reason
    assert len(calls) == 3 and calls[2][-1] == combined
    assert ops(choice.model)["Conv"] == 6 and "stem" in choice.float_nodes
    assert choice.regions["depthwise"] > 5


def test_a_region_within_the_margin_is_not_taken_and_qdq_can_win():
    float_model, qdq_model = quantized()
    measure, _ = fake_measure({FLOAT: 2.0, QOPERATOR: 1.2, QDQ: 1.0, Candidate(QDQ, ("depthwise",)).name: 0.99})
    choice = choose_speed(float_model, qdq_model, lowering(), choice_options(), measure=measure)
    assert choice.candidate == Candidate(QDQ) and choice.float_nodes == frozenset()
    assert "QLinearConv" not in ops(choice.model)


def test_fp32_is_returned_when_every_integer_model_is_slower():
    float_model, qdq_model = quantized()
    measure, calls = fake_measure({FLOAT: 1.0, QOPERATOR: 1.3, QDQ: 1.2})
    choice = choose_speed(float_model, qdq_model, lowering(), choice_options(region_classes=()), measure=measure)
    assert choice.candidate == Candidate(FLOAT) and choice.model is float_model
    assert "FP32 kept" in choice.reason and len(calls) == 2 and calls[1] == (FLOAT, QDQ)
    lenient = choose_speed(float_model, qdq_model, lowering(), choice_options(region_classes=(), tolerance=0.2),
                           measure=measure)
    assert lenient.candidate == Candidate(QDQ)


def test_options_are_checked():
    with pytest.raises(QGraphError, match="region classes"):
        SpeedChoiceOptions(region_classes=("everything",))
    with pytest.raises(QGraphError, match="formats"):
        SpeedChoiceOptions(formats=("tensorrt",))
    with pytest.raises(QGraphError, match="decisive_speedup must be at least 1.1"):
        SpeedChoiceOptions(decisive_speedup=1.05)  # below the confirmation band: it could pass a model near 1x


def test_a_real_measurement_chooses_a_model_that_runs():
    float_model, qdq_model = quantized()
    options = SpeedChoiceOptions(latency=LatencyOptions(batch_sizes=(1,), rounds=2, warmup=1),
                                 region_classes=("stem",), tolerance=0.99, decisive_speedup=None)
    choice = choose_speed(float_model, qdq_model, lowering(), options)
    assert len(choice.tables) in (2, 3) and choice.tables[1].models[:2] == (FLOAT, choice.tables[1].models[1])
    if len(choice.tables) == 3:  # near or below 1×: confirmed by FP32 and the chosen candidate alone
        assert choice.tables[2].models == (FLOAT, choice.candidate.name) or choice.candidate.format == FLOAT
    session = runtime.create_session(choice.model)
    assert runtime.run(session, runtime.random_inputs(session))["logits"].shape == (1, 10)


def test_a_clear_ordering_settles_and_a_close_one_does_not():
    # FP32 three times as slow as QOperator in every round: settled on both sides of 1 and 1.1 after four rounds
    clear = {FLOAT: [3.0, 3.2, 2.9, 3.1], QOPERATOR: [1.0, 1.1, 1.0, 1.0]}
    assert settled(Question(QOPERATOR, FLOAT, (1.0, 1.1)), clear, planned=50, band=0.05)
    assert settled(Question(FLOAT, QOPERATOR, (1.0, 1.1)), clear, planned=50, band=0.05)  # clearly slower
    # a ratio inside the band around a threshold is not settled, more rounds might move it across
    close = {FLOAT: [1.08, 1.12, 1.1, 1.09], QOPERATOR: [1.0, 1.0, 1.0, 1.0]}
    assert not settled(Question(QOPERATOR, FLOAT, (1.0, 1.1)), close, planned=50, band=0.05)
    assert settled(Question(QOPERATOR, FLOAT, (1.0,)), close, planned=50, band=0.05)
    # a challenger even with its rival is not settled until it lost more rounds than a win in three of four allows
    even = {QOPERATOR: [1.0] * 8, QDQ: [0.98, 1.02, 0.97, 1.03, 0.99, 1.01, 0.98, 1.02]}
    challenger = Question(QDQ, QOPERATOR, (1.0, 1.03), challenger=True)
    first_four = {name: values[:4] for name, values in even.items()}
    assert not settled(challenger, first_four, planned=16, band=0.05)  # 2 losses: it could still win 13 of 16
    assert settled(challenger, even, planned=16, band=0.05)  # 4 losses > (16 - 1) // 4: it cannot any more
    assert not settled(challenger, even, planned=40, band=0.05)  # with 40 rounds planned it still could


def test_the_stopping_rule_waits_for_its_rounds_and_remembers_a_beaten_challenger():
    challenger = Question(QDQ, QOPERATOR, (1.0, 1.03), challenger=True)
    verdict = Question(QOPERATOR, FLOAT, (1.0, 1.1))
    harmless = Question(QDQ, QOPERATOR, (1.0,), unless=Question(QOPERATOR, FLOAT, (1.1,)))
    stop = stopping_rule([challenger, verdict], band=0.05, minimum_rounds=3, first_questions=[harmless],
                         first_batch_size=1)
    # batch 16 first (largest_first): QDQ loses both of the two planned rounds, QOperator is 3x FP32
    large = {FLOAT: [3.0, 3.0], QOPERATOR: [1.0, 1.0], QDQ: [1.2, 1.1]}
    assert not stop(16, large, 2)  # fewer rounds than the rule's minimum
    # batch 1: QDQ wins every round by 3%, but it was beaten at batch 16, so it cannot be clearly faster: settled; the
    # harmless question is moot, QOperator being settled above 1.1x FP32
    small = {FLOAT: [3.0, 3.1, 3.0], QOPERATOR: [1.0, 1.0, 1.0], QDQ: [0.97, 0.97, 0.97]}
    assert stop(1, small, 40)
    fresh = stopping_rule([challenger, verdict], band=0.05, minimum_rounds=3)
    assert not fresh(1, small, 40)  # without batch 16's rounds the challenger is open
    # a verdict near 1.1x keeps the rounds going
    slow = {FLOAT: [1.1, 1.1, 1.1], QOPERATOR: [1.0, 1.0, 1.0], QDQ: [1.2, 1.2, 1.2]}
    assert not stopping_rule([verdict], band=0.05, minimum_rounds=3)(1, slow, 40)
    assert stopping_rule([challenger], band=0.05, minimum_rounds=3)(1, slow, 40)
