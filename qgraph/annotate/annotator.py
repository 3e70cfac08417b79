"""ANNOTATE: decide, for a target, which tensors are quantized and how — and why the rest stays in float.

One walk over the main graph in topological order classifies every node:

- *compute* ops (Conv, ConvTranspose, Gemm, MatMul) with a constant float weight quantize their activation input,
  their weight (per channel on the output axis) and, where the target stores integer biases, their bias; a MatMul of
  two activations quantizes both. Their output is quantized when the target quantizes outputs (ort-cpu, whose
  integer kernels produce integers); a Relu/Clip that alone consumes the output is *fused*: only its output is
  quantized, which is how onnxruntime's QLinearConv absorbs it (zero point 0 saturates negatives).
- *binary* ops (Add, Mul) of two activations quantize both inputs and the output (TensorRT: only the residual input
  of an Add that follows a convolution, the input TensorRT cannot fuse).
- *pass-through* ops (MaxPool, Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Split, Slice, …) quantize their
  output with the input's parameters when the input is already quantized: input and output join one scale group.
  Concat joins all its inputs and its output in one group.
- *own-range* ops (AveragePool, GlobalAveragePool, Sigmoid, HardSigmoid, LeakyRelu, Resize) quantize input and output;
  a Resize in nearest mode copies elements and is a pass-through instead.
- *embedding lookups* (a Gather on axis 0 of a constant float table of at least EMBEDDING_MINIMUM_ROWS rows, a
  vocabulary, where the target quantizes them: ort-cpu) store the table as int8 per row (one scale per token,
  the axis a tied output projection quantizes it on too) behind a DequantizeLinear; the looked-up rows stay float
  (position and token-type embeddings are added to them, and a LayerNorm follows). Lowering dequantizes only the
  rows looked up (:mod:`qgraph.passes.lower.lower_quantized_gather`): a quarter of the table's bytes, the same
  values.
- LayerNormalization and Softmax stay float by default, as do operators without an integer kernel on the target;
  each such node is recorded with the reason.
- An additive attention mask stays float: an Add with a constant operand holding non-finite or huge (|x| >= 1e4)
  values, or an Add whose output only Softmax reads (scores + mask), so -inf/-3.4e38 never enter a range.

Graph outputs stay float: a graph output is never itself annotated; its producer is lowered with a float output.

The walk runs on the main graph and then on every If branch, recursively, and the results merge into one plan
(tensor names are unique across the model; see :mod:`qgraph.ir.subgraphs`). The first/last-layer overrides
apply to the main graph only. Loop/Scan bodies stay FP32.

Recurrent layers (LSTM, GRU, RNN) stay FP32 by default: their gates recur over time, where a static activation range
fits badly. With ``recurrent="dynamic"`` and target ort-cpu an LSTM whose weights are constants is planned for
onnxruntime's com.microsoft DynamicQuantizeLSTM (int8 weights, activations quantized per call inside the kernel;
see :mod:`qgraph.passes.quantize.quantize_lstm_dynamic`); GRU and RNN have no such kernel and stay FP32.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qgraph.ir.subgraphs import LOOP_OPERATORS, loop_reason, quantized_graphs
from qgraph.ir.values import is_constant, sole_consumer
from qgraph.quant.plan import BiasPlan, QuantPlan, WeightPlan, merge_groups

logger = logging.getLogger(__name__)

COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
BINARY_OPS = frozenset({"Add", "Mul"})
PASS_THROUGH_OPS = frozenset(
    {"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Split", "Slice", "Gather", "Identity"}
)
OWN_RANGE_OPS = frozenset({"AveragePool", "GlobalAveragePool", "Sigmoid", "HardSigmoid", "LeakyRelu", "Resize"})
FUSABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})
FLOAT_BY_DEFAULT = {
    "LayerNormalization": "normalisation stays FP32 by default (quantizing it costs accuracy)",
    "Softmax": "Softmax stays FP32 by default (its input holds masks and large logits)",
}
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})
#: A constant Add operand holding a value this large (or a non-finite one) is an additive mask, not a bias.
MASK_MAGNITUDE = 1e4
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
RECURRENT_MODES = ("fp32", "dynamic")
RECURRENT_FP32_REASON = "recurrent layers stay FP32 by default (--quantize-recurrent dynamic quantizes LSTM weights)"
#: --activations: "static" calibrates every activation range; "dynamic" plans each MatMul/Gemm with a constant
#: weight for onnxruntime's dynamically quantized kernels (activations quantized per call, no calibration; see
#: qgraph.passes.quantize.quantize_matmul_dynamic); "auto" does so per layer where the input comes from a node that
#: stays float (LayerNorm, GELU, a bias Add: a static plan would add a QuantizeLinear there anyway) and keeps the
#: static plan where the input is already quantized.
ACTIVATION_MODES = ("static", "dynamic", "auto")
#: A Gather table of fewer rows stays float: position and token-type tables and small vocabularies, nearly all of
#: whose rows are read on every run, so int8 would save little and cost a dequantization of each row read (the
#: trained text encoder's 103- and 64-row tables in int8: 1.5-2% slower at batch 1 and 8, for 0.2 of its 3.6 MB).
EMBEDDING_MINIMUM_ROWS = 1024
#: The axis of an embedding table's per-channel scales: its rows, one scale per token looked up with the row; the
#: axis an output projection tied to the table (Gemm with transB=1) quantizes it on too, so both use one set of codes.
EMBEDDING_AXIS = 0
#: Outputs whose range is known without calibration: Softmax's probabilities lie in [0, 1], so with uint8 they get
#: scale 1/255 and zero point 0 (attention's probabilities · V reads them); the calibrator skips them.
FIXED_RANGE_OPS = {"Softmax": (0.0, 1.0)}


def fixed_ranges(model: ir.Model, plan: QuantPlan) -> dict[str, tuple[float, float]]:
    """The planned activations (and their scale groups) whose range FIXED_RANGE_OPS gives."""
    producers = {value.name: node.op_type for graph in quantized_graphs(model.graph) for node in graph
                 for value in node.outputs}
    fixed: dict[str, tuple[float, float]] = {}
    for tensor in plan.activations:
        if producers.get(tensor) in FIXED_RANGE_OPS and tensor not in plan.activation_overrides:
            for member in plan.group_of(tensor):
                fixed[member] = FIXED_RANGE_OPS[producers[tensor]]
    return fixed


@dataclasses.dataclass(frozen=True)
class AnnotationRules:
    """How a target wants tensors placed; the specs travel with the plan unchanged."""

    target: str
    activation_spec: object
    weight_spec: object
    quantize_outputs: bool
    fuse_activations: bool
    quantize_biases: bool
    residual_add_only: bool
    supported_ops: frozenset[str]
    #: Store embedding tables (Gather of a constant on axis 0) as int8 (see the module docstring).
    quantize_embeddings: bool = False


@dataclasses.dataclass(frozen=True)
class AnnotationOverrides:
    """User choices: node names or op types to keep in float, and whether to spare the first/last layer."""

    exclude: frozenset[str] = frozenset()
    keep_first_fp32: bool = False
    keep_last_fp32: bool = False
    activation_overrides: dict = dataclasses.field(default_factory=dict)
    weight_overrides: dict = dataclasses.field(default_factory=dict)
    #: Calibration method per activation tensor (from --config), instead of --method.
    activation_methods: dict = dataclasses.field(default_factory=dict)


def _is_float_activation(value: ir.Value | None) -> bool:
    if value is None or is_constant(value):
        return False
    return value.dtype in _FLOAT_TYPES or value.dtype is None


def weight_axis(node: ir.Node) -> int:
    """The output-channel axis of a compute node's weight (input 1)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.as_int() == 1 else 1
    weight = node.inputs[1]
    rank = len(weight.shape) if weight is not None and weight.shape is not None else 2
    return rank - 1


