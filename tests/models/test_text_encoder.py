"""The BERT-style text encoder: torch.onnx layout, numpy reference, training form, tiny training and the cache."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from qgraph.models import text_encoder
from qgraph.models.text_encoder import (
    INPUT_NAMES,
    TextEncoderConfig,
    build_text_encoder,
    held_out_batches,
    initial_weights,
    masked_batches,
    masked_token_accuracy,
)
from qgraph.runtime import create_session
from tests.models.text_models import SMALL_SIZES, as_float64, dense, gelu_erf, layer_norm, perturbed, self_attention

CONFIG = TextEncoderConfig(**SMALL_SIZES, max_positions=12)


def perturbed_weights(config: TextEncoderConfig, seed: int = 3) -> dict[str, np.ndarray]:
    return perturbed(initial_weights(config, seed=seed), seed)


def reference_logits(weights, config, input_ids, attention_mask, token_type_ids):
    """BertForMaskedLM in float64 numpy."""
    w = as_float64(weights)
    length, epsilon = input_ids.shape[1], config.layer_norm_epsilon
    x = (w["bert.embeddings.word_embeddings.weight"][input_ids]
         + w["bert.embeddings.token_type_embeddings.weight"][token_type_ids]
         + w["bert.embeddings.position_embeddings.weight"][np.arange(length)][None])
    if not config.pre_norm:
        x = layer_norm(x, w["bert.embeddings.LayerNorm.weight"], w["bert.embeddings.LayerNorm.bias"], epsilon)
    mask = (1.0 - attention_mask[:, None, None, :]) * np.finfo(np.float32).min
    for index in range(config.num_layers):
        layer = f"bert.encoder.layer.{index}"

        def norm(h, name, layer=layer):
            return layer_norm(h, w[f"{layer}.{name}.weight"], w[f"{layer}.{name}.bias"], epsilon)

        h = norm(x, "attention.ln") if config.pre_norm else x
        context = self_attention(w, h, [f"{layer}.attention.self.{name}" for name in ("query", "key", "value")],
                                 mask, config.num_heads)
        attended = dense(w, context, f"{layer}.attention.output.dense") + x
        if config.pre_norm:
            x = attended + dense(w, gelu_erf(dense(w, norm(attended, "ln"), f"{layer}.intermediate.dense")),
                                 f"{layer}.output.dense")
        else:
            attended = norm(attended, "attention.output.LayerNorm")
            inner = gelu_erf(dense(w, attended, f"{layer}.intermediate.dense"))
            x = norm(dense(w, inner, f"{layer}.output.dense") + attended, "output.LayerNorm")
    if config.pre_norm:
        x = layer_norm(x, w["bert.encoder.ln.weight"], w["bert.encoder.ln.bias"], epsilon)
    t = gelu_erf(dense(w, x, "cls.predictions.transform.dense"))
    t = layer_norm(t, w["cls.predictions.transform.LayerNorm.weight"], w["cls.predictions.transform.LayerNorm.bias"],
                   epsilon)
    return t @ w["bert.embeddings.word_embeddings.weight"].T + w["cls.predictions.bias"]


def sample_inputs(batch=3, length=10, seed=0):
    generator = np.random.default_rng(seed)
    input_ids = generator.integers(0, CONFIG.vocab_size, size=(batch, length))
    attention_mask = np.ones((batch, length), np.int64)
    attention_mask[1, 6:] = 0
    attention_mask[2, 3:] = 0
    token_type_ids = generator.integers(0, 2, size=(batch, length))
    return input_ids, attention_mask, token_type_ids


def test_inference_graph_has_the_torch_onnx_layout():
    model = build_text_encoder(perturbed_weights(CONFIG), CONFIG)
    onnx.checker.check_model(model, full_check=True)
    graph = model.graph
    assert [value.name for value in graph.input] == list(INPUT_NAMES)
    assert all(value.type.tensor_type.elem_type == TensorProto.INT64 for value in graph.input)
    assert [dimension.dim_param for dimension in graph.input[0].type.tensor_type.shape.dim] == [
        "batch_size", "sequence_length"]
    assert [value.name for value in graph.output] == ["logits"]
    ops = Counter(node.op_type for node in graph.node)
    layers = CONFIG.num_layers
    assert ops["LayerNormalization"] == 1 + 2 * layers + 1
    assert ops["MatMul"] == 6 * layers + 2 * layers + 2  # projections, two attention products, head, decoder
    assert ops["Erf"] == layers + 1 and ops["Softmax"] == layers
    assert ops["Gather"] >= 3 and ops["Slice"] == 1
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:  # a dense layer on 3-D activations
            assert node.input[1].startswith("onnx::MatMul_")
            consumer = [other for other in graph.node if node.output[0] in other.input]
            assert consumer[0].op_type == "Add" and consumer[0].input[0] in initializers  # Add(bias, MatMul)
    # the additive mask: Unsqueeze → Unsqueeze → Cast(float) → Sub(1, ·) → Mul(·, finfo.min) from the int64 mask
    mask_mul = next(node for node in graph.node if node.name == "/bert/Mul")
    chain = [mask_mul.op_type]
    tensor = mask_mul.input[0]
    while tensor in producers:
        node = producers[tensor]
        chain.append(node.op_type)
        tensor = node.input[1] if node.op_type == "Sub" else node.input[0]
    assert chain == ["Mul", "Sub", "Cast", "Unsqueeze", "Unsqueeze"] and tensor == "attention_mask"
    fill = onnx.numpy_helper.to_array(initializers[mask_mul.input[1]])
    assert fill == np.finfo(np.float32).min
    # the tied output embedding is stored a second time, transposed (constant folding)
    decoder = next(node for node in graph.node if node.name == "/cls/predictions/decoder/MatMul")
    word = onnx.numpy_helper.to_array(initializers["bert.embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(initializers[decoder.input[1]]), word.T)


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post-norm", "pre-norm"])
def test_inference_graph_matches_the_numpy_reference(pre_norm):
    config = dataclasses.replace(CONFIG, pre_norm=pre_norm)
    weights = perturbed_weights(config)
    assert ("bert.encoder.ln.weight" in weights) == pre_norm
    assert ("bert.embeddings.LayerNorm.weight" in weights) != pre_norm
    input_ids, attention_mask, token_type_ids = sample_inputs()
    session = create_session(build_text_encoder(weights, config), optimize=False)
    logits = session.run(None, dict(zip(INPUT_NAMES, (input_ids, attention_mask, token_type_ids))))[0]
    expected = reference_logits(weights, config, input_ids, attention_mask, token_type_ids)
    assert logits.shape == (3, 10, CONFIG.vocab_size)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_padding_does_not_change_the_real_tokens_and_lengths_are_dynamic():
    session = create_session(build_text_encoder(perturbed_weights(CONFIG), CONFIG), optimize=True)
    input_ids, attention_mask, token_type_ids = sample_inputs(length=7)
    short = session.run(None, dict(zip(INPUT_NAMES, (input_ids, attention_mask, token_type_ids))))[0]
    padding = np.zeros((3, 4), np.int64)
    padded = session.run(None, dict(zip(INPUT_NAMES, (
        np.concatenate([input_ids, padding + 5], 1), np.concatenate([attention_mask, padding], 1),
        np.concatenate([token_type_ids, padding], 1)))))[0]
    real = attention_mask.astype(bool)
    np.testing.assert_allclose(padded[:, :7][real], short[real], rtol=1e-5, atol=1e-5)


def test_training_form_computes_the_inference_logits_at_the_selected_positions():
    weights = perturbed_weights(CONFIG)
    training = build_text_encoder(weights, CONFIG, form="training")
    assert [value.name for value in training.graph.input][0] == "target_positions"
    assert not any(tensor.name.startswith("onnx::MatMul_") for tensor in training.graph.initializer)
    assert {tensor.name for tensor in training.graph.initializer} >= set(weights)
    input_ids, attention_mask, token_type_ids = sample_inputs()
    feeds = dict(zip(INPUT_NAMES, (input_ids, attention_mask, token_type_ids)))
    positions = np.array([0, 4, 11, 29], np.int64)
    selected = create_session(training, optimize=False).run(None, {"target_positions": positions, **feeds})[0]
    full = create_session(build_text_encoder(weights, CONFIG), optimize=False).run(None, feeds)[0]
    np.testing.assert_allclose(selected, full.reshape(-1, CONFIG.vocab_size)[positions], rtol=1e-5, atol=1e-5)


def test_builder_refuses_missing_or_unused_weights_and_bad_configs():
    weights = perturbed_weights(CONFIG)
    with pytest.raises(KeyError, match="cls.predictions.bias"):
        build_text_encoder({k: v for k, v in weights.items() if k != "cls.predictions.bias"}, CONFIG)
    with pytest.raises(ValueError, match="not used"):
        build_text_encoder({**weights, "extra": np.zeros(3, np.float32)}, CONFIG)
    with pytest.raises(ValueError, match="divisible"):
        TextEncoderConfig(vocab_size=10, hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="form"):
        build_text_encoder(weights, CONFIG, form="export")


def test_masked_token_accuracy_counts_argmax_hits():
    config = dataclasses.replace(CONFIG, vocab_size=text_encoder.text_corpus.corpus_vocabulary().size,
                                 max_positions=16)
    weights = perturbed_weights(config)
    batches = held_out_batches("test", 16, batch_size=8, limit=16)
    model = build_text_encoder(weights, config)
    result = masked_token_accuracy(model, batches)
    session = create_session(model, optimize=False)
    correct = count = 0
    for batch in batches:
        logits = session.run(None, batch.feeds)[0].reshape(-1, config.vocab_size)[batch.positions]
        correct += int((logits.argmax(1) == batch.labels).sum())
        count += batch.labels.size
    assert result.masked_tokens == count and result.accuracy == pytest.approx(correct / count)
    # the held-out masking is fixed: the same batches twice
    again = held_out_batches("test", 16, batch_size=8, limit=16)
    assert all((a.positions == b.positions).all() and (a.feeds["input_ids"] == b.feeds["input_ids"]).all()
               for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="held-out"):
        held_out_batches("train", 16)


def test_masked_batches_shuffle_rows_and_keep_masks_aligned():
    input_ids, attention_mask = text_encoder.encoder_sequences("train", 16, limit=20)
    batches = masked_batches(input_ids, attention_mask, 8, seed=(0, 1), shuffle=True)
    assert [len(batch.feeds["input_ids"]) for batch in batches] == [8, 8, 4]
    rows = {tuple(row) for batch in batches for row in batch.feeds["attention_mask"]}
    assert rows <= {tuple(row) for row in attention_mask}
    for batch in batches:
        flat = batch.feeds["input_ids"].reshape(-1)
        assert (batch.feeds["token_type_ids"] == 0).all()
        assert batch.positions.max() < flat.size


@pytest.mark.qat  # trains through onnxruntime-training (or checks its refusal)
def test_tiny_training_learns_and_the_cache_is_reused(tmp_path, monkeypatch):
    recipe = text_encoder.tiny_recipe(epochs=2, train_limit=128, validation_limit=32)
    cached = text_encoder.trained_text_encoder(recipe, cache_dir=tmp_path, threads=1)
    assert cached.trained_now and cached.path.is_file()
    result = cached.result
    assert result["steps"] == 2 * math.ceil(128 / recipe.batch_size)
    assert result["test_loss"] < math.log(recipe.architecture.vocab_size) - 0.2  # learned beyond uniform
    assert result["history"][-1][1] < result["history"][0][1]  # training loss went down
    test = held_out_batches("test", recipe.sequence_length, limit=recipe.validation_limit)
    assert masked_token_accuracy(cached.path, test).accuracy == pytest.approx(result["masked_token_accuracy"])
    model = onnx.load(str(cached.path))
    assert [value.name for value in model.graph.input] == list(INPUT_NAMES)

    def refuse(*arguments, **keywords):
        raise AssertionError("the cached model should have been used")

    monkeypatch.setattr(text_encoder, "train_text_encoder", refuse)
    again = text_encoder.trained_text_encoder(recipe, cache_dir=tmp_path)
    assert not again.trained_now and again.path == cached.path and again.result == result
    other = dataclasses.replace(recipe, learning_rate=1e-3)
    with pytest.raises(FileNotFoundError, match="no cached"):
        text_encoder.trained_text_encoder(other, cache_dir=tmp_path, train_if_missing=False)


def test_sinusoidal_positions_shift_by_one_rotation_and_shared_query_key_start():
    table = text_encoder.sinusoidal_positions(32, 16)
    assert table.shape == (32, 16) and np.abs(table).max() <= 0.02 * math.sqrt(2) + 1e-7
    for shift in (1, 5):  # P[t + k] = P[t] · R_k for one matrix R_k and every t
        rotation, *_ = np.linalg.lstsq(table[:-shift].astype(np.float64), table[shift:].astype(np.float64),
                                       rcond=None)
        np.testing.assert_allclose(table[:-shift] @ rotation, table[shift:], atol=1e-6)
    config = dataclasses.replace(CONFIG, pre_norm=True, position_initialization="sinusoidal",
                                 shared_query_key_initialization=True)
    plain = initial_weights(dataclasses.replace(CONFIG, pre_norm=True), seed=1)
    weights = initial_weights(config, seed=1)
    np.testing.assert_array_equal(weights["bert.embeddings.position_embeddings.weight"],
                                  text_encoder.sinusoidal_positions(CONFIG.max_positions, CONFIG.hidden_size))
    for index in range(CONFIG.num_layers):
        query = weights[f"bert.encoder.layer.{index}.attention.self.query.weight"]
        np.testing.assert_array_equal(weights[f"bert.encoder.layer.{index}.attention.self.key.weight"], query)
        np.testing.assert_allclose(query, plain[f"bert.encoder.layer.{index}.attention.self.query.weight"] * 3,
                                   rtol=1e-6)
    changed = {"bert.embeddings.position_embeddings.weight"} | {
        f"bert.encoder.layer.{index}.attention.self.{name}.weight" for index in range(CONFIG.num_layers)
        for name in ("query", "key")}
    assert all((weights[name] == plain[name]).all() for name in set(plain) - changed)
    # pre-norm: the residual output projections start 1/sqrt(2 * layers) smaller (GPT-2)
    post_norm = initial_weights(CONFIG, seed=1)
    ratio = (plain["bert.encoder.layer.0.output.dense.weight"].std()
             / post_norm["bert.encoder.layer.0.output.dense.weight"].std())
    assert ratio == pytest.approx(1 / math.sqrt(2 * CONFIG.num_layers), rel=0.1)
    with pytest.raises(ValueError, match="position_initialization"):
        dataclasses.replace(CONFIG, position_initialization="random")


def test_reference_recipe_meets_the_issue_sizes():
    recipe = text_encoder.reference_recipe()
    config = recipe.architecture
    assert config.num_layers >= 4 and config.hidden_size >= 256 and recipe.sequence_length == config.max_positions
    assert config.pre_norm and config.position_initialization == "sinusoidal"
    parameters = sum(math.prod(shape) for shape in text_encoder.parameter_shapes(config).values())
    assert 3_000_000 < parameters < 4_000_000


@pytest.mark.qat  # trains through onnxruntime-training
def test_a_training_process_that_dies_after_handing_back_its_result_does_not_lose_the_run(tmp_path, monkeypatch,
                                                                                          caplog):
    import faulthandler
    import os
    import signal

    from qgraph.models import text_transformer

    def crash(status: int) -> None:  # pytest's fault handler would print the child's stack: not a failure here
        faulthandler.disable()
        os.kill(os.getpid(), signal.SIGSEGV)

    # in the forked child, leaving ends in a segmentation fault, as onnxruntime-training's teardown did
    monkeypatch.setattr(text_transformer.os, "_exit", crash)
    recipe = text_encoder.tiny_recipe(epochs=1, train_limit=32, validation_limit=16)
    with caplog.at_level("WARNING"):
        result = text_encoder.train_text_encoder(recipe, tmp_path / "model.onnx", threads=1)
    assert (tmp_path / "model.onnx").is_file() and result["steps"] == math.ceil(32 / recipe.batch_size)
    assert "ended with exit status -11 after handing back its result" in caplog.text


@pytest.mark.qat  # trains through onnxruntime-training
def test_a_training_process_that_dies_during_training_is_a_clear_error(tmp_path, monkeypatch):
    import os
    import signal

    from qgraph.errors import QGraphError
    from qgraph.train import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda *arguments, **keywords: os.kill(os.getpid(), signal.SIGKILL))
    recipe = text_encoder.tiny_recipe(epochs=1, train_limit=32, validation_limit=16)
    with pytest.raises(QGraphError, match="training text_encoder_tiny died with exit status -9 before it finished"):
        text_encoder.train_text_encoder(recipe, tmp_path / "model.onnx", threads=1)
    assert not (tmp_path / "model.onnx").exists()


def test_the_tuning_scorer_prints_the_masked_token_accuracy_last(tmp_path):
    # tools/score_text_encoder.py, the --eval command for tuning on the encoder: the reference recipe's test set
    import os
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "score_text_encoder.py"
    recipe = text_encoder.reference_recipe()
    config = dataclasses.replace(CONFIG, vocab_size=text_encoder.text_corpus.corpus_vocabulary().size,
                                 max_positions=recipe.sequence_length)
    path = tmp_path / "encoder.onnx"
    onnx.save(build_text_encoder(perturbed_weights(config), config), path)
    completed = subprocess.run([sys.executable, str(tool), str(path), "--limit", "8"], capture_output=True,
                               text=True, timeout=300, env={**os.environ, "QGRAPH_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr
    batches = held_out_batches("test", recipe.sequence_length, limit=8, rate=recipe.mask_rate)
    expected = 100 * masked_token_accuracy(path, batches).accuracy
    assert completed.stdout.strip().splitlines()[-1] == f"{expected:.2f}"
    # another model, or none: one line that says so, a non-zero exit and no score (the tuning shows the line)
    other = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "other",
        [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])), other)
    for path, message in ((other, "not the text encoder's interface"), (tmp_path / "missing.onnx", "no such file")):
        completed = subprocess.run([sys.executable, str(tool), str(path)], capture_output=True, text=True, timeout=300)
        assert completed.returncode != 0 and message in completed.stderr and "Traceback" not in completed.stderr
        assert completed.stdout == ""
