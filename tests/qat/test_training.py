"""QAT runs on a tiny model: scales learn (or stay), export equals eval mode, 4-bit, distillation, resume."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest

from qgraph.qat import QATOptions, build_fake_quant_graph, export_qdq, lower_qdq, run_qat
from qgraph.qat.export import learned_scales, read_checkpoint_parameters
from qgraph.testing import run_model
from qgraph.train import ConstantSchedule, Trainer, TrainingConfig
from tests.qat.helpers import dataset, labelled_data, quantized


def _options(**changes) -> QATOptions:
    settings = dict(epochs=2, batch_size=32, learning_rate=1e-3, threads=1)
    settings.update(changes)
    return QATOptions(**settings)


def _scale_of(model, tensor: str) -> float:
    name = next(node.input[1] for node in model.graph.node
                if node.op_type == "QuantizeLinear" and node.input[0] == tensor)
    return float(next(onnx_array(t) for t in model.graph.initializer if t.name == name))


def onnx_array(tensor):
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


@pytest.mark.parametrize("learn_scales", [True, False])
def test_scales_learn_or_stay_fixed(learn_scales):
    float_model, result = quantized()
    inputs, labels = labelled_data(128, teacher=float_model)
    trained = run_qat(result.qdq_model, result.plan, result.parameters, float_model=float_model,
                      train_data=dataset(inputs, labels), options=_options(learn_scales=learn_scales))
    moved = [abs(_scale_of(trained.qdq_model, tensor) / _scale_of(result.qdq_model, tensor) - 1.0)
             for tensor in ("r1", "r2", "c3", "r3")]
    if learn_scales:
        assert max(moved) > 1e-3
    else:
        assert max(moved) == 0.0


def _trained_graph(tmp_path, *, weight_bits=8, steps_lr=3e-3):
    float_model, result = quantized(weight_bits=weight_bits)
    graph = build_fake_quant_graph(result.qdq_model, result.plan, result.parameters, float_model=float_model)
    config = TrainingConfig(epochs=1, batch_size=32, learning_rate=steps_lr, schedule=ConstantSchedule(),
                            trainable=graph.trainable, threads=1)
    inputs, labels = labelled_data(128)
    trainer = Trainer(graph.model, config, tmp_path)
    trainer.fit(dataset(inputs, labels))
    return result, graph, trainer


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_export_matches_eval_mode_within_one_step(tmp_path, weight_bits):
    result, graph, trainer = _trained_graph(tmp_path, weight_bits=weight_bits)
    values = read_checkpoint_parameters(trainer.best_checkpoint, graph.trainable)
    exported = export_qdq(graph, values)
    feeds = {"input": labelled_data(64, seed=9)[0]}
    evaluated = trainer.predict(feeds)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(exported.SerializeToString(), options, providers=["CPUExecutionProvider"])
    qdq_output = session.run(None, feeds)[0]
    # The weights really moved away from the calibrated codes.
    changed = [not np.array_equal(onnx_array(a), onnx_array(b))
               for a, b in zip(exported.graph.initializer, result.qdq_model.graph.initializer)]
    assert any(changed)
    scales = learned_scales(graph, values)
    step = max(float(scales[quantizer.key]) for quantizer in graph.activations)
    assert np.max(np.abs(qdq_output - evaluated)) <= step
    # Integer weight codes stay inside the spec's range (±7 for 4-bit, ±127 for int8).
    bound = 7 if weight_bits == 4 else 127
    for weight in graph.weights:
        codes = next(onnx_array(t) for t in exported.graph.initializer if t.name == weight.quantized)
        assert codes.min() >= -bound and codes.max() <= bound
    # The lowered model (integer operators) agrees as well.
    lowered, _ = lower_qdq(exported, _quantize_options())
    lowered_output = run_model(lowered, feeds)["logits"]
    ops = {node.op_type for node in lowered.graph}
    assert "QLinearConv" in ops
    assert np.max(np.abs(lowered_output - evaluated)) <= 2 * step


def _quantize_options():
    from qgraph.ptq import QuantizeOptions
    from qgraph.targets import TargetOptions

    return QuantizeOptions(target_options=TargetOptions(format="qoperator", reduce_range="off"))


def test_distillation_loss_decreases():
    float_model, result = quantized(weight_bits=4)
    inputs, _ = labelled_data(128)
    trained = run_qat(result.qdq_model, result.plan, result.parameters, float_model=float_model,
                      train_data=dataset(inputs, None), validation_data=dataset(inputs[:64], None),
                      options=_options(loss="distill", epochs=3, patience=None))
    losses = [event.loss for event in trained.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert trained.metric_name == "validation_mse"


def test_freezing_activation_scales_after_k_steps():
    float_model, result = quantized()
    inputs, labels = labelled_data(128, teacher=float_model)
    frozen = run_qat(result.qdq_model, result.plan, result.parameters, float_model=float_model,
                     train_data=dataset(inputs, labels), options=_options(freeze_activation_scales_after=0))
    # exp(k · log(s) / k) reproduces the calibrated scale to float32 rounding (the graph computes the same value).
    for tensor in ("r1", "r2", "c3"):
        assert _scale_of(frozen.qdq_model, tensor) == pytest.approx(_scale_of(result.qdq_model, tensor), rel=1e-6)


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    float_model, result = quantized()
    inputs, labels = labelled_data(64, teacher=float_model)
    common = dict(float_model=float_model, train_data=dataset(inputs, labels))
    first = run_qat(result.qdq_model, result.plan, result.parameters,
                    options=_options(epochs=1, work_directory=tmp_path), **common)
    assert first.epochs_completed == 1
    resumed = run_qat(result.qdq_model, result.plan, result.parameters,
                      options=_options(epochs=2, work_directory=tmp_path, resume=True), **common)
    assert [event.epoch for event in resumed.history] == [2]


def test_training_that_makes_the_objective_worse_keeps_the_calibrated_model():
    """A learning rate far too high wrecks the model while its own loss still 'improves' from epoch to epoch; the
    guard compares against the starting model and returns that instead (seen on the ResNet at lr 1e-3, 4-bit)."""
    float_model, result = quantized(weight_bits=4)
    inputs, _ = labelled_data(128)
    wrecked = run_qat(result.qdq_model, result.plan, result.parameters, float_model=float_model,
                      train_data=dataset(inputs, None),
                      options=_options(loss="distill", epochs=2, learning_rate=0.1, patience=None))
    assert wrecked.kept_start
    assert wrecked.objective_after > wrecked.objective_before
    assert wrecked.qdq_model is result.qdq_model

    healthy = run_qat(result.qdq_model, result.plan, result.parameters, float_model=float_model,
                      train_data=dataset(inputs, None), options=_options(loss="distill", epochs=3, patience=None))
    assert not healthy.kept_start and healthy.objective_after <= healthy.objective_before
