"""BERT/MiniLM-style text encoders (Devlin et al., 2019) as torch.onnx writes them, built from numpy weights.

The graph is what ``torch.onnx.export`` writes for a Hugging Face ``BertModel`` in evaluation mode, so that the
quantizer meets the patterns of real exported encoders. Two exporters are modelled (``exporter=``):

``"torchscript"`` (the TorchScript exporter, opset 17, constant folding on):

- **embeddings**: ``Gather(word_embeddings, input_ids)``; position ids are a constant buffer sliced to the sequence
  length (``Shape → Gather(1) → Unsqueeze → Slice(position_ids, 0, length, axis 1)``) and gathered from
  ``position_embeddings``; ``Gather(token_type_embeddings, token_type_ids)``; two Adds, then LayerNorm.
- **LayerNorm** (``layer_norm=``): the opset-17 ``LayerNormalization`` (``"fused"``) or the decomposition older
  opsets get (``"decomposed"``): ``u = ReduceMean(x); d = x − u; v = ReduceMean(Pow(d, 2)); d / Sqrt(v + ε) · γ + β``.
- **additive mask**: ``m = Unsqueeze(Unsqueeze(attention_mask, 1), 2)`` (batch×1×1×S), ``Cast(float)``, then
  ``(1 − m) · c`` with ``c = −3.4028235e38`` (``torch.finfo(float32).min``, today's transformers), ``−10000``
  (older releases) or ``−inf`` (``mask_value=``). The mask input may be int64, int32 or bool (``mask_dtype=``).
- **self-attention** per layer: three projections ``Add(b, MatMul(h, W))`` on the 3-D activation (the exporter puts
  the bias first), head split ``Reshape(batch, S, heads, d)`` with the target shape computed from ``Shape`` →
  ``Gather`` → ``Unsqueeze`` → ``Concat`` (dynamic batch and sequence) and ``Transpose(0, 2, 1, 3)`` (keys
  ``Transpose(0, 2, 3, 1)``), scores ``Div(MatMul(q, kᵀ), √d)``, ``Add(scores, mask)``, ``Softmax(axis=−1)``,
  context ``MatMul(p, v)`` → ``Transpose(0, 2, 1, 3)`` → ``Reshape(batch, S, hidden)`` (the target from the transposed
  context's own ``Shape``, Hugging Face's ``context.size()[:-2] + (all_head_size,)``), output projection, residual
  Add and LayerNorm.
- **feed-forward**: ``MatMul+Add`` to the intermediate size, exact GELU ``Mul(Mul(x, 1 + Erf(x / 1.4142135)), 0.5)``,
  ``MatMul+Add`` back, residual Add, LayerNorm.

``"dynamo"`` (``torch.onnx.export(..., dynamo=True)``, opset 18): LayerNormalization fused; projections
``Add(MatMul(h, W), b)``; static head-split shapes with ``−1`` for the sequence; scaled-dot-product attention
decomposed as the onnxscript library writes it: ``q · √(1/√d)`` and ``kᵀ · √(1/√d)`` (a Mul on each operand instead
of one Div), a boolean mask ``Where(Equal(Expand(mask, batch×1×S×S), 0), −inf, 0)`` added to the scores; GELU
``Mul(0.5 · x, 1 + Erf(x · 0.70710678))``.

Pooling (``pooling=``): the BERT pooler ``Tanh(Gemm(Gather(h, 0, axis=1), Wᵀ, b))`` (output ``pooler_output``),
mask-weighted mean pooling as sentence-transformers writes it ``Σ h·m / max(Σ m, 1e−9)`` (``sentence_embedding``),
or none. ``last_hidden_state`` is always an output. ``head="mlm"`` adds a masked-language-model head whose decoder
reads the word embeddings (tied weights): ``logits = h · Eᵀ + b`` as ``MatMul(h, Transpose(E))``.

Weights are numpy arrays named as in Hugging Face checkpoints (``embeddings.word_embeddings.weight``,
``encoder.layer.{i}.attention.self.query.weight``, …); dense weights are stored in the MatMul orientation
``(in_features, out_features)`` (what the exporter's constant folding writes), biases ``(out_features,)``. See
:func:`weight_shapes`; :func:`random_weights` draws BERT's initialisation ``N(0, 0.02²)`` with zero biases and
LayerNorm γ = 1, β = 0, seeded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
LAYER_NORMS = ("fused", "decomposed")
POOLINGS = ("pooler", "mean", "none")
HEADS = ("none", "mlm")
#: The additive mask constants exporters write: transformers' torch.finfo(float32).min, older -10000, or -inf.
MASK_VALUES = {"min": float(np.finfo(np.float32).min), "large": -10000.0, "-inf": float("-inf")}
MASK_DTYPES = {"int64": TensorProto.INT64, "int32": TensorProto.INT32, "bool": TensorProto.BOOL}
_OPSETS = {"torchscript": 17, "dynamo": 18}
BATCH_DIMENSION = "batch"
SEQUENCE_DIMENSION = "sequence"


@dataclasses.dataclass(frozen=True)
class BertLayout:
    """The encoder's sizes; ``max_positions`` bounds the sequence length."""

    layers: int = 12
    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    vocabulary: int = 30522
    max_positions: int = 512
    token_types: int = 2
    epsilon: float = 1e-12

    def __post_init__(self) -> None:
        if min(self.layers, self.hidden, self.heads, self.intermediate, self.vocabulary, self.max_positions,
               self.token_types) < 1:
            raise ValueError(f"every size of a BERT layout must be positive: {self}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads


#: BERT-base (110 M parameters) and the MiniLM-L6 sentence encoder shape (hidden 384, 12 heads).
BERT_LAYOUTS = {
    "bert_base": BertLayout(),
    "minilm_l6": BertLayout(layers=6, hidden=384, heads=12, intermediate=1536),
    "tiny": BertLayout(layers=2, hidden=64, heads=4, intermediate=128, vocabulary=256, max_positions=64),
}


@dataclasses.dataclass(frozen=True)
class BertOptions:
    """How the graph is spelled (which exporter, which LayerNorm, mask and pooling)."""

    exporter: str = "torchscript"
    layer_norm: str = "fused"
    mask_value: str = "min"
    mask_dtype: str = "int64"
    pooling: str = "pooler"
    head: str = "none"
    #: A fixed sequence length instead of the symbolic ``sequence`` dimension.
    sequence: int | None = None

    def __post_init__(self) -> None:
        for field, choices in (("exporter", EXPORTERS), ("layer_norm", LAYER_NORMS), ("mask_value", MASK_VALUES),
                               ("mask_dtype", MASK_DTYPES), ("pooling", POOLINGS), ("head", HEADS)):
            if getattr(self, field) not in choices:
                raise ValueError(f"{field} must be one of {', '.join(choices)}, got {getattr(self, field)!r}")
        if self.exporter == "dynamo" and self.layer_norm != "fused":
            raise ValueError("the dynamo exporter writes LayerNormalization fused")


def weight_shapes(layout: BertLayout, *, pooling: str = "pooler", head: str = "none") -> dict[str, tuple[int, ...]]:
    """Name → shape of every weight the builder reads (dense weights as (in_features, out_features))."""
    hidden, intermediate = layout.hidden, layout.intermediate
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (layout.vocabulary, hidden),
        "embeddings.position_embeddings.weight": (layout.max_positions, hidden),
        "embeddings.token_type_embeddings.weight": (layout.token_types, hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
    }
    dense = {"attention.self.query": (hidden, hidden), "attention.self.key": (hidden, hidden),
             "attention.self.value": (hidden, hidden), "attention.output.dense": (hidden, hidden),
             "intermediate.dense": (hidden, intermediate), "output.dense": (intermediate, hidden)}
    for layer in range(layout.layers):
        prefix = f"encoder.layer.{layer}"
        for name, shape in dense.items():
            shapes[f"{prefix}.{name}.weight"] = shape
            shapes[f"{prefix}.{name}.bias"] = (shape[1],)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{prefix}.{norm}.weight"] = (hidden,)
            shapes[f"{prefix}.{norm}.bias"] = (hidden,)
    if pooling == "pooler":
        shapes["pooler.dense.weight"] = (hidden, hidden)
        shapes["pooler.dense.bias"] = (hidden,)
    if head == "mlm":
        shapes["cls.predictions.transform.dense.weight"] = (hidden, hidden)
        shapes["cls.predictions.transform.dense.bias"] = (hidden,)
        shapes["cls.predictions.transform.LayerNorm.weight"] = (hidden,)
        shapes["cls.predictions.transform.LayerNorm.bias"] = (hidden,)
        shapes["cls.predictions.bias"] = (layout.vocabulary,)
    return shapes


def random_weights(layout: BertLayout, *, seed: int = 0, pooling: str = "pooler",
                   head: str = "none") -> dict[str, np.ndarray]:
    """BERT's initialisation, seeded: matrices ``N(0, 0.02²)``, biases and β zero, γ one."""
    generator = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(layout, pooling=pooling, head=head).items():
        if name.endswith("LayerNorm.weight"):
            weights[name] = np.ones(shape, np.float32)
        elif len(shape) == 1:
            weights[name] = np.zeros(shape, np.float32)
        else:
            weights[name] = (generator.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    return weights


class _Writer:
    """Nodes and initializers of one graph, named the way the exporter names them (``/path/Op`` style)."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.counts: dict[str, int] = {}

    def weight(self, name: str) -> str:
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.asarray(self.weights[name], np.float32), name)
        return name

    def constant(self, value, dtype=np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        name = f"onnx::Constant_{len(self.initializers)}"
        self.initializers[name] = numpy_helper.from_array(array, name)
        return name

    def node(self, op_type: str, inputs: list[str], scope: str, outputs: int = 1, **attributes) -> str | list[str]:
        key = f"{scope}/{op_type}"
        count = self.counts.get(key, 0)
        self.counts[key] = count + 1
        name = key if count == 0 else f"{key}_{count}"
        names = [f"{name}_output_{index}" for index in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, **attributes))
        return names[0] if outputs == 1 else names


class _Encoder:
    def __init__(self, layout: BertLayout, options: BertOptions, writer: _Writer) -> None:
        self.layout = layout
        self.options = options
        self.w = writer
        self.dynamo = options.exporter == "dynamo"

    # -- pieces --------------------------------------------------------------------------------------------------
    def layer_norm(self, x: str, prefix: str, scope: str) -> str:
        gamma, beta = self.w.weight(f"{prefix}.weight"), self.w.weight(f"{prefix}.bias")
        if self.options.layer_norm == "fused":
            return self.w.node("LayerNormalization", [x, gamma, beta], scope, axis=-1, epsilon=self.layout.epsilon)
        mean = self.w.node("ReduceMean", [x], scope, axes=[-1], keepdims=1)
        centred = self.w.node("Sub", [x, mean], scope)
        square = self.w.node("Pow", [centred, self.w.constant(2.0)], scope)
        variance = self.w.node("ReduceMean", [square], scope, axes=[-1], keepdims=1)
        shifted = self.w.node("Add", [variance, self.w.constant(self.layout.epsilon)], scope)
        deviation = self.w.node("Sqrt", [shifted], scope)
        normalised = self.w.node("Div", [centred, deviation], scope)
        scaled = self.w.node("Mul", [normalised, gamma], scope)
        return self.w.node("Add", [scaled, beta], scope)

    def linear(self, x: str, prefix: str, scope: str) -> str:
        product = self.w.node("MatMul", [x, self.w.weight(f"{prefix}.weight")], scope)
        bias = self.w.weight(f"{prefix}.bias")
        return self.w.node("Add", [product, bias] if self.dynamo else [bias, product], scope)

    def gelu(self, x: str, scope: str) -> str:
        if self.dynamo:
            inner = self.w.node("Mul", [x, self.w.constant(1.0 / math.sqrt(2.0))], scope)
            erf = self.w.node("Erf", [inner], scope)
            one_plus = self.w.node("Add", [erf, self.w.constant(1.0)], scope)
            half = self.w.node("Mul", [x, self.w.constant(0.5)], scope)
            return self.w.node("Mul", [half, one_plus], scope)
        inner = self.w.node("Div", [x, self.w.constant(1.4142135381698608)], scope)
        erf = self.w.node("Erf", [inner], scope)
        one_plus = self.w.node("Add", [erf, self.w.constant(1.0)], scope)
        product = self.w.node("Mul", [x, one_plus], scope)
        return self.w.node("Mul", [product, self.w.constant(0.5)], scope)

    def dimension(self, x: str, axis: int, scope: str) -> str:
        """``Unsqueeze(Gather(Shape(x), axis), 0)``: one dimension as a 1-element int64 tensor."""
        shape = self.w.node("Shape", [x], scope)
        value = self.w.node("Gather", [shape, self.w.constant(axis, np.int64)], scope, axis=0)
        return self.w.node("Unsqueeze", [value, self.w.constant([0], np.int64)], scope)

    def split_heads(self, x: str, scope: str, perm: list[int]) -> str:
        heads, size = self.layout.heads, self.layout.head_size
        if self.dynamo:
            shape = self.w.constant([0, -1, heads, size], np.int64) if self.options.sequence is None else \
                self.w.constant([0, self.options.sequence, heads, size], np.int64)
        else:
            shape = self.w.node("Concat", [self.dimension(x, 0, scope), self.dimension(x, 1, scope),
                                           self.w.constant([heads], np.int64), self.w.constant([size], np.int64)],
                                scope, axis=0)
        reshaped = self.w.node("Reshape", [x, shape], scope)
        return self.w.node("Transpose", [reshaped], scope, perm=perm)

    def merge_heads(self, context: str, scope: str) -> str:
        transposed = self.w.node("Transpose", [context], scope, perm=[0, 2, 1, 3])
        if self.dynamo:
            shape = self.w.constant([0, -1, self.layout.hidden], np.int64)
        else:
            # Hugging Face's ``context.size()[:-2] + (all_head_size,)``: the sizes of the transposed context itself
            shape = self.w.node("Concat", [self.dimension(transposed, 0, scope), self.dimension(transposed, 1, scope),
                                           self.w.constant([self.layout.hidden], np.int64)], scope, axis=0)
        return self.w.node("Reshape", [transposed, shape], scope)

    # -- blocks --------------------------------------------------------------------------------------------------
    def embeddings(self) -> str:
        scope = "/embeddings"
        words = self.w.node("Gather", [self.w.weight("embeddings.word_embeddings.weight"), "input_ids"], scope)
        length = self.dimension("input_ids", 1, scope)
        position_ids = self.w.constant(np.arange(self.layout.max_positions, dtype=np.int64)[None, :], np.int64)
        positions = self.w.node("Slice", [position_ids, self.w.constant([0], np.int64), length,
                                          self.w.constant([1], np.int64)], scope)
        position_vectors = self.w.node("Gather", [self.w.weight("embeddings.position_embeddings.weight"), positions],
                                       scope)
        types = self.w.node("Gather", [self.w.weight("embeddings.token_type_embeddings.weight"), "token_type_ids"],
                            scope)
        summed = self.w.node("Add", [words, types], scope)
        summed = self.w.node("Add", [summed, position_vectors], scope)
        return self.layer_norm(summed, "embeddings.LayerNorm", f"{scope}/LayerNorm")

    def additive_mask(self) -> str:
        scope = "/get_extended_attention_mask"
        value = MASK_VALUES[self.options.mask_value]
        if self.dynamo:
            expanded = self.w.node("Unsqueeze", ["attention_mask", self.w.constant([1, 2], np.int64)], scope)
            batch = self.dimension("attention_mask", 0, scope)
            length = self.dimension("attention_mask", 1, scope)
            target = self.w.node("Concat", [batch, self.w.constant([1], np.int64), length, length], scope, axis=0)
            expanded = self.w.node("Expand", [expanded, target], scope)
            zero = self.w.constant(0, np.bool_ if self.options.mask_dtype == "bool" else
                                   {"int64": np.int64, "int32": np.int32}[self.options.mask_dtype])
            cut = self.w.node("Equal", [expanded, zero], scope)
            return self.w.node("Where", [cut, self.w.constant(float("-inf")), self.w.constant(0.0)], scope)
        unsqueezed = self.w.node("Unsqueeze", ["attention_mask", self.w.constant([1], np.int64)], scope)
        unsqueezed = self.w.node("Unsqueeze", [unsqueezed, self.w.constant([2], np.int64)], scope)
        as_float = self.w.node("Cast", [unsqueezed], scope, to=TensorProto.FLOAT)
        inverted = self.w.node("Sub", [self.w.constant(1.0), as_float], scope)
        if math.isinf(value):
            # (1 - m) * -inf would be 0 * -inf = NaN where m = 1; the exporter writes masked_fill for -inf.
            cut = self.w.node("Cast", [inverted], scope, to=TensorProto.BOOL)
            return self.w.node("Where", [cut, self.w.constant(value), self.w.constant(0.0)], scope)
        return self.w.node("Mul", [inverted, self.w.constant(value)], scope)

    def attention(self, x: str, mask: str, layer: int) -> str:
        prefix, scope = f"encoder.layer.{layer}.attention", f"/encoder/layer.{layer}/attention"
        query = self.linear(x, f"{prefix}.self.query", f"{scope}/self/query")
        key = self.linear(x, f"{prefix}.self.key", f"{scope}/self/key")
        value = self.linear(x, f"{prefix}.self.value", f"{scope}/self/value")
        self_scope = f"{scope}/self"
        query = self.split_heads(query, self_scope, [0, 2, 1, 3])
        key = self.split_heads(key, self_scope, [0, 2, 3, 1])
        value = self.split_heads(value, self_scope, [0, 2, 1, 3])
        if self.dynamo:
            factor = self.w.constant(math.sqrt(1.0 / math.sqrt(self.layout.head_size)))
            query = self.w.node("Mul", [query, factor], self_scope)
            key = self.w.node("Mul", [key, factor], self_scope)
            scores = self.w.node("MatMul", [query, key], self_scope)
        else:
            scores = self.w.node("MatMul", [query, key], self_scope)
            scores = self.w.node("Div", [scores, self.w.constant(math.sqrt(self.layout.head_size))], self_scope)
        scores = self.w.node("Add", [scores, mask], self_scope)
        probabilities = self.w.node("Softmax", [scores], self_scope, axis=-1)
        context = self.w.node("MatMul", [probabilities, value], self_scope)
        context = self.merge_heads(context, self_scope)
        output = self.linear(context, f"{prefix}.output.dense", f"{scope}/output/dense")
        output = self.w.node("Add", [output, x], f"{scope}/output")
        return self.layer_norm(output, f"{prefix}.output.LayerNorm", f"{scope}/output/LayerNorm")

    def feed_forward(self, x: str, layer: int) -> str:
        prefix, scope = f"encoder.layer.{layer}", f"/encoder/layer.{layer}"
        hidden = self.linear(x, f"{prefix}.intermediate.dense", f"{scope}/intermediate/dense")
        hidden = self.gelu(hidden, f"{scope}/intermediate/intermediate_act_fn")
        output = self.linear(hidden, f"{prefix}.output.dense", f"{scope}/output/dense")
        output = self.w.node("Add", [output, x], f"{scope}/output")
        return self.layer_norm(output, f"{prefix}.output.LayerNorm", f"{scope}/output/LayerNorm")

    def pooler(self, x: str) -> str:
        first = self.w.node("Gather", [x, self.w.constant(0, np.int64)], "/pooler", axis=1)
        weight = np.ascontiguousarray(np.asarray(self.w.weights["pooler.dense.weight"], np.float32).T)
        self.w.initializers["pooler.dense.weight"] = numpy_helper.from_array(weight, "pooler.dense.weight")
        dense = self.w.node("Gemm", [first, "pooler.dense.weight", self.w.weight("pooler.dense.bias")], "/pooler/dense",
                            alpha=1.0, beta=1.0, transB=1)
        return self.w.node("Tanh", [dense], "/pooler/activation")

    def mean_pool(self, x: str) -> str:
        scope = "/pooling"
        mask = self.w.node("Unsqueeze", ["attention_mask", self.w.constant([-1], np.int64)], scope)
        mask = self.w.node("Cast", [mask], scope, to=TensorProto.FLOAT)
        mask = self.w.node("Expand", [mask, self.w.node("Shape", [x], scope)], scope)
        total = self.w.node("ReduceSum", [self.w.node("Mul", [x, mask], scope), self.w.constant([1], np.int64)],
                            scope, keepdims=0)
        count = self.w.node("ReduceSum", [mask, self.w.constant([1], np.int64)], scope, keepdims=0)
        count = self.w.node("Clip", [count, self.w.constant(1e-9)], scope)
        return self.w.node("Div", [total, count], scope)

    def mlm_head(self, x: str) -> str:
        scope = "/cls/predictions"
        transform = self.linear(x, "cls.predictions.transform.dense", f"{scope}/transform/dense")
        transform = self.gelu(transform, f"{scope}/transform/transform_act_fn")
        transform = self.layer_norm(transform, "cls.predictions.transform.LayerNorm", f"{scope}/transform/LayerNorm")
        # The decoder is tied to the word embeddings: it reads the same initializer through a Transpose.
        decoder = self.w.node("Transpose", [self.w.weight("embeddings.word_embeddings.weight")], f"{scope}/decoder",
                              perm=[1, 0])
        product = self.w.node("MatMul", [transform, decoder], f"{scope}/decoder")
        return self.w.node("Add", [product, self.w.weight("cls.predictions.bias")], f"{scope}/decoder")


def _rename_output(nodes: list[onnx.NodeProto], old: str, new: str) -> None:
    for node in nodes:
        for index, name in enumerate(node.output):
            if name == old:
                node.output[index] = new
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def build_bert(
    layout: str | BertLayout = "bert_base",
    weights: Mapping[str, np.ndarray] | None = None,
    options: BertOptions | None = None,
    *,
    seed: int = 0,
) -> onnx.ModelProto:
    """The encoder as an ONNX model with inputs ``input_ids``, ``attention_mask``, ``token_type_ids``.

    ``weights`` maps the names of :func:`weight_shapes` to arrays (``None``: :func:`random_weights` with ``seed``).
    Outputs: ``last_hidden_state`` (batch×S×hidden), then ``pooler_output`` or ``sentence_embedding``
    (batch×hidden) as ``options.pooling`` asks, then ``logits`` (batch×S×vocabulary) with ``head="mlm"``.
    """
    if isinstance(layout, str):
        if layout not in BERT_LAYOUTS:
            raise ValueError(f"unknown BERT layout {layout!r}; choose from {sorted(BERT_LAYOUTS)}")
        layout = BERT_LAYOUTS[layout]
    options = options or BertOptions()
    if weights is None:
        weights = random_weights(layout, seed=seed, pooling=options.pooling, head=options.head)
    expected = weight_shapes(layout, pooling=options.pooling, head=options.head)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"weights missing for {len(missing)} tensors, e.g. {missing[0]!r}")
    for name, shape in expected.items():
        if tuple(np.shape(weights[name])) != shape:
            raise ValueError(f"weight {name!r} has shape {tuple(np.shape(weights[name]))}, expected {shape}")
    if options.sequence is not None and not 1 <= options.sequence <= layout.max_positions:
        raise ValueError(f"sequence {options.sequence} is outside 1..{layout.max_positions}")

    writer = _Writer(weights)
    encoder = _Encoder(layout, options, writer)
    hidden = encoder.embeddings()
    mask = encoder.additive_mask()
    for layer in range(layout.layers):
        hidden = encoder.attention(hidden, mask, layer)
        hidden = encoder.feed_forward(hidden, layer)
    sequence = options.sequence if options.sequence is not None else SEQUENCE_DIMENSION
    outputs = []
    last = hidden
    if options.pooling == "pooler":
        pooled = encoder.pooler(hidden)
        outputs.append(helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT,
                                                     [BATCH_DIMENSION, layout.hidden]))
        _rename_output(writer.nodes, pooled, "pooler_output")
    elif options.pooling == "mean":
        pooled = encoder.mean_pool(hidden)
        outputs.append(helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT,
                                                     [BATCH_DIMENSION, layout.hidden]))
        _rename_output(writer.nodes, pooled, "sentence_embedding")
    if options.head == "mlm":
        logits = encoder.mlm_head(hidden)
        _rename_output(writer.nodes, logits, "logits")
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                     [BATCH_DIMENSION, sequence, layout.vocabulary]))
    _rename_output(writer.nodes, last, "last_hidden_state")
    outputs.insert(0, helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                                    [BATCH_DIMENSION, sequence, layout.hidden]))
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [BATCH_DIMENSION, sequence]),
        helper.make_tensor_value_info("attention_mask", MASK_DTYPES[options.mask_dtype], [BATCH_DIMENSION, sequence]),
        helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, [BATCH_DIMENSION, sequence]),
    ]
    graph = helper.make_graph(
        writer.nodes, "main_graph", inputs, outputs, initializer=list(writer.initializers.values())
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSETS[options.exporter])],
                              producer_name="pytorch", producer_version="2.4.0", ir_version=8)
    logger.debug("built a %d-layer BERT encoder (%s exporter): %d nodes", layout.layers, options.exporter,
                 len(writer.nodes))
    return model


def example_inputs(layout: BertLayout, batch: int, sequence: int, *, seed: int = 0, padded: bool = True,
                   mask_dtype: str = "int64") -> dict[str, np.ndarray]:
    """Seeded token ids, token types (two segments) and an attention mask; ``padded`` cuts each row's tail at a
    random length (the first row stays full)."""
    generator = np.random.default_rng(seed)
    input_ids = generator.integers(0, layout.vocabulary, (batch, sequence), dtype=np.int64)
    token_type_ids = np.zeros((batch, sequence), np.int64)
    token_type_ids[:, sequence // 2:] = 1
    mask = np.ones((batch, sequence), np.int64)
    if padded:
        for row in range(1, batch):
            mask[row, generator.integers(1, sequence + 1):] = 0
    dtype = {"int64": np.int64, "int32": np.int32, "bool": np.bool_}[mask_dtype]
    return {"input_ids": input_ids, "attention_mask": mask.astype(dtype), "token_type_ids": token_type_ids}
