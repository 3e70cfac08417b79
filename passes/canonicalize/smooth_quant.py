"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before quantization.

For a MatMul ``Y = X · W`` (``X``: ``[..., K]``, constant ``W``: ``[K, N]``) and any positive ``s ∈ ℝᴷ``::

    Y = (X · diag(s)⁻¹) · (diag(s) · W)        i.e.   X'_j = X_j / s_j,   W'[j, :] = s_j · W[j, :]

is exact in real arithmetic. A few input channels ``j`` with ``max|X_j|`` 50–100× the others make one per-tensor
activation scale useless for the rest; with

    s_j = max|X_j|^α / max|W_j|^(1−α)                                       (α ∈ [0, 1], the migration strength)

the activation's channel maxima become ``max|X_j|^(1−α) · max|W_j|^(1−α)`` and the weight's rows
``max|X_j|^α · max|W_j|^α``: the difficulty is shared. ``max|X_j|`` comes from calibration (a per-channel abs-max
observer, :mod:`qgraph.calibrate.observers.channel_abs_max`) and is given to the pass as ``statistics`` (tensor
name → ``[K]``); ``max|W_j|`` is taken over row ``j`` of every weight reading ``X``.

Every reader of ``X`` must be a MatMul (constant 2-D float weight) or a Gemm (``transA = 0``, constant ``B``; with
``transB = 1`` the *columns* of ``B`` scale) — the readers share ``s`` (attention's query, key and value read one
LayerNorm output). ``1/s`` is then folded into ``X``'s producer, exactly:

- ``LayerNormalization`` with constant γ, β (and normalised over the last axis only): γ' = γ / s, β' = β / s;
- a bias ``Add(MatMul(h, V), b)`` with constant ``V`` ``[·, K]`` and ``b`` ``[K]``, whose MatMul output only the Add
  reads: ``V'[:, j] = V[:, j] / s_j``, ``b' = b / s``; likewise a lone ``MatMul(h, V)``;

