"""A GPT-style decoder language model with a KV cache in the Hugging Face export layout, trained on docstrings.

Architecture (GPT-2 / GPT-Neo style), pre-norm, learned positions, tied input and output embeddings:

    x = E_tok[input_ids] + E_pos[position_ids]
    per layer:  x = x + Wo · Attention(LN1(x))        Attention(h) = Softmax(q·Kᵀ/√d + M) · V, per head
                x = x + W2 · GELU_tanh(W1 · LN2(x) + b1) + b2
    logits = LN_f(x) · E_tokᵀ

**KV cache.** The inference graph (:func:`build_text_decoder`, ``form="inference"``) has the inputs and outputs
Hugging Face's ONNX exporters (``optimum``) write for a decoder with past: inputs ``input_ids`` and
``position_ids`` (int64 ``batch_size × sequence_length``), ``attention_mask`` (int64 ``batch_size ×
past_sequence_length + sequence_length``, 1 = attend) and, per layer ``N``, ``past_key_values.N.key`` and
``past_key_values.N.value`` (float32 ``batch_size × heads × past_sequence_length × head_dim``); outputs
``logits`` (``batch_size × sequence_length × vocabulary``) and ``present.N.key``/``present.N.value``
(``batch_size × heads × past_sequence_length + sequence_length × head_dim``), with
``K = present.N.key = Concat(past_key_values.N.key, k, axis=2)`` (likewise V). A prompt is run with an empty past
(``past_sequence_length = 0``), each next token with the presents of the previous call as its past.

**Mask.** With ``P`` past tokens, ``T`` new ones and ``S = P + T`` keys, query ``i`` (absolute position ``P + i``)
may read key ``j`` when ``j ≤ P + i`` and ``attention_mask[b, j] = 1``:
``allowed = LessOrEqual(Range(0, S)[None, :], Range(P, S)[:, None]) ∧ Cast(attention_mask, bool)[:, None, None, :]``
and ``M = Where(allowed, 0, finfo(float32).min)``. ``P`` is read from the shape of ``past_key_values.0.key``.

The training form (:mod:`qgraph.models.text_transformer`) is the same graph without past inputs or present outputs
(``P = 0``) and with the head on the positions of a first input ``target_positions``: every position of a window
predicts the next token.

**Metric.** Perplexity ``exp(−(1/N) Σ log p(w_{t+1} | w_≤t))`` over the next-token targets of the held-out windows
(:func:`qgraph.models.text_corpus.token_windows` over the ``"decoder"`` part's test modules, each window a fresh
context; the validation modules pick the checkpoint, by next-token accuracy); :func:`perplexity` computes it for
any ONNX model with the interface above (FP32 or quantized) in onnxruntime, feeding an empty past. The corpus
(PSF-licensed standard-library docstrings, disjoint from the encoder's) is described in
:mod:`qgraph.models.text_corpus`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from qgraph.models import text_corpus, text_transformer
from qgraph.models.text_transformer import CachedModel, TextTrainingRecipe, TransformerGraphWriter, tensor_input

logger = logging.getLogger(__name__)

BATCH_AXIS, SEQUENCE_AXIS = "batch_size", "sequence_length"
PAST_AXIS, TOTAL_AXIS = "past_sequence_length", "past_sequence_length + sequence_length"
OUTPUT_NAME = "logits"


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


@dataclass(frozen=True)
class TextDecoderConfig(text_transformer.TransformerConfig):
    """Sizes of the decoder (GPT-2's names)."""

    max_positions: int = 128
    layer_norm_epsilon: float = 1e-5


def _layer(index: int) -> str:
    return f"transformer.h.{index}"


def parameter_shapes(config: TextDecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, dense weights as ``(in, out)``."""
    hidden, inner = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (config.vocab_size, hidden),
        "transformer.wpe.weight": (config.max_positions, hidden),
    }
    for index in range(config.num_layers):
        layer = _layer(index)
        dense = {f"{layer}.attn.q_proj": (hidden, hidden), f"{layer}.attn.k_proj": (hidden, hidden),
                 f"{layer}.attn.v_proj": (hidden, hidden), f"{layer}.attn.out_proj": (hidden, hidden),
                 f"{layer}.mlp.c_fc": (hidden, inner), f"{layer}.mlp.c_proj": (inner, hidden)}
        for norm in (f"{layer}.ln_1", f"{layer}.ln_2"):
            shapes[f"{norm}.weight"] = (hidden,)
            shapes[f"{norm}.bias"] = (hidden,)
        for prefix, shape in dense.items():
            shapes[f"{prefix}.weight"] = shape
            shapes[f"{prefix}.bias"] = (shape[1],)
    shapes["transformer.ln_f.weight"] = (hidden,)
    shapes["transformer.ln_f.bias"] = (hidden,)
    return shapes


def initial_weights(config: TextDecoderConfig, *, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2's initialisation (residual output projections scaled by 1/√(2·layers)), seeded."""
    return text_transformer.initial_transformer_weights(parameter_shapes(config), seed=seed,
                                                        num_layers=config.num_layers,
                                                        residual_projections=("out_proj.weight", "c_proj.weight"))


def build_text_decoder(weights: dict[str, np.ndarray], config: TextDecoderConfig, *, form: str = "inference"
                       ) -> onnx.ModelProto:
    """The decoder graph over ``weights`` (module docstring); ``form`` is ``"inference"`` (KV cache) or
    ``"training"``."""
    writer = TransformerGraphWriter(form, weights)
    hidden, heads, head_dim, epsilon = config.hidden_size, config.num_heads, config.head_dim, config.layer_norm_epsilon

    scope = "/transformer"
    tokens = writer.node("Gather", [writer.parameter("transformer.wte.weight"), "input_ids"], f"{scope}/wte", axis=0)
    positions = writer.node("Gather", [writer.parameter("transformer.wpe.weight"), "position_ids"], f"{scope}/wpe",
                            axis=0)
    x = writer.node("Add", [tokens, positions], scope)

    # the causal and padding mask (module docstring)
    total_length = writer.dimension("attention_mask", 1, scope)
    past_length = (writer.constant(0, np.int64) if writer.training
                   else writer.dimension(past_key_name(0), 2, scope))
    query_positions = writer.node("Range", [past_length, total_length, writer.constant(1, np.int64)], scope)
    key_positions = writer.node("Range", [writer.constant(0, np.int64), total_length, writer.constant(1, np.int64)],
                                scope)
    causal = writer.node("LessOrEqual", [writer.unsqueeze(key_positions, [0], scope),
                                         writer.unsqueeze(query_positions, [1], scope)], scope)
    padding = writer.node("Cast", [writer.unsqueeze("attention_mask", [1, 2], scope)], scope, to=TensorProto.BOOL)
    allowed = writer.node("And", [writer.unsqueeze(causal, [0, 1], scope), padding], scope)
    fill = writer.constant(text_transformer.MASK_FILL_VALUE)
    additive_mask = writer.node("Where", [allowed, writer.constant(0.0), fill], scope)

    for index in range(config.num_layers):
        layer, scope = _layer(index), f"/transformer/h.{index}"
        attention = f"{scope}/attn"
        normed = writer.layer_norm(x, f"{layer}.ln_1", f"{scope}/ln_1", epsilon)
        query = writer.split_heads(writer.linear(normed, f"{layer}.attn.q_proj", f"{attention}/q_proj"),
                                   heads, head_dim, attention)
        key = writer.split_heads(writer.linear(normed, f"{layer}.attn.k_proj", f"{attention}/k_proj"),
                                 heads, head_dim, attention)
        value = writer.split_heads(writer.linear(normed, f"{layer}.attn.v_proj", f"{attention}/v_proj"),
                                   heads, head_dim, attention)
        if not writer.training:
            key = writer.node("Concat", [past_key_name(index), key], attention, output=present_key_name(index),
                              axis=2)
            value = writer.node("Concat", [past_value_name(index), value], attention,
                                output=present_value_name(index), axis=2)
        key_transposed = writer.node("Transpose", [key], attention, perm=[0, 1, 3, 2])
        probabilities = writer.attention_scores(query, key_transposed, additive_mask, head_dim, attention)
        context = writer.merge_heads(writer.node("MatMul", [probabilities, value], attention), hidden, attention)
        x = writer.node("Add", [x, writer.linear(context, f"{layer}.attn.out_proj", f"{attention}/out_proj")], scope)
        normed = writer.layer_norm(x, f"{layer}.ln_2", f"{scope}/ln_2", epsilon)
        inner = writer.gelu_tanh(writer.linear(normed, f"{layer}.mlp.c_fc", f"{scope}/mlp/c_fc"), f"{scope}/mlp/act")
        x = writer.node("Add", [x, writer.linear(inner, f"{layer}.mlp.c_proj", f"{scope}/mlp/c_proj")], scope)

    x = writer.layer_norm(x, "transformer.ln_f", "/transformer/ln_f", epsilon)
    if writer.training:
        x = writer.select_positions(x, text_transformer.POSITIONS_INPUT, hidden, "/lm_head")
    writer.node("MatMul", [x, writer.transposed_weight("transformer.wte.weight", "/lm_head")], "/lm_head",
                output=OUTPUT_NAME)

    sequence = [BATCH_AXIS, SEQUENCE_AXIS]
    if writer.training:
        inputs = [text_transformer.positions_input(), tensor_input("input_ids", TensorProto.INT64, sequence),
                  tensor_input("attention_mask", TensorProto.INT64, sequence),
                  tensor_input("position_ids", TensorProto.INT64, sequence)]
        outputs = [tensor_input(OUTPUT_NAME, TensorProto.FLOAT, ["selected_tokens", config.vocab_size])]
    else:
        cache_shape = [BATCH_AXIS, heads, PAST_AXIS, head_dim]
        present_shape = [BATCH_AXIS, heads, TOTAL_AXIS, head_dim]
        inputs = [tensor_input("input_ids", TensorProto.INT64, sequence),
                  tensor_input("attention_mask", TensorProto.INT64, [BATCH_AXIS, TOTAL_AXIS]),
                  tensor_input("position_ids", TensorProto.INT64, sequence)]
        outputs = [tensor_input(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_AXIS, SEQUENCE_AXIS, config.vocab_size])]
        for index in range(config.num_layers):
            inputs += [tensor_input(past_key_name(index), TensorProto.FLOAT, cache_shape),
                       tensor_input(past_value_name(index), TensorProto.FLOAT, cache_shape)]
            outputs += [tensor_input(present_key_name(index), TensorProto.FLOAT, present_shape),
                        tensor_input(present_value_name(index), TensorProto.FLOAT, present_shape)]
    return writer.build_model(inputs, outputs, "text_decoder", f"GPT-style decoder LM ({config}), {form} form")


# ------------------------------------------------------------------------------------------------------- inference
@dataclass(frozen=True)
class CacheLayout:
    """What a KV-cache decoder file expects: its layer count and the static heads and head size of its past."""

    num_layers: int
    num_heads: int
    head_dim: int


def cache_layout(session) -> CacheLayout | None:
    """The past layout of an onnxruntime session over a decoder, or ``None`` if it has no ``past_key_values``."""
    past = {value.name: value for value in session.get_inputs() if value.name.startswith("past_key_values.")}
    if not past:
        return None
    layers = len(past) // 2
    missing = [name for index in range(layers) for name in (past_key_name(index), past_value_name(index))
               if name not in past]
    if missing:
        raise ValueError(f"the model's past inputs are not past_key_values.N.key/value: missing {missing[:3]}")
    shape = past[past_key_name(0)].shape
    if len(shape) != 4 or not all(isinstance(dimension, int) for dimension in (shape[1], shape[3])):
        raise ValueError(f"{past_key_name(0)} must be batch × heads × past × head_dim with static heads and "
                         f"head_dim, got {shape}")
    return CacheLayout(layers, int(shape[1]), int(shape[3]))


def empty_past(layout: CacheLayout, batch: int) -> dict[str, np.ndarray]:
    """Zero-length ``past_key_values`` for a prefill."""
    empty = np.zeros((batch, layout.num_heads, 0, layout.head_dim), np.float32)
    return {name: empty for index in range(layout.num_layers)
            for name in (past_key_name(index), past_value_name(index))}


def decoder_feeds(input_ids: np.ndarray, *, layout: CacheLayout | None, past: dict[str, np.ndarray] | None = None,
                  attention_mask: np.ndarray | None = None, input_names: set[str] | None = None
                  ) -> dict[str, np.ndarray]:
    """Feeds of one call: positions continue after the past; the mask covers past and new tokens (all ones unless
    given)."""
    batch, length = input_ids.shape
    past_length = 0
    if layout is not None:
        past = past if past is not None else empty_past(layout, batch)
        past_length = past[past_key_name(0)].shape[2]
    if attention_mask is None:
        attention_mask = np.ones((batch, past_length + length), np.int64)
    position_ids = np.broadcast_to(np.arange(past_length, past_length + length, dtype=np.int64), (batch, length))
    feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
             "position_ids": np.ascontiguousarray(position_ids)}
    if layout is not None:
        feeds.update(past)
    if input_names is not None:
        feeds = {name: value for name, value in feeds.items() if name in input_names}
    return feeds


