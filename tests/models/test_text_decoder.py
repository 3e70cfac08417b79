"""The GPT-style text decoder: Hugging Face KV-cache interface, numpy reference, cache equivalence, mask semantics,
perplexity of any such file, tiny training."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from qgraph.models import text_decoder
from qgraph.models.text_decoder import (
    TextDecoderConfig,
    build_text_decoder,
    cache_layout,
    decoder_feeds,
    initial_weights,
    perplexity,
    presents_as_past,
)
from qgraph.runtime import create_session
from tests.models.text_models import SMALL_SIZES, as_float64, dense, gelu_tanh, layer_norm, perturbed, self_attention

CONFIG = TextDecoderConfig(**SMALL_SIZES, max_positions=24)


def perturbed_weights(config: TextDecoderConfig, seed: int = 5) -> dict[str, np.ndarray]:
    return perturbed(initial_weights(config, seed=seed), seed)


def reference_logits(weights, config, input_ids, attention_mask, position_ids):
    """The decoder without cache in float64 numpy (causal ∧ padding mask)."""
    w = as_float64(weights)
    length, epsilon = input_ids.shape[1], config.layer_norm_epsilon
    x = w["transformer.wte.weight"][input_ids] + w["transformer.wpe.weight"][position_ids]
    allowed = np.tril(np.ones((length, length), bool))[None, None] & attention_mask.astype(bool)[:, None, None, :]
    mask = np.where(allowed, 0.0, np.finfo(np.float32).min)
    for index in range(config.num_layers):
        layer = f"transformer.h.{index}"
        h = layer_norm(x, w[f"{layer}.ln_1.weight"], w[f"{layer}.ln_1.bias"], epsilon)
        context = self_attention(w, h, [f"{layer}.attn.{name}_proj" for name in ("q", "k", "v")], mask,
                                 config.num_heads)
        x = x + dense(w, context, f"{layer}.attn.out_proj")
        h = layer_norm(x, w[f"{layer}.ln_2.weight"], w[f"{layer}.ln_2.bias"], epsilon)
        x = x + dense(w, gelu_tanh(dense(w, h, f"{layer}.mlp.c_fc")), f"{layer}.mlp.c_proj")
    x = layer_norm(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], epsilon)
    return x @ w["transformer.wte.weight"].T


@pytest.fixture(scope="module")
def weights():
    return perturbed_weights(CONFIG)


@pytest.fixture(scope="module")
def session(weights):
    return create_session(build_text_decoder(weights, CONFIG), optimize=True)


def tokens(batch=3, length=12, seed=0):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, size=(batch, length))


def test_inference_graph_has_the_hugging_face_kv_cache_interface(weights):
    model = build_text_decoder(weights, CONFIG)
    onnx.checker.check_model(model, full_check=True)
    inputs = [value.name for value in model.graph.input]
    outputs = [value.name for value in model.graph.output]
    layers = range(CONFIG.num_layers)
    assert inputs == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{index}.{kind}" for index in layers for kind in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{index}.{kind}" for index in layers for kind in ("key", "value")]
    past = model.graph.input[3].type.tensor_type
    assert past.elem_type == TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in past.shape.dim] == [
        "batch_size", CONFIG.num_heads, "past_sequence_length", CONFIG.head_dim]
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["Concat"] >= 2 * CONFIG.num_layers and ops["LayerNormalization"] == 2 * CONFIG.num_layers + 1
    assert ops["Tanh"] == CONFIG.num_layers and ops["Softmax"] == CONFIG.num_layers


def test_full_forward_matches_the_numpy_reference(weights, session):
    input_ids = tokens()
    attention_mask = np.ones_like(input_ids)
    attention_mask[2, :4] = 0  # left padding
    feeds = decoder_feeds(input_ids, layout=cache_layout(session), attention_mask=attention_mask)
    logits = session.run(["logits"], feeds)[0]
    expected = reference_logits(weights, CONFIG, input_ids, attention_mask, feeds["position_ids"])
    np.testing.assert_allclose(logits[:2], expected[:2], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits[2, 4:], expected[2, 4:], rtol=1e-4, atol=1e-4)


def test_prefill_and_one_token_steps_give_the_full_forward_logits(session):
    layout = cache_layout(session)
    assert (layout.num_layers, layout.num_heads, layout.head_dim) == (2, 2, 8)
    input_ids = tokens(length=14)
    full = session.run(["logits"], decoder_feeds(input_ids, layout=layout))[0]
    outputs = session.run(None, decoder_feeds(input_ids[:, :5], layout=layout))
    assert outputs[1].shape == (3, 2, 5, 8)
    pieces, past = [outputs[0]], presents_as_past(session, outputs, layout)
    for position in range(5, 14):
        outputs = session.run(None, decoder_feeds(input_ids[:, position:position + 1], layout=layout, past=past))
        pieces.append(outputs[0])
        past = presents_as_past(session, outputs, layout)
    assert past["past_key_values.0.key"].shape == (3, 2, 14, 8)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def test_a_masked_past_token_is_as_if_it_were_absent(session):
    layout = cache_layout(session)
    input_ids = tokens(batch=1, length=10)
    attention_mask = np.ones_like(input_ids)
    attention_mask[0, 3] = 0
    feeds = decoder_feeds(input_ids, layout=layout, attention_mask=attention_mask)
    masked = session.run(["logits"], feeds)[0]
    kept = np.array([index for index in range(10) if index != 3])
    absent = decoder_feeds(input_ids[:, kept], layout=layout)
    absent["position_ids"] = kept[None].astype(np.int64)  # same positions as in the masked run
    without = session.run(["logits"], absent)[0]
    np.testing.assert_allclose(masked[0, kept[3:]], without[0, 3:], rtol=1e-5, atol=1e-5)
    assert not np.allclose(session.run(["logits"], decoder_feeds(input_ids, layout=layout))[0][0, -1],
                           masked[0, -1], atol=1e-3)


def test_training_form_matches_inference_at_every_position(weights, session):
    training = build_text_decoder(weights, CONFIG, form="training")
    assert [value.name for value in training.graph.input] == [
        "target_positions", "input_ids", "attention_mask", "position_ids"]
    windows = tokens(batch=2, length=11)
    feeds, labels = text_decoder._trainer_batch(windows)
    assert (labels == windows[:, 1:].reshape(-1)).all()
    selected = create_session(training, optimize=False).run(None, feeds)[0]
    full = session.run(["logits"], decoder_feeds(windows[:, :-1], layout=cache_layout(session)))[0]
    np.testing.assert_allclose(selected, full.reshape(-1, CONFIG.vocab_size), rtol=1e-5, atol=1e-5)


def test_perplexity_is_exp_of_the_mean_negative_log_likelihood(weights, session):
    windows = tokens(batch=5, length=9)
    result = perplexity(build_text_decoder(weights, CONFIG), windows, batch_size=2)
    logits = reference_logits(weights, CONFIG, windows[:, :-1], np.ones((5, 8), np.int64),
                              np.broadcast_to(np.arange(8), (5, 8)))
    log_probabilities = logits - logits.max(-1, keepdims=True)
    log_probabilities -= np.log(np.exp(log_probabilities).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probabilities, windows[:, 1:, None], axis=-1).mean()
    assert result.tokens == 40
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-4)
    # zero weights give uniform predictions: the perplexity is the vocabulary size
    zeros = {name: np.zeros_like(value) for name, value in weights.items()}
    assert perplexity(build_text_decoder(zeros, CONFIG), windows).perplexity == pytest.approx(CONFIG.vocab_size)
    with pytest.raises(ValueError, match="windows"):
        perplexity(build_text_decoder(weights, CONFIG), windows[:, :1])


def test_cache_layout_refuses_incomplete_past_inputs(weights):
    model = build_text_decoder(weights, CONFIG)
    del model.graph.input[4]  # past_key_values.0.value
    value = model.graph.input[3]
    model.graph.input.remove(value)
    model.graph.input.append(value)

    class FakeSession:
        def get_inputs(self):
            return [type("Input", (), {"name": v.name, "shape": [1, 2, 0, 8]})() for v in model.graph.input]

    with pytest.raises(ValueError, match="missing"):
        cache_layout(FakeSession())


@pytest.mark.qat  # trains through onnxruntime-training (or checks its refusal)
def test_tiny_training_learns_and_is_cached(tmp_path):
    recipe = text_decoder.tiny_recipe(epochs=2, train_limit=64, validation_limit=16)
    cached = text_decoder.trained_text_decoder(recipe, cache_dir=tmp_path, threads=1)
    result = cached.result
    assert cached.trained_now and result["steps"] == 2 * math.ceil(64 / recipe.batch_size)
    assert result["perplexity"] < 0.8 * recipe.architecture.vocab_size
    test = text_decoder.decoder_windows("test", recipe.sequence_length, limit=16)
    assert perplexity(cached.path, test).perplexity == pytest.approx(result["perplexity"], rel=1e-6)
    assert not text_decoder.trained_text_decoder(recipe, cache_dir=tmp_path).trained_now
    with pytest.raises(ValueError, match="max_positions"):
        text_decoder.train_text_decoder(
            text_decoder.TextTrainingRecipe(name="x", architecture=CONFIG, sequence_length=64, epochs=1,
                                            batch_size=2, learning_rate=1e-3), tmp_path / "x.onnx")


def test_reference_recipe_meets_the_issue_sizes():
    recipe = text_decoder.reference_recipe()
    config = recipe.architecture
    assert config.num_layers >= 4 and config.hidden_size >= 256
    assert recipe.sequence_length <= config.max_positions
