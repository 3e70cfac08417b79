"""A BERT-style text encoder with a masked-language-model head, trained on standard-library docstrings.

Architecture (Devlin et al., 2019; Hugging Face ``BertForMaskedLM``), post-norm:

    e = LN(E_word[input_ids] + E_type[token_type_ids] + E_pos[0 … T-1])
    per layer:  a = LN(x + Wo · Attention(x))          Attention(x) = Softmax(q·kᵀ/√d + M) · v, per head
                x = LN(a + W2 · GELU(W1 · a + b1) + b2)
    logits = LN(GELU(Wt · x + bt)) · E_wordᵀ + b_vocab   (tied output embedding)

(``pre_norm=True`` gives Megatron-BERT's pre-norm order instead: no embedding LayerNorm,
``a = x + Wo · Attention(LN(x))``, ``x = a + W2 · GELU(W1 · LN(a) + b1) + b2``, one final LayerNorm before the head),
with learned position embeddings, GELU in its exact Erf form, and the additive mask computed from the int64
``attention_mask`` as Hugging Face does and torch.onnx exports it:
``M = (1 - Cast(Unsqueeze(Unsqueeze(attention_mask, 1), 2), float)) · finfo(float32).min`` (0 on tokens, about
-3.4·10³⁸ on padding), broadcast over heads and queries.

The reference model (:func:`reference_recipe`) is pre-norm, with two starting-weight choices that
:func:`initial_weights` explains (sinusoidal starting positions, shared query/key starting weights): trained from
BERT's own starting point, post-norm or pre-norm, the character model stayed at the unigram stage of masked-language
training (predicting frequent characters, 23.5 % accuracy) within the steps a shared 2-core CPU affords.

The inference graph (:func:`build_text_encoder` with ``form="inference"``) is what ``torch.onnx.export`` writes for
that model at opset 17 with dynamic ``batch_size`` and ``sequence_length``: inputs ``input_ids``,
``attention_mask``, ``token_type_ids`` (int64 ``batch_size × sequence_length``), output ``logits``
(``batch_size × sequence_length × vocabulary``); fused ``LayerNormalization``; 3-D ``MatMul`` + ``Add``
projections; the position ids ``Slice``d from the ``bert.embeddings.position_ids`` buffer; see
:mod:`qgraph.models.text_transformer` for the naming and the training form.

Task and metric: masked-token accuracy at the recipe's masking rate (30 % of the real characters in the reference,
BERT's 80/10/10 replacement). Training sequences (:func:`qgraph.models.text_corpus.packed_sequences`
over the ``"encoder"`` part) are masked afresh every epoch (seeded by epoch); held-out sequences of the validation
and test modules are masked once with a fixed seed (:func:`held_out_batches`); the validation split picks the
checkpoint, the test split gives the reported metric; :func:`masked_token_accuracy` measures
any ONNX model with the inference interface (FP32 or quantized) on them: the fraction of masked positions whose
arg-max logit is the original character. The corpus is the PSF-licensed standard-library docstrings; see
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

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"
BATCH_AXIS, SEQUENCE_AXIS = "batch_size", "sequence_length"
VALIDATION_MASK_SEED = 1234
POSITION_INITIALIZATIONS = ("normal", "sinusoidal")


@dataclass(frozen=True)
class TextEncoderConfig(text_transformer.TransformerConfig):
    """Sizes of the encoder (BERT's names)."""

    max_positions: int = 64
    layer_norm_epsilon: float = 1e-12
    type_vocab_size: int = 2
    #: ``False``: BERT's post-norm; ``True``: Megatron-BERT's pre-norm (module docstring).
    pre_norm: bool = False
    #: How the (learned) position embeddings start: ``"normal"``, BERT's ``N(0, 0.02²)``, or ``"sinusoidal"``,
    #: the Transformer's sines and cosines scaled to the same standard deviation (:func:`sinusoidal_positions`).
    position_initialization: str = "normal"
    #: ``True``: every layer's key projection starts equal to its query projection, both ``N(0, 0.06²)``
    #: (:func:`initial_weights`), so that attention starts local with sinusoidal positions.
    shared_query_key_initialization: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.position_initialization not in POSITION_INITIALIZATIONS:
            raise ValueError(f"position_initialization must be one of {POSITION_INITIALIZATIONS}, got "
                             f"{self.position_initialization!r}")


def _layer(index: int) -> str:
    return f"bert.encoder.layer.{index}"


def parameter_shapes(config: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, dense weights as ``(in, out)``."""
    hidden, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "bert.embeddings.word_embeddings.weight": (vocab, hidden),
        "bert.embeddings.position_embeddings.weight": (config.max_positions, hidden),
        "bert.embeddings.token_type_embeddings.weight": (config.type_vocab_size, hidden),
    }
    norms = ["bert.encoder.ln"] if config.pre_norm else ["bert.embeddings.LayerNorm"]
    for index in range(config.num_layers):
        layer = _layer(index)
        dense = {f"{layer}.attention.self.query": (hidden, hidden), f"{layer}.attention.self.key": (hidden, hidden),
                 f"{layer}.attention.self.value": (hidden, hidden),
                 f"{layer}.attention.output.dense": (hidden, hidden),
                 f"{layer}.intermediate.dense": (hidden, inner), f"{layer}.output.dense": (inner, hidden)}
        for prefix, shape in dense.items():
            shapes[f"{prefix}.weight"] = shape
            shapes[f"{prefix}.bias"] = (shape[1],)
        norms += ([f"{layer}.attention.ln", f"{layer}.ln"] if config.pre_norm
                  else [f"{layer}.attention.output.LayerNorm", f"{layer}.output.LayerNorm"])
    for norm in norms:
        shapes[f"{norm}.weight"] = (hidden,)
        shapes[f"{norm}.bias"] = (hidden,)
    shapes.update({
        "cls.predictions.transform.dense.weight": (hidden, hidden),
        "cls.predictions.transform.dense.bias": (hidden,),
        "cls.predictions.transform.LayerNorm.weight": (hidden,),
        "cls.predictions.transform.LayerNorm.bias": (hidden,),
        "cls.predictions.bias": (vocab,),
    })
    return shapes


def sinusoidal_positions(positions: int, hidden: int, std: float = 0.02) -> np.ndarray:
    """``P[t, 2i] = a·sin(t / 10000^(2i/h))``, ``P[t, 2i+1] = a·cos(…)`` (Vaswani et al., 2017) with ``a = std·√2``,
    the amplitude of a sine whose standard deviation over a period is ``std``, that of the other embeddings (the
    slow columns cover less than a period in ``positions`` steps, so vary less). A shift by ``k`` positions is
    the same rotation of each (sin, cos) pair for every ``t``, so one linear map of the queries and keys can attend to
    a fixed neighbour everywhere: the masked-token task starts with that relation at hand instead of learning it
    position by position."""
    frequencies = 1.0 / 10000.0 ** (np.arange(0, hidden, 2, dtype=np.float64) / hidden)
    angles = np.arange(positions, dtype=np.float64)[:, None] * frequencies[None, :]
    table = np.zeros((positions, hidden), np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, :hidden // 2])
    return (table * std * math.sqrt(2.0)).astype(np.float32)


#: The standard deviation of the shared query/key projections of ``shared_query_key_initialization``.
SHARED_QUERY_KEY_STD = 0.06


def initial_weights(config: TextEncoderConfig, *, seed: int = 0) -> dict[str, np.ndarray]:
    """BERT's initialisation (see :mod:`qgraph.models.text_transformer`), seeded, with three options of the config.

    - pre-norm: the two residual output projections of each layer start at ``0.02 / √(2 · layers)``, as GPT-2's do;
    - ``position_initialization="sinusoidal"``: the position embeddings start as :func:`sinusoidal_positions`;
    - ``shared_query_key_initialization``: each layer's key weight starts as a copy of its query weight, both drawn
      ``N(0, 0.06²)``. Then the score of query ``i`` and key ``j`` starts as ``LN(x_i)ᵀ·WᵀW·LN(x_j) / √d`` with
      ``WᵀW ≈ 0.06² · d · I`` on each head's subspace, a similarity of the two inputs: with sinusoidal positions,
      whose similarity falls with ``|i − j|``, attention starts on each token and its neighbours instead of
      uniform over the sequence. A masked character is predicted from its neighbours, so training starts with the
      relation it has to find; with independent random projections (BERT's) a character model sat at the unigram
      stage (predicting frequent characters) for thousands of steps.
    """
    residual_projections = (".output.dense.weight",) if config.pre_norm else ()
    weights = text_transformer.initial_transformer_weights(parameter_shapes(config), seed=seed,
                                                           num_layers=config.num_layers,
                                                           residual_projections=residual_projections)
    if config.position_initialization == "sinusoidal":
        weights["bert.embeddings.position_embeddings.weight"] = sinusoidal_positions(config.max_positions,
                                                                                     config.hidden_size)
    if config.shared_query_key_initialization:
        scale = np.float32(SHARED_QUERY_KEY_STD / 0.02)
        for index in range(config.num_layers):
            query = weights[f"{_layer(index)}.attention.self.query.weight"] * scale
            weights[f"{_layer(index)}.attention.self.query.weight"] = query
            weights[f"{_layer(index)}.attention.self.key.weight"] = query.copy()
    return weights


def build_text_encoder(weights: dict[str, np.ndarray], config: TextEncoderConfig, *, form: str = "inference"
                       ) -> onnx.ModelProto:
    """The encoder graph over ``weights`` (see the module docstring; ``form`` is ``"inference"`` or
    ``"training"``, the latter with a first input ``target_positions`` and ``M × vocabulary`` logits)."""
    writer = TransformerGraphWriter(form, weights)
    hidden, heads, head_dim, epsilon = config.hidden_size, config.num_heads, config.head_dim, config.layer_norm_epsilon
    input_ids, attention_mask, token_type_ids = INPUT_NAMES

    scope = "/bert/embeddings"
    words = writer.node("Gather", [writer.parameter("bert.embeddings.word_embeddings.weight"), input_ids],
                        f"{scope}/word_embeddings", axis=0)
    types = writer.node("Gather", [writer.parameter("bert.embeddings.token_type_embeddings.weight"),
                                   token_type_ids], f"{scope}/token_type_embeddings", axis=0)
    sequence_length = writer.dimension(input_ids, 1, scope)
    position_buffer = writer.constant(np.arange(config.max_positions, dtype=np.int64)[None, :], np.int64)
    position_ids = writer.node("Slice", [position_buffer, writer.constant([0], np.int64),
                                         writer.unsqueeze(sequence_length, [0], scope),
                                         writer.constant([1], np.int64), writer.constant([1], np.int64)], scope)
    positions = writer.node("Gather", [writer.parameter("bert.embeddings.position_embeddings.weight"), position_ids],
                            f"{scope}/position_embeddings", axis=0)
    x = writer.node("Add", [writer.node("Add", [words, types], scope), positions], scope)
    if not config.pre_norm:
        x = writer.layer_norm(x, "bert.embeddings.LayerNorm", f"{scope}/LayerNorm", epsilon)

    scope = "/bert"
    extended = writer.unsqueeze(writer.unsqueeze(attention_mask, [1], scope), [2], scope)
    extended = writer.node("Cast", [extended], scope, to=TensorProto.FLOAT)
    inverted = writer.node("Sub", [writer.constant(1.0), extended], scope)
    additive_mask = writer.node("Mul", [inverted, writer.constant(text_transformer.MASK_FILL_VALUE)], scope)

    for index in range(config.num_layers):
        layer, scope = _layer(index), f"/bert/encoder/layer.{index}"
        attention = f"{scope}/attention/self"
        normed = (writer.layer_norm(x, f"{layer}.attention.ln", f"{scope}/attention/ln", epsilon)
                  if config.pre_norm else x)
        query = writer.split_heads(writer.linear(normed, f"{layer}.attention.self.query", f"{attention}/query"),
                                   heads, head_dim, attention)
        key = writer.split_heads(writer.linear(normed, f"{layer}.attention.self.key", f"{attention}/key"),
                                 heads, head_dim, attention)
        value = writer.split_heads(writer.linear(normed, f"{layer}.attention.self.value", f"{attention}/value"),
                                   heads, head_dim, attention)
        key_transposed = writer.node("Transpose", [key], attention, perm=[0, 1, 3, 2])
        probabilities = writer.attention_scores(query, key_transposed, additive_mask, head_dim, attention)
        context = writer.merge_heads(writer.node("MatMul", [probabilities, value], attention), hidden, attention)
        output = f"{scope}/attention/output"
        projected = writer.linear(context, f"{layer}.attention.output.dense", f"{output}/dense")
        attended = writer.node("Add", [projected, x], output)
        if config.pre_norm:
            normed = writer.layer_norm(attended, f"{layer}.ln", f"{scope}/ln", epsilon)
        else:
            attended = writer.layer_norm(attended, f"{layer}.attention.output.LayerNorm", f"{output}/LayerNorm",
                                         epsilon)
            normed = attended
        inner = writer.gelu_erf(writer.linear(normed, f"{layer}.intermediate.dense", f"{scope}/intermediate/dense"),
                                f"{scope}/intermediate/intermediate_act_fn")
        projected = writer.linear(inner, f"{layer}.output.dense", f"{scope}/output/dense")
        x = writer.node("Add", [projected, attended], f"{scope}/output")
        if not config.pre_norm:
            x = writer.layer_norm(x, f"{layer}.output.LayerNorm", f"{scope}/output/LayerNorm", epsilon)
    if config.pre_norm:
        x = writer.layer_norm(x, "bert.encoder.ln", "/bert/encoder/ln", epsilon)

    scope = "/cls/predictions"
    transformed = writer.gelu_erf(writer.linear(x, "cls.predictions.transform.dense", f"{scope}/transform/dense"),
                                  f"{scope}/transform/transform_act_fn")
    transformed = writer.layer_norm(transformed, "cls.predictions.transform.LayerNorm",
                                    f"{scope}/transform/LayerNorm", epsilon)
    if writer.training:
        # The masked rows are selected after the head's LayerNormalization, not before it: onnxruntime-training
        # 1.19.2 trained a LayerNormalization over the 2-D selected rows wrongly and corrupted its heap (a double
        # free or segmentation fault within ~500 steps even for a 1-layer, hidden-64 encoder; the 4-layer
        # reference stalled at 19% masked-token accuracy). Row-wise, both orders compute the same logits.
        transformed = writer.select_positions(transformed, text_transformer.POSITIONS_INPUT, hidden, scope)
    scores = writer.node("MatMul", [transformed, writer.transposed_weight("bert.embeddings.word_embeddings.weight",
                                                                          f"{scope}/decoder")], f"{scope}/decoder")
    writer.node("Add", [writer.parameter("cls.predictions.bias"), scores], f"{scope}/decoder", output=OUTPUT_NAME)

    sequence_inputs = [tensor_input(name, TensorProto.INT64, [BATCH_AXIS, SEQUENCE_AXIS]) for name in INPUT_NAMES]
    if writer.training:
        inputs = [text_transformer.positions_input(), *sequence_inputs]
        outputs = [tensor_input(OUTPUT_NAME, TensorProto.FLOAT, ["selected_tokens", config.vocab_size])]
    else:
        inputs = sequence_inputs
        outputs = [tensor_input(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_AXIS, SEQUENCE_AXIS, config.vocab_size])]
    return writer.build_model(inputs, outputs, "text_encoder",
                              f"BERT-style masked language model ({config}), {form} form")


# ------------------------------------------------------------------------------------------------------------ data
def encoder_sequences(split: str, sequence_length: int, *, limit: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Packed ``(input_ids, attention_mask)`` of the encoder part's ``split``."""
    vocabulary = text_corpus.corpus_vocabulary()
    input_ids, attention_mask = text_corpus.packed_sequences(text_corpus.corpus_documents("encoder", split),
                                                             vocabulary, sequence_length)
    return input_ids[:limit], attention_mask[:limit]


def _feeds(input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": np.zeros_like(input_ids)}


@dataclass(frozen=True)
class MaskedBatch:
    """One masked batch: model feeds, the flat masked positions and the original tokens there."""

    feeds: dict[str, np.ndarray]
    positions: np.ndarray
    labels: np.ndarray


def masked_batches(input_ids: np.ndarray, attention_mask: np.ndarray, batch_size: int, *, seed: int | tuple[int, ...],
                   rate: float = 0.15, shuffle: bool = False) -> list[MaskedBatch]:
    """Batches masked with ``numpy.random.default_rng(seed)`` (rows in a seeded random order when ``shuffle``)."""
    vocabulary = text_corpus.corpus_vocabulary()
    generator = np.random.default_rng(seed)
    order = generator.permutation(len(input_ids)) if shuffle else np.arange(len(input_ids))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = np.sort(order[start:start + batch_size])
        masked, positions, labels = text_corpus.mask_tokens(input_ids[rows], attention_mask[rows], vocabulary,
                                                            generator, rate=rate)
        batches.append(MaskedBatch(_feeds(masked, attention_mask[rows]), positions, labels))
    return batches


def _trainer_batch(batch: MaskedBatch) -> tuple[dict[str, np.ndarray], np.ndarray]:
    return {text_transformer.POSITIONS_INPUT: batch.positions, **batch.feeds}, batch.labels


def held_out_batches(split: str, sequence_length: int, *, batch_size: int = 64, limit: int | None = None,
                     rate: float = 0.15) -> list[MaskedBatch]:
    """A held-out evaluation set (``"validation"`` or ``"test"`` modules), masked once with
    :data:`VALIDATION_MASK_SEED`."""
    if split == "train":
        raise ValueError("held-out batches come from the 'validation' or 'test' split")
    input_ids, attention_mask = encoder_sequences(split, sequence_length, limit=limit)
    return masked_batches(input_ids, attention_mask, batch_size, seed=VALIDATION_MASK_SEED, rate=rate)


@dataclass(frozen=True)
class MaskedAccuracy:
    accuracy: float
    loss: float
    masked_tokens: int


def masked_token_accuracy(model: str | os.PathLike | onnx.ModelProto, batches: list[MaskedBatch], *,
                          threads: int | None = None) -> MaskedAccuracy:
    """Masked-token accuracy and mean cross-entropy of an inference-form encoder (any file with its interface)."""
    from qgraph.runtime import create_session

    session = create_session(model, optimize=True, threads=threads)
    names = {value.name for value in session.get_inputs()}
    correct, loss_sum, count = 0, 0.0, 0
    for batch in batches:
        logits = session.run([OUTPUT_NAME], {name: value for name, value in batch.feeds.items() if name in names})[0]
        selected = logits.reshape(-1, logits.shape[-1])[batch.positions].astype(np.float64)
        correct += int(np.count_nonzero(selected.argmax(axis=1) == batch.labels))
        shifted = selected - selected.max(axis=1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss_sum += float(-log_probabilities[np.arange(len(batch.labels)), batch.labels].sum())
        count += len(batch.labels)
    return MaskedAccuracy(correct / max(count, 1), loss_sum / max(count, 1), count)


# -------------------------------------------------------------------------------------------------------- training
def reference_recipe() -> TextTrainingRecipe:
    """The reference encoder: pre-norm, 4 layers, hidden 256, 4 heads, FFN 1024, sequence 64, sinusoidal starting
    positions and shared query/key starting weights (:func:`initial_weights`); 30% of the characters masked, batch
    16, eight epochs, AdamW at 5·10⁻⁴ after a 5% warm-up, cosine decay (see models/README.md). A sweep on 512 held-out
    sequences put the learning rate there: 2·10⁻³ plateaued near 22 % masked-character accuracy after two epochs,
    5·10⁻⁴ reached 25.9 % after two and 35.0 % after six, still rising."""
    config = text_transformer.corpus_config(TextEncoderConfig, hidden_size=256, num_layers=4, num_heads=4,
                                            intermediate_size=1024, max_positions=64, pre_norm=True,
                                            position_initialization="sinusoidal",
                                            shared_query_key_initialization=True)
    return TextTrainingRecipe(name="text_encoder", architecture=config, sequence_length=64, epochs=8,
                              batch_size=16, learning_rate=5e-4, weight_decay=0.01, warmup_fraction=0.05,
                              mask_rate=0.3)


def tiny_recipe(*, epochs: int = 1, train_limit: int = 96, validation_limit: int = 32) -> TextTrainingRecipe:
    """A seconds-long recipe for tests (:func:`qgraph.models.text_transformer.tiny_recipe`)."""
    return text_transformer.tiny_recipe("text_encoder_tiny", TextEncoderConfig, epochs=epochs,
                                        train_limit=train_limit, validation_limit=validation_limit, batch_size=16)


def train_text_encoder(recipe: TextTrainingRecipe, output_path: str | os.PathLike, *, threads: int | None = None,
                       work_directory: str | os.PathLike | None = None,
                       progress: Callable | None = None) -> dict[str, Any]:
    """Train ``recipe``, write the inference-form model to ``output_path`` and return the measurements."""

    config: TextEncoderConfig = recipe.architecture
    input_ids, attention_mask = encoder_sequences("train", recipe.sequence_length, limit=recipe.train_limit)
    validation = held_out_batches("validation", recipe.sequence_length, batch_size=recipe.batch_size,
                                  limit=recipe.validation_limit, rate=recipe.mask_rate)
    test = held_out_batches("test", recipe.sequence_length, limit=recipe.validation_limit, rate=recipe.mask_rate)

    def epoch_batches(epoch: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        for batch in masked_batches(input_ids, attention_mask, recipe.batch_size, seed=(recipe.seed, epoch),
                                    rate=recipe.mask_rate, shuffle=True):
            yield _trainer_batch(batch)

    weights = initial_weights(config, seed=recipe.seed)
    result = text_transformer.train_text_model(recipe, build_text_encoder, weights, epoch_batches,
                                               math.ceil(len(input_ids) / recipe.batch_size),
                                               [_trainer_batch(batch) for batch in validation], output_path,
                                               threads=threads, work_directory=work_directory, progress=progress)
    metric = masked_token_accuracy(output_path, test, threads=threads)
    selection = masked_token_accuracy(output_path, validation, threads=threads)
    logger.info("text encoder: masked-token accuracy %.4f (loss %.4f) on %d masked test tokens, %.0f s",
                metric.accuracy, metric.loss, metric.masked_tokens, result["seconds"])
    return {
        **result, "train_sequences": int(len(input_ids)), "train_tokens": int(attention_mask.sum()) * recipe.epochs,
        "test_masked_tokens": metric.masked_tokens, "masked_token_accuracy": metric.accuracy,
        "test_loss": metric.loss, "validation_masked_token_accuracy": selection.accuracy,
    }


def trained_text_encoder(recipe: TextTrainingRecipe | None = None, *, cache_dir: str | os.PathLike | None = None,
                         retrain: bool = False, train_if_missing: bool = True, threads: int | None = 1,
                         progress: Callable | None = None) -> CachedModel:
    """The trained encoder of ``recipe`` (default: :func:`reference_recipe`) from the cache, trained if missing."""
    return text_transformer.cached_text_model(recipe or reference_recipe(), train_text_encoder, cache_dir=cache_dir,
                                              retrain=retrain, train_if_missing=train_if_missing, threads=threads,
                                              progress=progress)
