"""The search's rounds (qgraph.tuning.search): stages in cheapest-first order, each tested on a scripted metric;
the outcome of a round is a prefix, so running a round whole or stopping at its first success chooses the same."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from qgraph.pipeline import OptimizeOptions
from qgraph.ptq import QuantizeOptions
from qgraph.tuning import ModelFacts, Trial, TrialConfiguration, TuningOptions, search_rounds, tune
from qgraph.tuning.configuration import budget_fields
from qgraph.tuning.search import split_points
from tests.ptq.small_models import calibration_batches, residual_cnn

LAYERS = tuple(f"layer{index}" for index in range(9))
WEIGHTS = {layer: f"{layer}.weight" for layer in LAYERS}


def _drive(facts, options, score, whole_rounds: bool = False):
    """Run the search against ``score(configuration)``, one trial after another; returns the rounds and trials
    (and, in ``_drive.preferred``, the configuration the search returned)."""
    search = search_rounds(facts, options, 1.0, lambda configuration: (LAYERS, WEIGHTS))
    rounds, trials = [], []
    _drive.preferred = None
    try:
        stage = next(search)
        while True:
            rounds.append(stage)
            outcome = []
            for configuration in stage.configurations:
                value = score(configuration)
                outcome.append(Trial(configuration, value, options.meets(1.0, value), None, 0, 0.0))
                if outcome[-1].meets_bound and not whole_rounds:
                    break
            trials += outcome
            stage = search.send(outcome)
    except StopIteration as finished:
        _drive.preferred = finished.value
    return rounds, trials


def test_stages_run_cheapest_first_and_the_variants_apply_where_they_change_something():
    options = TuningOptions(max_drop=0.01)
    cnn_rounds, _ = _drive(ModelFacts(has_matmul=False, can_train=True), options, lambda c: 0.0)
    stages = [stage.stage for stage in cnn_rounds]
    assert stages[0] == "method" and stages[1] == "variant" and stages[-1] == "qat"
    assert set(stages[2:-1]) == {"fallback"}
    assert [c.method for c in cnn_rounds[0].configurations] == ["minmax", "percentile", "entropy", "mse"]
    variants = cnn_rounds[1].configurations
    assert [(c.per_channel, c.bias_correction) for c in variants] == [(False, "off"), (True, "on")]
    matmul_rounds, _ = _drive(ModelFacts(has_matmul=True, can_train=False), options, lambda c: 0.0)
    variants = matmul_rounds[1].configurations
    assert [c.smooth_quant for c in variants[2:4]] == [0.5, 0.75] and variants[4].activations == "dynamic"
    assert matmul_rounds[-1].stage == "fallback"  # no training runtime: no QAT stage


def test_the_fallback_search_finds_the_smallest_prefix_in_about_log_trials():
    options = TuningOptions(max_drop=0.01)
    for needed in range(1, len(LAYERS)):
        _, trials = _drive(ModelFacts(False, False), options,
                           lambda c, needed=needed: 1.0 if len(c.fp32_layers) >= needed else 0.0)
        assert _drive.preferred.fp32_layers == LAYERS[:needed]
        assert all(len(t.configuration.fp32_layers) >= needed for t in trials if t.meets_bound)
        fallback = [trial for trial in trials if trial.configuration.stage == "fallback"]
        assert len(fallback) <= 2 * math.ceil(math.log(len(LAYERS), 3)) + 1


def test_a_round_run_whole_chooses_what_a_round_stopped_at_its_first_success_chooses():
    options = TuningOptions(max_drop=0.01)
    rng = np.random.default_rng(0)
    table = {}

    def score(configuration):  # an arbitrary, non-monotone metric, fixed per configuration
        return table.setdefault(configuration, float(rng.random() > 0.8))

    stopped_rounds, stopped = _drive(ModelFacts(True, True), options, score)
    whole_rounds, whole = _drive(ModelFacts(True, True), options, score)
    first = [trial.configuration for trial in stopped if trial.meets_bound][:1]
    assert first == [trial.configuration for trial in whole if trial.meets_bound][:1]
    assert [r.configurations for r in stopped_rounds] == [r.configurations for r in whole_rounds]


def test_searching_for_speed_goes_on_past_the_bound_with_variants_and_four_bit_weights():
    options = TuningOptions(max_drop=0.01, tune_for="speed")
    # the metric tolerates 4-bit weights on the 5 least sensitive layers (the last five of the order)
    safe = {WEIGHTS[layer] for layer in LAYERS[-5:]}
    rounds, trials = _drive(ModelFacts(False, False), options,
                            lambda c: 1.0 if set(c.four_bit_weights) <= safe else 0.0, whole_rounds=True)
    assert [stage.stage for stage in rounds[:2]] == ["method", "variant"]
    assert all(stage.stage == "four_bit" for stage in rounds[2:]) and len(rounds) > 2
    assert len(rounds[0].configurations) == 4 and all(trial.meets_bound for trial in trials[:4])
    best = max((trial for trial in trials if trial.meets_bound), key=lambda t: len(t.configuration.four_bit_weights))
    assert set(best.configuration.four_bit_weights) == safe  # the largest safe k, found by the two-point search
    assert not any(t.configuration.fp32_layers for t in trials)  # the fallback only runs while the bound is missed


def test_split_points_and_budget_parsing():
    assert split_points(0, 9) == [3, 6] and split_points(3, 4) == [] and split_points(0, 2) == [1]
    assert budget_fields("12") == {"budget": 12} and budget_fields("30min") == {"budget_minutes": 30.0}
    assert budget_fields(None) == {}
    with pytest.raises(Exception, match="N trials or Nmin"):
        budget_fields("soon")
    with pytest.raises(Exception, match="tune-for"):
        TuningOptions(max_drop=1, tune_for="size")


def test_a_recipe_replays_smooth_quant_bias_correction_activations_and_four_bit_weights(tmp_path):
    from qgraph.pipeline import optimize, with_config_settings

    onnx.save(residual_cnn(), tmp_path / "m.onnx")
    configuration = TrialConfiguration(bias_correction="on", smooth_quant=0.5, four_bit_weights=("conv2.weight",))
    recipe = tmp_path / "r.toml"
    recipe.write_text(configuration.to_recipe(QuantizeOptions()))
    quantization = configuration.quantization(QuantizeOptions(), recipe)
    settings = with_config_settings(quantization)
    assert (settings.bias_correction, settings.smooth_quant, settings.activations) == ("on", 0.5, "static")
    assert settings.min_sqnr is None and settings.speed_choice is False
    result = optimize(tmp_path / "m.onnx", tmp_path / "o.onnx", OptimizeOptions(quantization=quantization),
                      calibration_data=calibration_batches(count=2))
    plan = result.quantization.plan
    assert plan.weight_spec_of("conv2.weight").bits == 4 and plan.weight_spec_of("conv3.weight").bits == 8
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "o.onnx").graph.initializer}
    # QLinearConv takes int8 weights: the 4-bit one holds 4-bit levels, the others use the 8-bit range
    assert np.abs(weights["conv2.weight_quantized"]).max() <= 7 < np.abs(weights["conv3.weight_quantized"]).max()
    recipe.write_text(TrialConfiguration(activations="dynamic").to_recipe(QuantizeOptions()))
    assert with_config_settings(quantization).activations == "dynamic"


def test_tuning_for_speed_times_the_trials_that_meet_the_bound_and_picks_the_fastest(tmp_path):
    onnx.save(residual_cnn(), tmp_path / "m.onnx")
    result = tune(tmp_path / "m.onnx", tmp_path / "out.onnx", calibration_batches(count=2), lambda path: 1.0,
                  TuningOptions(max_drop=0.5, latency_runs=3, tune_for="speed", budget=8),
                  OptimizeOptions(quantization=QuantizeOptions()))
    meeting = [trial for trial in result.trials if trial.meets_bound]
    assert len(result.trials) == 8 and len(meeting) == 8  # every trial meets a metric that never drops
    assert {trial.configuration.stage for trial in result.trials} >= {"method", "variant", "four_bit"}
    assert all(trial.latency_ms > 0 for trial in result.trials)
    assert result.bound_met and result.summary()["tune_for"] == "speed"
    assert (tmp_path / "out.onnx").read_bytes()  # the fastest meeting trial was written


@pytest.mark.qat
@pytest.mark.slow
def test_qat_with_distillation_on_the_calibration_data_is_the_last_resort(tmp_path):
    onnx.save(residual_cnn(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", input=np.concatenate([batch["input"] for batch in calibration_batches(count=2)]))
    calls = []

    def evaluate(path):  # the FP32 model scores 1, every quantized model 0: nothing meets the bound
        calls.append(path)
        return 1.0 if len(calls) == 1 else 0.0

    result = tune(tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz", evaluate,
                  TuningOptions(max_drop=0.5, latency_runs=0, qat_epochs=1),
                  OptimizeOptions(quantization=QuantizeOptions()))
    stages = [trial.configuration.stage for trial in result.trials]
    assert stages[:4] == ["method"] * 4 and "fallback" in stages and stages[-1] == "qat"
    assert result.trials[-1].configuration.qat and not result.bound_met
    qat = result.trials[-1]
    assert qat.size_bytes > 0 and qat.score == 0.0  # it was trained, written and scored
    assert "--qat --distill" in qat.configuration.to_recipe(QuantizeOptions())
