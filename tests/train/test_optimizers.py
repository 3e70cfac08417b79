"""Optimizers, gradient clipping, schedules and the MSE loss, checked against numpy references."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

from qgraph.data import dataset_from_arrays
from qgraph.train import ConstantSchedule, CosineSchedule, StepSchedule, Trainer, TrainingConfig

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_regressor  # noqa: E402


def regression_batches(count: int = 4, batch: int = 16, seed: int = 1):
    generator = np.random.default_rng(seed)
    true_weight = generator.standard_normal((3, 8)).astype(np.float32)
    batches = []
    for _ in range(count):
        inputs = generator.standard_normal((batch, 8)).astype(np.float32)
        batches.append(({"input": inputs}, (inputs @ true_weight.T + 0.5).astype(np.float32)))
    return batches


def parameters(trainer: Trainer) -> dict[str, np.ndarray]:
    state = trainer._session().state.parameters
    return {name: np.array(state[name].data) for name in ("w", "b")}


def mse_gradients(weight, bias, inputs, targets):
    """Gradients of mean((x Wᵀ + b - t)²) over all elements."""
    output_gradient = 2.0 * (inputs @ weight.T + bias - targets) / targets.size
    return output_gradient.T @ inputs, output_gradient.sum(axis=0)


@pytest.mark.parametrize("momentum, weight_decay, max_grad_norm", [(0.9, 0.0, None), (0.9, 0.01, None),
                                                                    (0.0, 0.05, 0.1)])
def test_host_sgd_matches_numpy_reference(tmp_path, momentum, weight_decay, max_grad_norm):
    batches = regression_batches()
    config = TrainingConfig(epochs=1, batch_size=16, learning_rate=0.05, optimizer="sgd", momentum=momentum,
                            weight_decay=weight_decay, max_grad_norm=max_grad_norm, loss="mse", shuffle=False,
                            threads=1)
    trainer = Trainer(tiny_regressor(), config, tmp_path)
    assert trainer.artifacts.optimizer_model is None  # onnxruntime's SGD has neither momentum nor weight decay
    weight, bias = (numpy_helper.to_array(t).astype(np.float64) for t in tiny_regressor().graph.initializer)
    velocity = [np.zeros_like(weight), np.zeros_like(bias)]
    for feeds, targets in batches:
        gradients = list(mse_gradients(weight, bias, feeds["input"].astype(np.float64), targets))
        if max_grad_norm:
            norm = math.sqrt(sum(float((g * g).sum()) for g in gradients))
            gradients = [g * min(1.0, max_grad_norm / norm) for g in gradients]
        for index, (value, gradient) in enumerate(zip((weight, bias), gradients)):
            gradient = gradient + weight_decay * value
            velocity[index] = momentum * velocity[index] + gradient if momentum else gradient
        weight, bias = weight - 0.05 * velocity[0], bias - 0.05 * velocity[1]
    trainer.fit(batches)
    trained = parameters(trainer)
    np.testing.assert_allclose(trained["w"], weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(trained["b"], bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_onnxruntime_optimizer_clips_global_gradient_norm(tmp_path, optimizer):
    batch = regression_batches(count=1)
    config = TrainingConfig(epochs=1, batch_size=16, learning_rate=1.0, optimizer=optimizer, max_grad_norm=1e-3,
                            loss="mse", threads=1)
    trainer = Trainer(tiny_regressor(), config, tmp_path)
    assert trainer.artifacts.optimizer_model is not None
    before = parameters(trainer)
    trainer.fit(batch)
    after = parameters(trainer)
    change = math.sqrt(sum(float(((after[n] - before[n]) ** 2).sum()) for n in before))
    if optimizer == "sgd":  # w -= lr · clipped g, so the step's norm is the clip norm
        assert change == pytest.approx(1e-3, rel=1e-3)
    else:  # Adam's first step is lr · sign-like, independent of the scale: just check it trained
        assert change > 0.1


def test_sgd_without_momentum_uses_onnxruntime_graph(tmp_path):
    batches = regression_batches()
    config = TrainingConfig(epochs=1, batch_size=16, learning_rate=0.05, optimizer="sgd", max_grad_norm=None,
                            loss="mse", shuffle=False, threads=1)
    trainer = Trainer(tiny_regressor(), config, tmp_path)
    weight, bias = (numpy_helper.to_array(t).astype(np.float64) for t in tiny_regressor().graph.initializer)
    for feeds, targets in batches:
        grad_weight, grad_bias = mse_gradients(weight, bias, feeds["input"].astype(np.float64), targets)
        weight, bias = weight - 0.05 * grad_weight, bias - 0.05 * grad_bias
    trainer.fit(batches)
    np.testing.assert_allclose(parameters(trainer)["w"], weight, rtol=1e-4, atol=1e-5)


def test_mse_regression_from_a_dataset_learns(tmp_path):
    batches = regression_batches(count=16)
    arrays = {"input": np.concatenate([feeds["input"] for feeds, _ in batches]),
              "target": np.concatenate([targets for _, targets in batches])}
    dataset = dataset_from_arrays(arrays, label_key="target")
    config = TrainingConfig(epochs=5, batch_size=32, learning_rate=0.05, loss="mse", threads=1)
    trainer = Trainer(tiny_regressor(), config, tmp_path)
    result = trainer.fit(dataset, dataset)
    assert result.metric_name == "validation_loss"
    assert result.history[-1].validation_loss < 0.2 * result.history[0].validation_loss
    assert trainer.evaluate(dataset).accuracy is None


def test_schedules():
    cosine = CosineSchedule(warmup_steps=10, minimum_ratio=0.1)
    assert cosine.learning_rate(1.0, 0, 110, 10) == pytest.approx(0.1)
    assert cosine.learning_rate(1.0, 9, 110, 10) == pytest.approx(1.0)
    assert cosine.learning_rate(1.0, 10, 110, 10) == pytest.approx(1.0)
    assert cosine.learning_rate(1.0, 60, 110, 10) == pytest.approx(0.55)
    assert cosine.learning_rate(1.0, 110, 110, 10) == pytest.approx(0.1)
    step = StepSchedule(step_epochs=2, gamma=0.5)
    assert [step.learning_rate(1.0, s, 100, 10) for s in (0, 19, 20, 45)] == [1.0, 1.0, 0.5, 0.25]
    assert ConstantSchedule().learning_rate(0.3, 1000, 10, 1) == 0.3


def test_a_parameter_only_another_output_reads_is_frozen_not_refused(tmp_path, caplog):
    """onnxruntime-training refuses a trainable parameter its loss cannot reach (a BERT's pooler beside the hidden
    states it distils): such parameters keep their values, with a warning naming the other outputs."""
    from onnx import TensorProto, helper

    from qgraph.train.artifacts import values_behind

    model = tiny_regressor()
    model.graph.initializer.append(numpy_helper.from_array(np.full((3, 3), 0.5, np.float32), "head"))
    model.graph.node.append(helper.make_node("MatMul", ["output", "head"], ["pooled"]))
    model.graph.output.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 3]))
    assert {"w", "b", "input"} <= values_behind(model, "output") and "head" not in values_behind(model, "output")
    assert "head" in values_behind(model, "pooled")
    config = TrainingConfig(epochs=1, batch_size=16, learning_rate=0.05, optimizer="sgd", max_grad_norm=None,
                            loss="mse", shuffle=False, threads=1, output_name="output")
    with caplog.at_level("WARNING"):
        trainer = Trainer(model, config, tmp_path)
    assert "1 parameter(s) that only other outputs (pooled) read keep their values" in caplog.text
    state = trainer._session().state.parameters
    assert not state["head"].requires_grad and state["w"].requires_grad
    before = parameters(trainer)
    trainer.fit(regression_batches())
    after = parameters(trainer)
    assert not np.allclose(after["w"], before["w"])  # the loss's own parameters trained
    np.testing.assert_array_equal(np.array(trainer._session().state.parameters["head"].data), np.full((3, 3), 0.5))