def _copies_elements(node: ir.Node) -> bool:
    """A Resize in nearest mode only copies input elements: it shares its input's quantization (a pass-through)."""
    if node.op_type != "Resize":
        return False
    mode = node.attributes.get("mode")
    return mode is None or mode.as_string() == "nearest"


def _is_lookup(node: ir.Node) -> bool:
    return node.op_type == "Gather" and len(node.inputs) >= 2 and node.attributes.get_int("axis", 0) in (0, -2)


def _tied_projection(node: ir.Node, table: ir.Value) -> bool:
    """``node`` is an output projection reading ``table`` as its weight per row (Gemm with transB=1), the axis
    the lookups quantize it on."""
    return (node.op_type == "Gemm" and len(node.inputs) > 1 and node.inputs[1] is table
            and node.inputs[0] is not table and weight_axis(node) == EMBEDDING_AXIS)


def embedding_table(node: ir.Node) -> ir.Value | None:
    """The constant float table that a Gather on axis 0 looks rows up in (None: not an embedding lookup). Its other
    readers must be lookups too, or an output projection tied to it that quantizes it per row as well (a plan holds
    one axis per weight)."""
    if not _is_lookup(node):
        return None
    table = node.inputs[0]
    if any(not (_is_lookup(reader) and reader.inputs[0] is table) and not _tied_projection(reader, table)
           for reader, _ in table.uses()):
        return None
    if not is_constant(table) or table.dtype not in _FLOAT_TYPES or table.shape is None or len(table.shape) != 2:
        return None
    if table.shape[0] is None or not isinstance(table.shape[0], int) or table.shape[0] < EMBEDDING_MINIMUM_ROWS:
        return None
    return table