and when ``X`` has another reader (BERT's post-norm LayerNorm output also feeds the residual Add) or a producer
that cannot absorb it (GELU), an explicit ``Mul(X, 1/s)`` is inserted in front of the MatMul readers only.

Only inputs with outlier channels are smoothed: ``max_j a_j ≥ outlier_ratio · median_j a_j`` (default 4). ``s``
is clamped to ``[1e-5, 1e5]``; a channel whose activation or weight maximum is 0 keeps ``s_j = 1``. The pass records
each tensor it smoothed (``qgraph.smooth_quant`` in the model's metadata) and never smooths one twice, so a second
run with the same statistics changes nothing.

Refused (logged, nothing changes): a reader that is not such a MatMul/Gemm, a weight that is not a float32
constant, statistics of the wrong length, a shared weight (read by another node too).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult

from qgraph.ir.edit import drop_unused_initializers, new_initializer
from qgraph.ir.naming import NameScope
from qgraph.ir.values import constant_array, is_op, sole_consumer
from qgraph.passes.infrastructure import Phase, QGraphPass, register

logger = logging.getLogger(__name__)

DEFAULT_OUTLIER_RATIO = 4.0
_SCALE_LIMITS = (1e-5, 1e5)
_METADATA_KEY = "qgraph.smooth_quant"


@dataclasses.dataclass(frozen=True)
class _Reader:
    node: ir.Node
    weight: ir.Value
    #: True when the weight's input channels are its columns (Gemm with transB = 1).
    transposed: bool


def _reader(node: ir.Node, value: ir.Value) -> _Reader | str:
    if not is_op(node, "MatMul", "Gemm") or node.inputs[0] is not value:
        return f"{node.op_type} {node.name!r} reads it (not as the data input of a MatMul/Gemm)"
    weight = node.inputs[1]
    array = constant_array(weight)
    if array is None or array.dtype != np.float32 or array.ndim != 2:
        return f"{node.name!r} has no 2-D float32 constant weight"
    if len(weight.uses()) != 1:
        return f"the weight of {node.name!r} is shared with another node"
    if is_op(node, "Gemm") and node.attributes.get_int("transA", 0):
        return f"Gemm {node.name!r} has transA=1"
    return _Reader(node, weight, bool(is_op(node, "Gemm") and node.attributes.get_int("transB", 0)))


def smoothing_scales(activation_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = a_j^α / w_j^(1−α)``, 1 where either maximum is 0, clamped to [1e-5, 1e5]."""
    activation_max = np.asarray(activation_max, np.float64)
    weight_max = np.asarray(weight_max, np.float64)
    valid = (activation_max > 0) & (weight_max > 0)
    scales = np.ones_like(activation_max)
    scales[valid] = activation_max[valid] ** alpha / weight_max[valid] ** (1.0 - alpha)
    return np.clip(scales, *_SCALE_LIMITS)


def has_outliers(activation_max: np.ndarray, outlier_ratio: float) -> bool:
    """``max_j a_j ≥ outlier_ratio · median_j a_j``."""
    median = float(np.median(activation_max))
    return float(np.max(activation_max)) >= outlier_ratio * median if median > 0 else bool(np.max(activation_max) > 0)


def _replace_constant(graph: ir.Graph, names: NameScope, node: ir.Node, index: int, array: np.ndarray) -> None:
    old = node.inputs[index]
    node.replace_input_with(index, new_initializer(graph, names, old.name, array.astype(np.float32)))
    drop_unused_initializers([old])


@register
class SmoothQuant(QGraphPass):
    """Scale outlier activation channels down and the MatMul/Gemm weight rows up by the SmoothQuant factors."""

    phase = Phase.CANONICALIZE
    summary = "SmoothQuant: s = max|X|^α / max|W|^(1−α) per input channel, 1/s folded into the producer"

    def __init__(self, *, alpha: float = 0.5, statistics: Mapping[str, np.ndarray] | None = None,
                 outlier_ratio: float = DEFAULT_OUTLIER_RATIO) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.alpha = alpha
        self.statistics = dict(statistics or {})
        self.outlier_ratio = outlier_ratio

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        names = NameScope(model)
        done = set(filter(None, model.meta.get(_METADATA_KEY, "").split("\n")))
        values = {value.name: value for node in graph for value in node.outputs}
        values.update({value.name: value for value in graph.inputs})
        smoothed = []
        for tensor, activation_max in self.statistics.items():
            value = values.get(tensor)
            if value is None or tensor in done:
                continue
            reason = self._smooth(graph, names, value, np.asarray(activation_max, np.float64))
            if reason is None:
                smoothed.append(tensor)
            else:
                logger.debug("%s: %s not smoothed: %s", self.pass_name(), tensor, reason)
        if smoothed:
            model.meta[_METADATA_KEY] = "\n".join(sorted(done | set(smoothed)))
            logger.info("%s: smoothed %d activation(s) with alpha %.2f", self.pass_name(), len(smoothed), self.alpha)
        return PassResult(model, bool(smoothed))

    def _smooth(self, graph: ir.Graph, names: NameScope, value: ir.Value, activation_max: np.ndarray) -> str | None:
        uses = [node for node, _ in value.uses()]
        readers, others = [], []
        for node in dict.fromkeys(uses):
            found = _reader(node, value)
            (readers if isinstance(found, _Reader) else others).append(found)
        if not readers:
            return others[0] if others else "nothing reads it"
        channels = activation_max.size
        for reader in readers:
            weight = reader.weight.const_value.numpy()
            rows = weight.shape[1] if reader.transposed else weight.shape[0]
            if rows != channels:
                return f"statistics have {channels} channels, the weight of {reader.node.name!r} {rows}"
        if not has_outliers(activation_max, self.outlier_ratio):
            return "no outlier channels"
        weight_max = np.max([np.abs(r.weight.const_value.numpy()).max(axis=0 if r.transposed else 1) for r in readers],
                            axis=0)
        scales = smoothing_scales(activation_max, weight_max, self.alpha)
        for reader in readers:
            weight = reader.weight.const_value.numpy().astype(np.float64)
            scaled = weight * (scales[None, :] if reader.transposed else scales[:, None])
            _replace_constant(graph, names, reader.node, 1, scaled)
        inverse = 1.0 / scales
        if others or value.is_graph_output() or not self._fold_into_producer(graph, names, value, inverse):
            mul = ir.node("Mul", [value, new_initializer(graph, names, f"{value.name}_smooth_scale",
                                                         inverse.astype(np.float32))],
                          name=names.fresh(f"{value.name}_smooth"))
            mul.outputs[0].name = names.fresh(f"{value.name}_smoothed")
            mul.outputs[0].type, mul.outputs[0].shape = value.type, value.shape
            graph.insert_before(readers[0].node, mul)
            for reader in readers:
                reader.node.replace_input_with(0, mul.outputs[0])
        return None

    def _fold_into_producer(self, graph: ir.Graph, names: NameScope, value: ir.Value, inverse: np.ndarray) -> bool:
        """Divide ``value``'s producer's output channels by ``s`` (``inverse`` = 1/s); False when it cannot."""
        producer = value.producer()
        if is_op(producer, "LayerNormalization"):
            axis = producer.attributes.get_int("axis", -1)
            rank = len(value.shape) if value.shape is not None else None
            gamma = constant_array(producer.inputs[1])
            beta = constant_array(producer.inputs[2]) if len(producer.inputs) > 2 else None
            last = axis == -1 or (rank is not None and axis == rank - 1)
            if not last or gamma is None or gamma.shape != inverse.shape or len(producer.outputs) > 1 and any(
                    output.uses() for output in producer.outputs[1:]):
                return False
            if beta is not None and beta.shape != inverse.shape or len(producer.inputs[1].uses()) != 1:
                return False
            _replace_constant(graph, names, producer, 1, gamma * inverse)
            if beta is not None:
                _replace_constant(graph, names, producer, 2, beta * inverse)
            return True
        matmul, add, bias_index = producer, None, None
        if is_op(producer, "Add"):
            for index in (0, 1):
                bias = constant_array(producer.inputs[index])
                other = producer.inputs[1 - index]
                if bias is not None and bias.shape == inverse.shape and is_op(other.producer(), "MatMul"):
                    add, bias_index, matmul = producer, index, other.producer()
                    break
            if add is None or sole_consumer(matmul.outputs[0]) is not add:
                return False
        if not is_op(matmul, "MatMul"):
            return False
        weight = constant_array(matmul.inputs[1])
        if weight is None or weight.ndim != 2 or weight.shape[1] != inverse.size or len(matmul.inputs[1].uses()) != 1:
            return False
        if add is not None and len(add.inputs[bias_index].uses()) != 1:
            return False
        _replace_constant(graph, names, matmul, 1, weight * inverse[None, :])
        if add is not None:
            _replace_constant(graph, names, add, bias_index, constant_array(add.inputs[bias_index]) * inverse)
        return True