def presents_as_past(session, outputs: list[np.ndarray], layout: CacheLayout) -> dict[str, np.ndarray]:
    """The ``present.N.*`` outputs of one call renamed as the next call's ``past_key_values.N.*``."""
    values = dict(zip((value.name for value in session.get_outputs()), outputs))
    return {past_name: values[present_name] for index in range(layout.num_layers)
            for past_name, present_name in ((past_key_name(index), present_key_name(index)),
                                            (past_value_name(index), present_value_name(index)))}


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    negative_log_likelihood: float
    tokens: int


def perplexity(model: str | os.PathLike | onnx.ModelProto, windows: np.ndarray, *, batch_size: int = 16,
               threads: int | None = None) -> PerplexityResult:
    """Perplexity of a decoder (any ONNX file with the interface of the module docstring; the past may be absent)
    on int64 ``windows`` of ``length + 1`` tokens: each window's first ``length`` tokens are fed with an empty past,
    and every position's logits are scored against the following token."""
    from qgraph.runtime import create_session

    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be N × (length + 1) with length >= 1, got shape {windows.shape}")
    session = create_session(model, optimize=True, threads=threads)
    layout = cache_layout(session)
    names = {value.name for value in session.get_inputs()}
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        logits = session.run([OUTPUT_NAME], decoder_feeds(batch[:, :-1], layout=layout, input_names=names))[0]
        logits = logits.astype(np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        targets = batch[:, 1:]
        total -= float(np.take_along_axis(log_probabilities, targets[..., None], axis=-1).sum())
        count += targets.size
    mean = total / max(count, 1)
    return PerplexityResult(math.exp(mean), mean, count)


def decoder_windows(split: str, sequence_length: int, *, limit: int | None = None) -> np.ndarray:
    """Windows (``sequence_length + 1`` tokens) of the decoder part's ``split`` (``"train"``, ``"validation"``:
    checkpoint selection, ``"test"``: the reported perplexity)."""
    vocabulary = text_corpus.corpus_vocabulary()
    return text_corpus.token_windows(text_corpus.corpus_documents("decoder", split), vocabulary,
                                     sequence_length)[:limit]


def _trainer_batch(windows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    feeds = decoder_feeds(windows[:, :-1], layout=None)
    positions = np.arange(windows[:, :-1].size, dtype=np.int64)
    return {text_transformer.POSITIONS_INPUT: positions, **feeds}, windows[:, 1:].reshape(-1)


# -------------------------------------------------------------------------------------------------------- training
def reference_recipe() -> TextTrainingRecipe:
    """The reference decoder: 4 layers, hidden 256, 4 heads, FFN 1024, context 128 (see models/trained/README.md)."""
    config = text_transformer.corpus_config(TextDecoderConfig, hidden_size=256, num_layers=4, num_heads=4,
                                            intermediate_size=1024, max_positions=128)
    return TextTrainingRecipe(name="text_decoder", architecture=config, sequence_length=128, epochs=4,
                              batch_size=16, learning_rate=1.5e-3, weight_decay=0.05, warmup_fraction=0.05)


def tiny_recipe(*, epochs: int = 1, train_limit: int = 48, validation_limit: int = 16) -> TextTrainingRecipe:
    """A seconds-long recipe for tests (:func:`qgraph.models.text_transformer.tiny_recipe`)."""
    return text_transformer.tiny_recipe("text_decoder_tiny", TextDecoderConfig, epochs=epochs,
                                        train_limit=train_limit, validation_limit=validation_limit, batch_size=8)


def train_text_decoder(recipe: TextTrainingRecipe, output_path: str | os.PathLike, *, threads: int | None = None,
                       work_directory: str | os.PathLike | None = None,
                       progress: Callable | None = None) -> dict[str, Any]:
    """Train ``recipe``, write the KV-cache inference model to ``output_path`` and return the measurements."""
    config: TextDecoderConfig = recipe.architecture
    if recipe.sequence_length > config.max_positions:
        raise ValueError(f"sequence_length {recipe.sequence_length} exceeds max_positions {config.max_positions}")
    windows = decoder_windows("train", recipe.sequence_length, limit=recipe.train_limit)
    held_out = decoder_windows("validation", recipe.sequence_length, limit=recipe.validation_limit)
    test = decoder_windows("test", recipe.sequence_length, limit=recipe.validation_limit)

    def epoch_batches(epoch: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        order = np.random.default_rng((recipe.seed, epoch)).permutation(len(windows))
        for start in range(0, len(order), recipe.batch_size):
            yield _trainer_batch(windows[np.sort(order[start:start + recipe.batch_size])])

    validation = [_trainer_batch(held_out[start:start + recipe.batch_size])
                  for start in range(0, len(held_out), recipe.batch_size)]
    weights = initial_weights(config, seed=recipe.seed)
    result = text_transformer.train_text_model(recipe, build_text_decoder, weights, epoch_batches,
                                               math.ceil(len(windows) / recipe.batch_size), validation, output_path,
                                               threads=threads, work_directory=work_directory, progress=progress)
    metric = perplexity(output_path, test, threads=threads)
    selection = perplexity(output_path, held_out, threads=threads)
    logger.info("text decoder: perplexity %.4f (%.4f nats/token) on %d test tokens, %.0f s", metric.perplexity,
                metric.negative_log_likelihood, metric.tokens, result["seconds"])
    return {
        **result, "train_windows": int(len(windows)), "train_tokens": int(windows[:, :-1].size) * recipe.epochs,
        "test_tokens": metric.tokens, "perplexity": metric.perplexity, "test_loss": metric.negative_log_likelihood,
        "validation_perplexity": selection.perplexity,
    }


def trained_text_decoder(recipe: TextTrainingRecipe | None = None, *, cache_dir: str | os.PathLike | None = None,
                         retrain: bool = False, train_if_missing: bool = True, threads: int | None = 1,
                         progress: Callable | None = None) -> CachedModel:
    """The trained decoder of ``recipe`` (default: :func:`reference_recipe`) from the cache, trained if missing."""
    return text_transformer.cached_text_model(recipe or reference_recipe(), train_text_decoder, cache_dir=cache_dir,
                                              retrain=retrain, train_if_missing=train_if_missing, threads=threads,
                                              progress=progress)