def _fusable_activation(node: ir.Node, value: ir.Value) -> ir.Node | None:
    """The Relu/Clip that alone consumes ``value`` (and can be absorbed by an integer kernel), if any."""
    activation = sole_consumer(value)
    if activation is None or activation.op_type not in FUSABLE_ACTIVATIONS:
        return None
    if activation.op_type == "Clip":
        bounds = [activation.inputs[index] if len(activation.inputs) > index else None for index in (1, 2)]
        if any(bound is not None and not is_constant(bound) for bound in bounds):
            return None
        lower = bounds[0]
        if lower is None or float(lower.const_value.numpy()) != 0.0:
            return None
    return activation


def _additive_mask_reason(node: ir.Node) -> str | None:
    """Why an Add is an additive attention mask that must stay FP32 (``None`` when it is not one).

    A mask holds -inf, -1e4 or -3.4e38 where attention is cut: as an activation range it would spend every code on
    the sentinel (or, for -inf, be ignored by the observers and then saturate). Two signs identify one: a constant
    operand with a non-finite value or a magnitude of at least MASK_MAGNITUDE, or an output read only by Softmax
    (the scores + mask of attention, whatever computed the mask).
    """
    if node.op_type != "Add":
        return None
    for operand in node.inputs:
        if is_constant(operand) and operand.dtype in _FLOAT_TYPES:
            values = operand.const_value.numpy()
            if values.size and (not np.all(np.isfinite(values)) or np.max(np.abs(values)) >= MASK_MAGNITUDE):
                return (
                    f"additive mask: constant {operand.name!r} holds non-finite or |x| >= {MASK_MAGNITUDE:g} "
                    "values, which must not enter an activation range"
                )
    output = node.outputs[0]
    consumers = list(output.consumers())
    if consumers and not output.is_graph_output() and all(consumer.op_type == "Softmax" for consumer in consumers):
        return "Add feeding only Softmax stays FP32 (scores + attention mask: its output holds the mask's sentinels)"
    return None


def _feeds_bias_add(node: ir.Node) -> bool:
    """A MatMul whose output alone feeds ``Add(·, b)`` with a constant 1-D ``b`` (a projection's bias): its output
    stays float, and lowering writes one MatMulIntegerToFloat that absorbs the Add (faster than QLinearMatMul →
    DequantizeLinear → Add, and one rounding fewer)."""
    if node.op_type != "MatMul":
        return False
    add = sole_consumer(node.outputs[0])
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return False
    other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
    if not (is_constant(other) and other.shape is not None and len(other.shape) == 1):
        return False
    # a Relu/Clip after the bias keeps the quantized-output plan (its range is what the next layer reads)
    return _fusable_activation(add, add.outputs[0]) is None


def _compute_node_indices(graph: ir.Graph) -> list[int]:
    return [index for index, node in enumerate(graph) if node.op_type in COMPUTE_OPS]


