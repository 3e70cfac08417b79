"""The decoder graph: valid ONNX, the exporter's interface, numerics against the numpy reference, and the KV cache
(prefill then decode equals one prefill of the whole sequence) for every norm / position / MLP / head variant."""

import numpy as np
import onnx
import pytest

from qgraph import runtime
from qgraph.models.decoder import (
    DecoderConfig,
    build_decoder,
    past_names,
    prefill_feeds,
    present_names,
    random_weights,
    reference_logits,
    weight_shapes,
)

CONFIGS = {
    "llama": DecoderConfig(num_layers=2),
    "gpt": DecoderConfig.gpt(num_layers=2),
    "untied-opset18": DecoderConfig(tie_embeddings=False, opset=18),
    "rms-learned-gelu": DecoderConfig(positions="learned", mlp="gelu", norm="rms"),
}


def _session(config, seed=0):
    weights = random_weights(config, seed)
    model = build_decoder(config, weights)
    onnx.checker.check_model(model, full_check=True)
    return runtime.create_session(model), weights, model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_matches_numpy_reference(name):
    config = CONFIGS[name]
    session, weights, _ = _session(config)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 7))
    logits = runtime.run(session, prefill_feeds(config, ids))["logits"]
    expected = reference_logits(config, weights, ids)
    assert logits.shape == (2, 7, config.vocab_size)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_with_cache_equals_full_prefill(name):
    config = CONFIGS[name]
    session, _, _ = _session(config)
    ids = np.random.default_rng(2).integers(0, config.vocab_size, (1, 8))
    full = runtime.run(session, prefill_feeds(config, ids))
    past = runtime.run(session, prefill_feeds(config, ids[:, :5]))
    assert past["present.0.key"].shape == (1, config.num_heads, 5, config.head_dim)
    for step in range(5, 8):
        feeds = {"input_ids": ids[:, step:step + 1], "attention_mask": np.ones((1, step + 1), np.int64),
                 "position_ids": np.array([[step]], np.int64)}
        feeds.update({name: past[present] for name, present in zip(past_names(config), present_names(config))})
        past = runtime.run(session, feeds)
        np.testing.assert_allclose(past["logits"][:, 0], full["logits"][:, step], rtol=1e-4, atol=1e-4)
    assert past["present.1.value"].shape == (1, config.num_heads, 8, config.head_dim)


def test_padding_is_masked():
    """A left-padded row gives the same last logits as the unpadded sequence (positions shifted as HF does)."""
    config = CONFIGS["llama"]
    session, _, _ = _session(config)
    ids = np.random.default_rng(3).integers(0, config.vocab_size, (1, 5))
    plain = runtime.run(session, prefill_feeds(config, ids))["logits"][0, -1]
    padded_ids = np.concatenate([np.zeros((1, 3), np.int64), ids], axis=1)
    feeds = prefill_feeds(config, padded_ids)
    feeds["attention_mask"][:, :3] = 0
    feeds["position_ids"] = np.array([[0, 0, 0, 0, 1, 2, 3, 4]], np.int64)
    padded = runtime.run(session, feeds)["logits"][0, -1]
    np.testing.assert_allclose(padded, plain, rtol=1e-4, atol=1e-4)


def test_interface_and_patterns():
    config = CONFIGS["llama"]
    model = build_decoder(config, random_weights(config))
    inputs = [value.name for value in model.graph.input]
    assert inputs == ["input_ids", "attention_mask", "position_ids", *past_names(config)]
    assert [value.name for value in model.graph.output] == ["logits", *present_names(config)]
    ops = [node.op_type for node in model.graph.node]
    for op in ("Pow", "ReduceMean", "Sqrt", "Div", "Neg", "Slice", "Concat", "Sigmoid", "Softmax", "Where"):
        assert op in ops
    head = next(node for node in model.graph.node if node.output[0] == "logits")
    producer = next(node for node in model.graph.node if node.output[0] == head.input[1])
    assert producer.op_type == "Transpose" and producer.input[0] == "model.embed_tokens.weight"
    assert "LayerNormalization" in [node.op_type for node in build_decoder(CONFIGS["gpt"], random_weights(
        CONFIGS["gpt"])).graph.node]


def test_weights_are_deterministic_and_checked():
    config = CONFIGS["llama"]
    first, second = random_weights(config, 5), random_weights(config, 5)
    assert all(np.array_equal(first[name], second[name]) for name in first)
    assert not np.array_equal(first["model.norm.weight"], random_weights(config, 6)["model.norm.weight"])
    assert set(first) == set(weight_shapes(config))
    broken = dict(first)
    broken.pop("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="up_proj"):
        build_decoder(config, broken)
    broken = dict(first, **{"model.norm.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        build_decoder(config, broken)
    with pytest.raises(ValueError, match="norm"):
        DecoderConfig(norm="batch")
