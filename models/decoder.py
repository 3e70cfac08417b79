"""A GPT/Llama-style decoder-only language model with a KV cache, written as Hugging Face exporters write it.

:func:`build_decoder` takes the weights as numpy arrays (:func:`weight_shapes` names and shapes them; a trainer fills
them, :func:`random_weights` gives deterministic random ones) and a :class:`DecoderConfig`, and returns an
``onnx.ModelProto`` with the interface of an optimum / torch.onnx "decoder with past" export:

- inputs ``input_ids`` int64 ``[batch, sequence]``, ``attention_mask`` int64 ``[batch, past_sequence + sequence]``
  (1 = attend, 0 = padding), ``position_ids`` int64 ``[batch, sequence]`` and, for each layer N,
  ``past_key_values.N.key`` / ``past_key_values.N.value`` float ``[batch, heads, past_sequence, head_dim]``;
- outputs ``logits`` ``[batch, sequence, vocab]`` and ``present.N.key`` / ``present.N.value``
  ``[batch, heads, past_sequence + sequence, head_dim]`` (the past with this step's keys and values appended).

Prefill is a call with an empty past (``past_sequence = 0``, see :func:`empty_past`); each decode step feeds the
previous ``present`` tensors back as the past.

The math, for hidden size H, h heads of size d = H / h and a sequence of S new tokens after P cached ones:

- embedding ``x = E[input_ids]`` (``Gather``); with learned positions ``x += P_emb[position_ids]``;
- per layer, pre-norm: ``x = x + Wo · Attention(Norm₁(x))``, then ``x = x + MLP(Norm₂(x))``;
- ``RMSNorm(x) = γ ⊙ x / sqrt(mean(x²) + ε)``, written decomposed (``Pow → ReduceMean → Add → Sqrt → Div → Mul``)
  as torch.onnx exports Llama's RMSNorm; or ``LayerNorm(x) = γ ⊙ (x − μ) / sqrt(σ² + ε) + β``
  (the opset-17 ``LayerNormalization`` operator, as torch.onnx writes ``nn.LayerNorm``);
- ``q, k, v = x·Wq (+bq), x·Wk (+bk), x·Wv (+bv)``, reshaped to ``[batch, h, S, d]``;
- rotary positions (Llama): with ``θ_i = base^(−2i/d)`` for ``i < d/2`` and the tables
  ``cos[p] = cos(p·[θ, θ])``, ``sin[p] = sin(p·[θ, θ])`` (``[max_positions, d]`` initializers, ``Gather``-ed by
  ``position_ids``), ``rope(t) = t ⊙ cos + rotate_half(t) ⊙ sin`` with
  ``rotate_half([t₁, t₂]) = [−t₂, t₁]`` (``Slice``, ``Neg``, ``Concat``), applied to q and k;
- ``K = concat(past_key, k)``, ``V = concat(past_value, v)`` on the sequence axis (these are ``present``);
- ``A = softmax(q·Kᵀ / sqrt(d) + M)`` with the additive mask ``M[b, i, j] = 0`` where key j is visible to query i
  (``j ≤ P + i``, causal) and ``attention_mask[b, j] = 1``, and the float32 minimum elsewhere; ``Attention = A·V``
  reassembled to ``[batch, S, H]``;
- MLP: gated SiLU (Llama) ``down(silu(x·Wg) ⊙ x·Wu)`` with ``silu(t) = t·σ(t)`` (``Sigmoid`` then ``Mul``), or GELU
  (GPT) ``(gelu(x·W1 + b1))·W2 + b2`` with the exact, Erf-based GELU decomposed as exporters write it;
- final norm, then ``logits = x·Eᵀ`` with tied embeddings (a ``Transpose`` of the embedding table feeding the
  LM head ``MatMul``) or ``x·W_lm`` with a separate head.

Weights are stored in MatMul orientation ``[in, out]`` (an exporter writes ``Linear.weight`` transposed into the
MatMul initializer). :func:`random_weights` draws them deterministically from a seed; with ``structured=True``
(the default) they look like a trained model's where it matters to quantization: embeddings ``N(0, 1/16)``,
weights ``N(0, 1/fan_in)`` with a few heavy-tailed entries per column, and norm gains with a handful of large
"outlier" channels, which give the activations feeding the projections the per-channel magnitude spread that AWQ
exploits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from qgraph.models.common import ProtoGraph

logger = logging.getLogger(__name__)

IR_VERSION = 8
NORMS = ("rms", "layer")
POSITIONS = ("rotary", "learned")
MLPS = ("gated", "gelu")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The shape of a decoder (defaults: a small Llama-style model)."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 176
    max_positions: int = 256
    #: "rms" (decomposed RMSNorm, Llama) or "layer" (LayerNormalization, GPT).
    norm: str = "rms"
    #: "rotary" (RoPE tables gathered by position_ids) or "learned" (a position embedding table).
    positions: str = "rotary"
    #: "gated" (SiLU-gated, Llama) or "gelu" (two layers with Erf-GELU, GPT).
    mlp: str = "gated"
    #: Biases on the projections and MLP (GPT has them, Llama does not).
    bias: bool = False
    #: The LM head reads the transposed embedding table instead of a weight of its own.
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    norm_epsilon: float = 1e-5
    opset: int = 17

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {self.mlp!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.opset < 17:
            raise ValueError("the decoder is written at opset 17 or later (LayerNormalization)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def llama(cls, **changes) -> DecoderConfig:
        return cls(**changes)

    @classmethod
    def gpt(cls, **changes) -> DecoderConfig:
        defaults = dict(norm="layer", positions="learned", mlp="gelu", bias=True, intermediate_size=256)
        defaults.update(changes)
        return cls(**defaults)


def past_names(config: DecoderConfig) -> list[str]:
    """``past_key_values.N.key`` and ``.value`` for every layer, in input order."""
    return [f"past_key_values.{layer}.{kind}" for layer in range(config.num_layers) for kind in ("key", "value")]


def present_names(config: DecoderConfig) -> list[str]:
    return [f"present.{layer}.{kind}" for layer in range(config.num_layers) for kind in ("key", "value")]


def weight_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every weight :func:`build_decoder` needs, by name, with its shape (projections in ``[in, out]`` layout)."""
    hidden, inner = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    if config.positions == "learned":
        shapes["model.embed_positions.weight"] = (config.max_positions, hidden)
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{prefix}.{norm}.weight"] = (hidden,)
            if config.norm == "layer":
                shapes[f"{prefix}.{norm}.bias"] = (hidden,)
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}.self_attn.{projection}.weight"] = (hidden, hidden)
            if config.bias:
                shapes[f"{prefix}.self_attn.{projection}.bias"] = (hidden,)
        if config.mlp == "gated":
            shapes[f"{prefix}.mlp.gate_proj.weight"] = (hidden, inner)
            shapes[f"{prefix}.mlp.up_proj.weight"] = (hidden, inner)
            shapes[f"{prefix}.mlp.down_proj.weight"] = (inner, hidden)
        else:
            shapes[f"{prefix}.mlp.fc_in.weight"] = (hidden, inner)
            shapes[f"{prefix}.mlp.fc_out.weight"] = (inner, hidden)
        if config.bias:
            for projection, size in (("gate_proj", inner), ("up_proj", inner), ("down_proj", hidden)) \
                    if config.mlp == "gated" else (("fc_in", inner), ("fc_out", hidden)):
                shapes[f"{prefix}.mlp.{projection}.bias"] = (size,)
    shapes["model.norm.weight"] = (hidden,)
    if config.norm == "layer":
        shapes["model.norm.bias"] = (hidden,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (hidden, config.vocab_size)
    return shapes


def random_weights(config: DecoderConfig, seed: int = 0, *, structured: bool = True) -> dict[str, np.ndarray]:
    """Deterministic float32 weights for ``config`` (see the module docstring for the structure)."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith(".bias"):
            array = rng.normal(0.0, 0.02, shape)
        elif len(shape) == 1:  # a norm gain
            array = np.ones(shape)
            if structured:
                array = array + rng.normal(0.0, 0.1, shape)
                outliers = rng.choice(shape[0], size=max(1, shape[0] // 32), replace=False)
                array[outliers] *= rng.uniform(4.0, 10.0, outliers.size)
        elif "embed" in name:
            array = rng.normal(0.0, 0.25 if structured else 0.02, shape)
        else:
            fan_in = shape[0]
            array = rng.normal(0.0, 1.0 / math.sqrt(fan_in), shape)
            if structured:  # heavy tails: a few large weights per output column
                spikes = rng.random(shape) < 0.005
                array = np.where(spikes, array * rng.uniform(3.0, 6.0, shape), array)
        weights[name] = array.astype(np.float32)
    return weights


def rotary_tables(config: DecoderConfig) -> tuple[np.ndarray, np.ndarray]:
    """The ``[max_positions, head_dim]`` cos and sin tables of rotary positions (HF's ``[θ, θ]`` layout)."""
    half = config.head_dim // 2
    inverse_frequency = config.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / config.head_dim)
    angles = np.arange(config.max_positions, dtype=np.float64)[:, None] * inverse_frequency[None, :]
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def empty_past(config: DecoderConfig, batch: int = 1) -> dict[str, np.ndarray]:
    """The past inputs of a prefill call: ``[batch, heads, 0, head_dim]`` float32 zeros-size tensors."""
    shape = (batch, config.num_heads, 0, config.head_dim)
    return {name: np.zeros(shape, np.float32) for name in past_names(config)}


def prefill_feeds(config: DecoderConfig, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every input of a prefill call on ``input_ids`` ``[batch, sequence]`` (no padding, empty past)."""
    input_ids = np.asarray(input_ids, dtype=np.int64)
    batch, sequence = input_ids.shape
    feeds = {
        "input_ids": input_ids,
        "attention_mask": np.ones((batch, sequence), np.int64),
        "position_ids": np.broadcast_to(np.arange(sequence, dtype=np.int64), (batch, sequence)).copy(),
    }
    feeds.update(empty_past(config, batch))
    return feeds


class _Graph(ProtoGraph):
    """Nodes and initializers collected in order; node names follow torch.onnx's ``/module/path/Op`` scheme."""

    def __init__(self) -> None:
        super().__init__()
        self._counter = 0

    def op(self, op_type: str, inputs: list[str], scope: str, *, outputs: int = 1, output_names=None,
           **attributes) -> str | list[str]:
        self._counter += 1
        name = f"{scope}/{op_type}_{self._counter}"
        names = output_names or [f"{name}_output_{index}" for index in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, **attributes))
        return names[0] if outputs == 1 else names


def _reduce_mean(graph: _Graph, opset: int, value: str, scope: str) -> str:
    if opset >= 18:
        axes = graph.add_initializer(f"{scope}/axes", np.array([-1], np.int64))
        return graph.op("ReduceMean", [value, axes], scope, keepdims=1)
    return graph.op("ReduceMean", [value], scope, axes=[-1], keepdims=1)


def _norm(graph: _Graph, config: DecoderConfig, value: str, weights_prefix: str, scope: str) -> str:
    gain = f"{weights_prefix}.weight"
    if config.norm == "layer":
        return graph.op("LayerNormalization", [value, gain, f"{weights_prefix}.bias"], scope, axis=-1,
                        epsilon=config.norm_epsilon)
    two = graph.add_initializer(f"{scope}/two", np.array(2.0, np.float32))
    epsilon = graph.add_initializer(f"{scope}/epsilon", np.array(config.norm_epsilon, np.float32))
    squared = graph.op("Pow", [value, two], scope)
    mean = _reduce_mean(graph, config.opset, squared, scope)
    root = graph.op("Sqrt", [graph.op("Add", [mean, epsilon], scope)], scope)
    normalized = graph.op("Div", [value, root], scope)
    return graph.op("Mul", [gain, normalized], scope)


def _linear(graph: _Graph, value: str, weights_prefix: str, scope: str, bias: bool) -> str:
    output = graph.op("MatMul", [value, f"{weights_prefix}.weight"], scope)
    return graph.op("Add", [f"{weights_prefix}.bias", output], scope) if bias else output


def _rotate(graph: _Graph, config: DecoderConfig, value: str, cos: str, sin: str, scope: str) -> str:
    half = config.head_dim // 2
    starts_low = graph.add_initializer(f"{scope}/start_low", np.array([0], np.int64))
    ends_low = graph.add_initializer(f"{scope}/end_low", np.array([half], np.int64))
    ends_high = graph.add_initializer(f"{scope}/end_high", np.array([np.iinfo(np.int64).max], np.int64))
    axes = graph.add_initializer(f"{scope}/axes", np.array([3], np.int64))
    low = graph.op("Slice", [value, starts_low, ends_low, axes], scope)
    high = graph.op("Slice", [value, ends_low, ends_high, axes], scope)
    rotated = graph.op("Concat", [graph.op("Neg", [high], scope), low], scope, axis=-1)
    return graph.op("Add", [graph.op("Mul", [value, cos], scope), graph.op("Mul", [rotated, sin], scope)], scope)


def _attention_bias(graph: _Graph) -> str:
    """The additive mask ``[batch, 1, S, P + S]``: 0 where visible (causal and not padding), float32 min elsewhere."""
    scope = "/model/mask"
    zero_i = graph.add_initializer(f"{scope}/zero", np.array(0, np.int64))
    one_i = graph.add_initializer(f"{scope}/one", np.array(1, np.int64))
    total = graph.op("Gather", [graph.op("Shape", ["attention_mask"], scope), one_i], scope, axis=0)
    sequence = graph.op("Gather", [graph.op("Shape", ["input_ids"], scope), one_i], scope, axis=0)
    past = graph.op("Sub", [total, sequence], scope)
    rows = graph.op("Range", [past, total, one_i], scope)
    columns = graph.op("Range", [zero_i, total, one_i], scope)
    row_axis = graph.add_initializer(f"{scope}/row_axis", np.array([1], np.int64))
    column_axis = graph.add_initializer(f"{scope}/column_axis", np.array([0], np.int64))
    causal = graph.op("LessOrEqual", [graph.op("Unsqueeze", [columns, column_axis], scope),
                                      graph.op("Unsqueeze", [rows, row_axis], scope)], scope)  # [S, T]
    padding_axes = graph.add_initializer(f"{scope}/padding_axes", np.array([1, 2], np.int64))
    padding = graph.op("Unsqueeze", [graph.op("Cast", ["attention_mask"], scope, to=TensorProto.BOOL), padding_axes],
                       scope)  # [B, 1, 1, T]
    visible = graph.op("And", [causal, padding], scope)  # [B, 1, S, T]
    zero_f = graph.add_initializer(f"{scope}/visible_value", np.array(0.0, np.float32))
    minimum = graph.add_initializer(f"{scope}/masked_value", np.array(np.finfo(np.float32).min, np.float32))
    return graph.op("Where", [visible, zero_f, minimum], scope)


def build_decoder(config: DecoderConfig, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The decoder-with-past graph of ``config`` with ``weights`` (named and shaped as :func:`weight_shapes`)."""
    expected = weight_shapes(config)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"weights missing for the decoder: {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    for name, shape in expected.items():
        if tuple(np.shape(weights[name])) != shape:
            raise ValueError(f"weight {name} has shape {tuple(np.shape(weights[name]))}, expected {shape}")
    graph = _Graph()
    for name in expected:
        graph.add_initializer(name, np.asarray(weights[name], dtype=np.float32))
    hidden, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim

    x = graph.op("Gather", ["model.embed_tokens.weight", "input_ids"], "/model/embed_tokens", axis=0)
    cos = sin = None
    if config.positions == "learned":
        positions = graph.op("Gather", ["model.embed_positions.weight", "position_ids"], "/model/embed_positions",
                             axis=0)
        x = graph.op("Add", [x, positions], "/model/embed_positions")
    else:
        cos_table, sin_table = rotary_tables(config)
        scope = "/model/rotary_emb"
        graph.add_initializer("model.rotary_emb.cos_cached", cos_table)
        graph.add_initializer("model.rotary_emb.sin_cached", sin_table)
        head_axis = graph.add_initializer(f"{scope}/head_axis", np.array([1], np.int64))
        cos = graph.op("Unsqueeze", [graph.op("Gather", ["model.rotary_emb.cos_cached", "position_ids"], scope,
                                              axis=0), head_axis], scope)  # [B, 1, S, d]
        sin = graph.op("Unsqueeze", [graph.op("Gather", ["model.rotary_emb.sin_cached", "position_ids"], scope,
                                              axis=0), head_axis], scope)
    bias = _attention_bias(graph)
    split_shape = graph.add_initializer("/model/split_heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = graph.add_initializer("/model/merge_heads_shape", np.array([0, 0, hidden], np.int64))
    inverse_sqrt = graph.add_initializer("/model/attention_scale", np.array(1.0 / math.sqrt(head_dim), np.float32))

    for layer in range(config.num_layers):
        prefix, scope = f"model.layers.{layer}", f"/model/layers.{layer}"
        normed = _norm(graph, config, x, f"{prefix}.input_layernorm", f"{scope}/input_layernorm")
        heads_of = {}
        for projection in ("q_proj", "k_proj", "v_proj"):
            projection_scope = f"{scope}/self_attn/{projection}"
            projected = _linear(graph, normed, f"{prefix}.self_attn.{projection}", projection_scope, config.bias)
            split = graph.op("Reshape", [projected, split_shape], projection_scope)
            heads_of[projection] = graph.op("Transpose", [split], projection_scope, perm=[0, 2, 1, 3])
        query, key, value = heads_of["q_proj"], heads_of["k_proj"], heads_of["v_proj"]
        if cos is not None:
            query = _rotate(graph, config, query, cos, sin, f"{scope}/self_attn/rotary_q")
            key = _rotate(graph, config, key, cos, sin, f"{scope}/self_attn/rotary_k")
        attention_scope = f"{scope}/self_attn"
        keys = graph.op("Concat", [f"past_key_values.{layer}.key", key], attention_scope, axis=2,
                        output_names=[f"present.{layer}.key"])
        values = graph.op("Concat", [f"past_key_values.{layer}.value", value], attention_scope, axis=2,
                          output_names=[f"present.{layer}.value"])
        keys_t = graph.op("Transpose", [keys], attention_scope, perm=[0, 1, 3, 2])
        scores = graph.op("Mul", [graph.op("MatMul", [query, keys_t], attention_scope), inverse_sqrt],
                          attention_scope)
        probabilities = graph.op("Softmax", [graph.op("Add", [scores, bias], attention_scope)], attention_scope,
                                 axis=-1)
        context = graph.op("MatMul", [probabilities, values], attention_scope)
        merged = graph.op("Reshape", [graph.op("Transpose", [context], attention_scope, perm=[0, 2, 1, 3]),
                                      merge_shape], attention_scope)
        attended = _linear(graph, merged, f"{prefix}.self_attn.o_proj", f"{scope}/self_attn/o_proj", config.bias)
        x = graph.op("Add", [x, attended], scope)

        normed = _norm(graph, config, x, f"{prefix}.post_attention_layernorm", f"{scope}/post_attention_layernorm")
        mlp_scope = f"{scope}/mlp"
        if config.mlp == "gated":
            gate = _linear(graph, normed, f"{prefix}.mlp.gate_proj", f"{mlp_scope}/gate_proj", config.bias)
            up = _linear(graph, normed, f"{prefix}.mlp.up_proj", f"{mlp_scope}/up_proj", config.bias)
            activated = graph.op("Mul", [gate, graph.op("Sigmoid", [gate], f"{mlp_scope}/act_fn")],
                                 f"{mlp_scope}/act_fn")
            inner = graph.op("Mul", [activated, up], mlp_scope)
            out = _linear(graph, inner, f"{prefix}.mlp.down_proj", f"{mlp_scope}/down_proj", config.bias)
        else:
            first = _linear(graph, normed, f"{prefix}.mlp.fc_in", f"{mlp_scope}/fc_in", config.bias)
            gelu_scope = f"{mlp_scope}/act"
            root_two = graph.add_initializer(f"{gelu_scope}/sqrt_two", np.array(math.sqrt(2.0), np.float32))
            one = graph.add_initializer(f"{gelu_scope}/one", np.array(1.0, np.float32))
            half = graph.add_initializer(f"{gelu_scope}/half", np.array(0.5, np.float32))
            erf = graph.op("Erf", [graph.op("Div", [first, root_two], gelu_scope)], gelu_scope)
            activated = graph.op("Mul", [graph.op("Mul", [first, graph.op("Add", [erf, one], gelu_scope)],
                                                  gelu_scope), half], gelu_scope)
            out = _linear(graph, activated, f"{prefix}.mlp.fc_out", f"{mlp_scope}/fc_out", config.bias)
        x = graph.op("Add", [x, out], scope)

    x = _norm(graph, config, x, "model.norm", "/model/norm")
    if config.tie_embeddings:
        head = graph.op("Transpose", ["model.embed_tokens.weight"], "/lm_head", perm=[1, 0])
    else:
        head = "lm_head.weight"
    graph.op("MatMul", [x, head], "/lm_head", output_names=["logits"])

    past_shape = ["batch", heads, "past_sequence", head_dim]
    present_shape = ["batch", heads, "total_sequence", head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
    ] + [helper.make_tensor_value_info(name, TensorProto.FLOAT, past_shape) for name in past_names(config)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", config.vocab_size])]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, present_shape) for name in present_names(config)]
    onnx_graph = helper.make_graph(graph.nodes, "decoder_with_past", inputs, outputs, graph.initializers)
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", config.opset)],
                              producer_name="qgraph.models.decoder", ir_version=IR_VERSION)
    logger.info("built a %d-layer decoder (hidden %d, %d heads, vocab %d, %s norm, %s positions)", config.num_layers,
                hidden, heads, config.vocab_size, config.norm, config.positions)
    return model


def reference_logits(config: DecoderConfig, weights: Mapping[str, np.ndarray], input_ids: np.ndarray) -> np.ndarray:
    """The decoder's logits on ``input_ids`` (no padding, no past) computed in numpy, float64, from the math above."""
    w = {name: np.asarray(array, np.float64) for name, array in weights.items()}
    input_ids = np.asarray(input_ids)
    batch, sequence = input_ids.shape
    heads, head_dim = config.num_heads, config.head_dim

    def norm(t, prefix):
        if config.norm == "layer":
            mean = t.mean(-1, keepdims=True)
            variance = ((t - mean) ** 2).mean(-1, keepdims=True)
            return (t - mean) / np.sqrt(variance + config.norm_epsilon) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]
        return w[f"{prefix}.weight"] * t / np.sqrt((t * t).mean(-1, keepdims=True) + config.norm_epsilon)

    def linear(t, prefix):
        out = t @ w[f"{prefix}.weight"]
        return out + w[f"{prefix}.bias"] if config.bias else out

    x = w["model.embed_tokens.weight"][input_ids]
    positions = np.arange(sequence)
    if config.positions == "learned":
        x = x + w["model.embed_positions.weight"][positions]
    cos, sin = (table.astype(np.float64)[positions] for table in rotary_tables(config))
    causal = np.tril(np.ones((sequence, sequence), bool))
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}"
        normed = norm(x, f"{prefix}.input_layernorm")
        split = [
            linear(normed, f"{prefix}.self_attn.{p}").reshape(batch, sequence, heads, head_dim).transpose(0, 2, 1, 3)
            for p in ("q_proj", "k_proj", "v_proj")
        ]
        q, k, v = split
        if config.positions == "rotary":
            half = head_dim // 2

            def rope(t, cos=cos, sin=sin, half=half):
                return t * cos + np.concatenate([-t[..., half:], t[..., :half]], -1) * sin

            q, k = rope(q), rope(k)
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
        scores = np.where(causal, scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probabilities = scores / scores.sum(-1, keepdims=True)
        context = (probabilities @ v).transpose(0, 2, 1, 3).reshape(batch, sequence, -1)
        x = x + linear(context, f"{prefix}.self_attn.o_proj")
        normed = norm(x, f"{prefix}.post_attention_layernorm")
        if config.mlp == "gated":
            gate = linear(normed, f"{prefix}.mlp.gate_proj")
            inner = gate / (1.0 + np.exp(-gate)) * linear(normed, f"{prefix}.mlp.up_proj")
            x = x + linear(inner, f"{prefix}.mlp.down_proj")
        else:
            from math import erf

            first = linear(normed, f"{prefix}.mlp.fc_in")
            gelu = 0.5 * first * (1.0 + np.vectorize(erf)(first / math.sqrt(2.0)))
            x = x + linear(gelu, f"{prefix}.mlp.fc_out")
    x = norm(x, "model.norm")
    head = w["model.embed_tokens.weight"].T if config.tie_embeddings else w["lm_head.weight"]
    return x @ head