def _recurrent_refusal(node: ir.Node, rules: AnnotationRules) -> str | None:
    """Why a recurrent node cannot become DynamicQuantizeLSTM (``None`` when it can)."""
    if node.op_type != "LSTM":
        return (
            f"{node.op_type} stays FP32: onnxruntime has no dynamically quantized {node.op_type} kernel "
            "(--quantize-recurrent dynamic covers LSTM only)"
        )
    if rules.target != "ort-cpu":
        return f"LSTM stays FP32: dynamic LSTM quantization needs target ort-cpu, not {rules.target}"
    weights = [node.inputs[index] if len(node.inputs) > index else None for index in (1, 2)]
    if not all(is_constant(value) and value.dtype == ir.DataType.FLOAT for value in weights):
        return "LSTM stays FP32: its W and R weights are not float32 constants"
    layout = node.attributes.get("layout")
    if layout is not None and layout.as_int() != 0:
        return "LSTM stays FP32: DynamicQuantizeLSTM has no batch-first layout (layout=1)"
    return None


class _Annotator:
    def __init__(
        self, graph: ir.Graph, rules: AnnotationRules, overrides: AnnotationOverrides, recurrent: str = "fp32",
        activation_mode: str = "static",
    ) -> None:
        self.activation_mode = activation_mode
        self.graph = graph
        self.rules = rules
        self.overrides = overrides
        self.recurrent = recurrent
        self.dynamic: list[str] = []
        self.activations: dict[str, None] = {}
        self.weights: list[WeightPlan] = []
        self.biases: list[BiasPlan] = []
        self.pairs: list[tuple[str, str]] = []
        self.quantized: list[str] = []
        self.fp32: dict[str, str] = {}
        self.index_nodes: set[str] = set()
        self.fused: set[int] = set()

    # -- helpers -------------------------------------------------------------------------------------------------
    def annotate(self, value: ir.Value | None) -> None:
        if value is not None and _is_float_activation(value) and not value.is_graph_output():
            self.activations[value.name] = None
        elif value is not None and value.is_graph_output() and not is_constant(value):
            # A graph output consumed inside the graph: its consumers read a quantized copy (see docs).
            if list(value.consumers()):
                self.activations[value.name] = None

    def is_annotated(self, value: ir.Value | None) -> bool:
        return value is not None and value.name in self.activations

    def annotate_output(self, node: ir.Node) -> None:
        if not self.rules.quantize_outputs:
            return
        output = node.outputs[0]
        if self.rules.fuse_activations:
            activation = _fusable_activation(node, output)
            if activation is not None:
                self.fused.add(id(activation))
                self.quantized.append(activation.name)
                self.annotate(activation.outputs[0])
                return
        self.annotate(output)

    def keep_float(self, node: ir.Node, reason: str) -> None:
        self.fp32[node.name] = reason
        if node.outputs and all(output is not None and output.dtype is not None and output.dtype not in _FLOAT_TYPES
                                for output in node.outputs):
            self.index_nodes.add(node.name)  # shapes, indices, masks: no float value to quantize

    # -- classification ------------------------------------------------------------------------------------------
    def run(self) -> None:
        compute_indices = _compute_node_indices(self.graph)
        first = compute_indices[0] if compute_indices and self.overrides.keep_first_fp32 else None
        last = compute_indices[-1] if compute_indices and self.overrides.keep_last_fp32 else None
        for index, node in enumerate(self.graph):
            if id(node) in self.fused:
                continue
            if node.name in self.overrides.exclude or node.op_type in self.overrides.exclude:
                self.keep_float(node, "excluded by the user")
            elif index in (first, last):
                self.keep_float(node, "first/last compute layer kept FP32 by the user")
            elif node.domain not in ("", "ai.onnx"):
                self.keep_float(node, f"operator {node.domain}::{node.op_type} has no integer kernel here")
            elif node.op_type in RECURRENT_OPS:
                self.recurrent_layer(node)
            elif node.op_type == "If":
                self.keep_float(node, "If runs in float; its branches are quantized like the main graph")
            elif node.op_type in LOOP_OPERATORS:
                self.keep_float(node, loop_reason(node))
            elif node.op_type in FLOAT_BY_DEFAULT:
                self.keep_float(node, FLOAT_BY_DEFAULT[node.op_type])
            elif node.op_type not in self.rules.supported_ops:
                self.keep_float(node, f"{node.op_type} has no integer kernel on target {self.rules.target}")
            elif node.op_type in COMPUTE_OPS:
                self.compute(node)
            elif node.op_type in BINARY_OPS:
                self.binary(node)
            elif node.op_type == "Concat":
                self.concat(node)
            elif self.rules.quantize_embeddings and embedding_table(node) is not None:
                self.embedding(node)
            elif node.op_type in PASS_THROUGH_OPS or _copies_elements(node):
                self.pass_through(node)
            elif node.op_type in OWN_RANGE_OPS:
                self.own_range(node)
            else:
                self.keep_float(node, f"{node.op_type} is only quantized when fused into its producer")

    def recurrent_layer(self, node: ir.Node) -> None:
        if self.recurrent != "dynamic":
            self.keep_float(node, RECURRENT_FP32_REASON)
            return
        reason = _recurrent_refusal(node, self.rules)
        if reason is not None:
            self.keep_float(node, reason)
            return
        self.quantized.append(node.name)
        self.dynamic.append(node.name)

    def compute(self, node: ir.Node) -> None:
        data, weight = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
        if not _is_float_activation(data):
            self.keep_float(node, "its data input is not a float activation")
            return
        if node.op_type == "MatMul" and _is_float_activation(weight):
            self.annotate(data)
            self.annotate(weight)
            self.quantized.append(node.name)
            self.annotate_output(node)
            return
        if not is_constant(weight) or weight.dtype not in _FLOAT_TYPES:
            self.keep_float(node, "its weight is not a float constant")
            return
        if self.runs_dynamic(node, data):
            self.quantized.append(node.name)
            self.dynamic.append(node.name)
            return
        if node.op_type == "Gemm":
            trans_a = node.attributes.get("transA")
            if trans_a is not None and trans_a.as_int() == 1:
                self.keep_float(node, "Gemm with transA=1 has no integer kernel")
                return
        self.annotate(data)
        self.weights.append(WeightPlan(weight.name, node.name, weight_axis(node)))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and self.rules.quantize_biases and is_constant(bias):
            if bias.shape is not None and len(bias.shape) == 1:
                self.biases.append(BiasPlan(bias.name, node.name, data.name, weight.name))
        self.quantized.append(node.name)
        if not _feeds_bias_add(node):  # x·W + b read as float: one MatMulIntegerToFloat with the bias
            self.annotate_output(node)

    def runs_dynamic(self, node: ir.Node, data: ir.Value) -> bool:
        """Whether ``node`` (with a constant weight) is planned for the dynamically quantized kernels."""
        if self.activation_mode == "static" or self.rules.target != "ort-cpu":
            return False
        if node.op_type == "Gemm" and node.attributes.get("transA") is not None and node.attributes["transA"].as_int():
            return False
        return self.activation_mode == "dynamic" or not self.is_annotated(data)

    def binary(self, node: ir.Node) -> None:
        mask_reason = _additive_mask_reason(node)
        if mask_reason is not None:
            self.keep_float(node, mask_reason)
            return
        left, right = node.inputs[0], node.inputs[1]
        if not (_is_float_activation(left) and _is_float_activation(right)):
            self.keep_float(node, f"{node.op_type} with a constant operand stays FP32")
            return
        if self.rules.quantize_outputs and not (self.is_annotated(left) and self.is_annotated(right)):
            # e.g. a transformer's residual Add of a projection's float output and a LayerNorm output: a
            # QuantizeLinear for the float input and a DequantizeLinear after QLinearAdd cost as much as the float
            # Add, and one per-tensor scale over the residual stream's outlier channels costs accuracy
            self.keep_float(node, f"{node.op_type} with an input that is not quantized stays FP32")
            return
        if self.rules.residual_add_only:
            if node.op_type != "Add":
                self.keep_float(node, "the target quantizes only residual Adds")
                return
            from_compute = [
                value.producer() is not None and value.producer().op_type in COMPUTE_OPS for value in (left, right)
            ]
            if all(from_compute) or not any(from_compute):
                self.annotate(left)
                self.annotate(right)
            else:
                self.annotate(right if from_compute[0] else left)
            self.quantized.append(node.name)
            return
        self.annotate(left)
        self.annotate(right)
        self.quantized.append(node.name)
        self.annotate_output(node)

    def concat(self, node: ir.Node) -> None:
        inputs = [value for value in node.inputs if value is not None]
        if not all(_is_float_activation(value) for value in inputs):
            self.keep_float(node, "Concat of constants stays FP32")
            return
        if not self.rules.quantize_outputs:
            self.keep_float(node, "the target does not quantize Concat")
            return
        for value in inputs:
            self.annotate(value)
            self.pairs.append((value.name, node.outputs[0].name))
        self.annotate(node.outputs[0])
        self.quantized.append(node.name)

    def pass_through(self, node: ir.Node) -> None:
        data = node.inputs[0]
        if not self.rules.quantize_outputs or not self.is_annotated(data):
            self.keep_float(node, "its input is not quantized, so it runs in float")
            return
        for output in node.outputs:
            if _is_float_activation(output) and not output.is_graph_output():
                self.annotate(output)
                self.pairs.append((data.name, output.name))
        self.quantized.append(node.name)

    def embedding(self, node: ir.Node) -> None:
        """An embedding lookup: the table stored int8 per row; the rows it returns stay float."""
        self.weights.append(WeightPlan(node.inputs[0].name, node.name, EMBEDDING_AXIS))
        self.quantized.append(node.name)

    def own_range(self, node: ir.Node) -> None:
        data = node.inputs[0]
        if not _is_float_activation(data):
            self.keep_float(node, "its input is not a float activation")
            return
        self.annotate(data)
        if self.rules.quantize_outputs:
            self.annotate(node.outputs[0])
        self.quantized.append(node.name)


def annotate(
    model: ir.Model,
    rules: AnnotationRules,
    overrides: AnnotationOverrides | None = None,
    *,
    recurrent: str = "fp32",
    activation_mode: str = "static",
) -> QuantPlan:
    """The quantization plan for ``model``'s main graph and its If branches under ``rules``.

    ``recurrent``: ``"fp32"`` keeps LSTM/GRU/RNN in float; ``"dynamic"`` plans LSTMs for DynamicQuantizeLSTM.
    ``activation_mode``: one of ACTIVATION_MODES (MatMul/Gemm with constant weights planned as ``dynamic_nodes``).
    """
    if activation_mode not in ACTIVATION_MODES:
        raise ValueError(f"activation_mode must be one of {', '.join(ACTIVATION_MODES)}, got {activation_mode!r}")
    if recurrent not in RECURRENT_MODES:
        raise ValueError(f"recurrent must be one of {', '.join(RECURRENT_MODES)}, got {recurrent!r}")
    overrides = overrides or AnnotationOverrides()
    branch_overrides = dataclasses.replace(overrides, keep_first_fp32=False, keep_last_fp32=False)
    activations: dict[str, None] = {}
    weights: list[WeightPlan] = []
    biases: list[BiasPlan] = []
    pairs: list[tuple[str, str]] = []
    quantized: list[str] = []
    fp32: dict[str, str] = {}
    index_nodes: set[str] = set()
    dynamic: list[str] = []
    for graph in quantized_graphs(model.graph):
        annotator = _Annotator(graph, rules, overrides if graph is model.graph else branch_overrides, recurrent,
                               activation_mode)
        annotator.run()
        activations.update(annotator.activations)
        weights += annotator.weights
        biases += annotator.biases
        pairs += annotator.pairs
        quantized += annotator.quantized
        fp32.update(annotator.fp32)
        index_nodes |= annotator.index_nodes
        dynamic += annotator.dynamic
    activation_names = tuple(activations)
    plan = QuantPlan(
        target=rules.target,
        activation_spec=rules.activation_spec,
        weight_spec=rules.weight_spec,
        activations=activation_names,
        weights=tuple(weights),
        biases=tuple(biases),
        groups=merge_groups(pairs, activation_names),
        quantized_nodes=tuple(quantized),
        fp32_nodes=fp32,
        activation_overrides=dict(overrides.activation_overrides),
        weight_overrides=dict(overrides.weight_overrides),
        activation_methods=dict(overrides.activation_methods),
        dynamic_nodes=tuple(dynamic),
        index_nodes=frozenset(index_nodes),
    )
    logger.info(
        "annotated %d activations, %d weights, %d biases; %d nodes quantized (%d dynamically), %d kept FP32",
        len(plan.activations), len(plan.weights), len(plan.biases), len(plan.quantized_nodes), len(dynamic),
        len(plan.fp32_nodes),
    )
    return plan
