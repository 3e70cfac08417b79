"""FoldBatchNorm: fold an inference BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it.

An inference BatchNormalization is, per channel c of axis 1 (all arithmetic in float64)::

    y = gamma[c] * (x - mean[c]) / sqrt(var[c] + epsilon) + beta[c] = s[c] * x + t[c]
    s = gamma / sqrt(var + epsilon),    t = beta - mean * s

When x = W ⊛ a + b is linear in a per-output-channel weight W, the BatchNorm disappears into it::

    W' = W * s   (each output channel's slice scaled by its s[c])
    b' = (b - mean) * s + beta = b * s + t        (b = 0 when the producer had no bias)

Where "the output-channel slice" lies, per producer:

- Conv, weight (C_out, C_in/group, k...): ``W'[c] = W[c] * s[c]`` (axis 0, whatever the group count);
- ConvTranspose, weight (C_in, C_out/group, k...): row i belongs to group ``g = i // (C_in/group)`` and column j is
  output channel ``g * (C_out/group) + j``, so ``W'[i, j] = W[i, j] * s[g * (C_out/group) + j]`` — the weight is
  viewed as (group, C_in/group, C_out/group, k...) and multiplied by s viewed as (group, 1, C_out/group, 1...);
- Gemm ``Y = alpha * op(A) op(B) + beta * C``: the channel is column n of op(B), so B's columns (``transB=0``) or
  rows (``transB=1``) are scaled; ``C' = beta * C * s + t`` (broadcast against (N,)) and the new beta is 1;
- MatMul ``Y = A W`` with a 2-D constant W (K, N) on a 2-D A, with an optional ``Add(·, b)`` of a constant
  per-feature bias: ``W'[:, n] = W[:, n] * s[n]`` and ``Add(A W', b * s + t)`` (bias shape kept: (N,) or (1, N)).

New weights are computed in float64 and stored in the original element type, always as *new* initializers: a
weight shared with another node keeps its original values for that node (the fold duplicates it), and one that
only this producer read is dropped. A BatchNorm is refused (logged, graph unchanged) when it is in training mode
(``training_mode=1`` or extra statistics outputs), its parameters or the producer's weights are not constants
(graph inputs count as non-constant), the producer's output has another reader or is a graph output, the element
type is not float/double/float16, or — for MatMul — the input is not 2-D, because then BatchNormalization's channel
axis 1 is not the MatMul's output-feature axis. :mod:`qgraph.passes.canonicalize._batch_norm_math` holds that predicate,
which DecomposeBatchNorm shares.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qgraph.passes._rewrite_support import (
    NameScope,
    constant_array,
    drop_unused_initializers,
    new_initializer,
    new_output_name,
)
from qgraph.passes.canonicalize._batch_norm_math import BatchNormRewrite, FoldPlan, matmul_bias_operand, plan_fold
from qgraph.passes.infrastructure import RewriteContext, register

logger = logging.getLogger(__name__)


@register
class FoldBatchNorm(BatchNormRewrite):
    """Fold inference BatchNormalization into a preceding Conv, ConvTranspose, Gemm or MatMul(+Add)."""

    summary = "Fold inference BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul that produces its input"

    def plan(self, batch_norm: ir.Node) -> FoldPlan | str:
        return plan_fold(batch_norm)

    def rewrite(self, plan: FoldPlan, context: RewriteContext) -> None:
        batch_norm, producer = plan.batch_norm, plan.producer
        rewrite = {
            "Conv": self._fold_into_conv,
            "ConvTranspose": self._fold_into_conv_transpose,
            "Gemm": self._fold_into_gemm,
            "MatMul": self._fold_into_matmul,
        }[producer.op_type]
        old_inputs = list(producer.inputs) + list(batch_norm.inputs[1:])
        if plan.bias_add is not None:
            old_inputs += list(plan.bias_add.inputs)
        new_nodes = rewrite(plan, context.names)
        old_nodes = [producer] + ([plan.bias_add] if plan.bias_add is not None else []) + [plan.batch_norm]
        ir.convenience.replace_nodes_and_values(
            batch_norm.graph,
            plan.batch_norm,
            old_nodes,
            new_nodes,
            [plan.batch_norm.outputs[0]],
            [new_nodes[-1].outputs[0]],
        )
        drop_unused_initializers(old_inputs)
        logger.debug("folded BatchNormalization %s into %s %s", batch_norm.name, producer.op_type, producer.name)

    # Each rewrite returns the new nodes in order; the last one produces the BatchNorm's output.

    def _weights(self, producer: ir.Node, index: int) -> np.ndarray | None:
        if len(producer.inputs) <= index or producer.inputs[index] is None:
            return None
        return constant_array(producer.inputs[index])

    def _store(
        self, names: NameScope, producer: ir.Node, index: int, suffix: str, array: np.ndarray, dtype: np.dtype
    ) -> ir.Value:
        original = producer.inputs[index] if len(producer.inputs) > index else None
        base = original.name if original is not None and original.name else f"{producer.name or producer.op_type}"
        return new_initializer(producer.graph, names, f"{base}_{suffix}", array.astype(dtype))

    def _replacement(self, producer: ir.Node, inputs: list[ir.Value | None], attributes) -> ir.Node:
        return ir.Node(
            producer.domain,
            producer.op_type,
            inputs,
            attributes=attributes,
            name=producer.name,
            version=producer.version,
            doc_string=producer.doc_string,
        )

    def _fold_into_conv(self, plan: FoldPlan, names: NameScope) -> list[ir.Node]:
        conv, scale, shift = plan.producer, plan.affine.scale, plan.affine.shift
        weight = self._weights(conv, 1)
        bias = self._weights(conv, 2)
        folded_weight = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        return self._convolution_with(names, conv, folded_weight, weight.dtype, bias, scale, shift)

    def _fold_into_conv_transpose(self, plan: FoldPlan, names: NameScope) -> list[ir.Node]:
        conv, scale, shift = plan.producer, plan.affine.scale, plan.affine.shift
        weight = self._weights(conv, 1)
        bias = self._weights(conv, 2)
        group = conv.attributes.get_int("group", 1)
        in_per_group, out_per_group = weight.shape[0] // group, weight.shape[1]
        kernel = weight.shape[2:]
        grouped = weight.astype(np.float64).reshape((group, in_per_group, out_per_group) + kernel)
        grouped_scale = scale.reshape((group, 1, out_per_group) + (1,) * len(kernel))
        folded_weight = (grouped * grouped_scale).reshape(weight.shape)
        return self._convolution_with(names, conv, folded_weight, weight.dtype, bias, scale, shift)

    def _convolution_with(self, names, conv, folded_weight, dtype, bias, scale, shift) -> list[ir.Node]:
        """The convolution rebuilt on the folded weight, with bias b' = b·s + t (b = 0 when absent)."""
        folded_bias = (bias.astype(np.float64) if bias is not None else 0.0) * scale + shift
        inputs = [
            conv.inputs[0],
            self._store(names, conv, 1, "bn_folded", folded_weight, dtype),
            self._store(names, conv, 2, "bn_folded_bias", folded_bias, dtype),
        ]
        return [self._replacement(conv, inputs, list(conv.attributes.values()))]

    def _fold_into_gemm(self, plan: FoldPlan, names: NameScope) -> list[ir.Node]:
        gemm, scale, shift = plan.producer, plan.affine.scale, plan.affine.shift
        weight = self._weights(gemm, 1)
        bias = self._weights(gemm, 2)
        beta = float(gemm.attributes.get_float("beta", 1.0))
        if gemm.attributes.get_int("transB", 0):
            folded_weight = weight.astype(np.float64) * scale[:, np.newaxis]
        else:
            folded_weight = weight.astype(np.float64) * scale[np.newaxis, :]
        folded_bias = (beta * bias.astype(np.float64) if bias is not None else 0.0) * scale + shift
        attributes = [attribute for name, attribute in gemm.attributes.items() if name != "beta"]
        attributes.append(ir.AttrFloat32("beta", 1.0))
        inputs = [
            gemm.inputs[0],
            self._store(names, gemm, 1, "bn_folded", folded_weight, weight.dtype),
            self._store(names, gemm, 2, "bn_folded_bias", folded_bias, weight.dtype),
        ]
        return [self._replacement(gemm, inputs, attributes)]

    def _fold_into_matmul(self, plan: FoldPlan, names: NameScope) -> list[ir.Node]:
        matmul, scale, shift = plan.producer, plan.affine.scale, plan.affine.shift
        weight = self._weights(matmul, 1)
        folded_weight = weight.astype(np.float64) * scale[np.newaxis, :]
        if plan.bias_add is not None:
            _, bias_value = matmul_bias_operand(plan.bias_add)
            bias = constant_array(bias_value).astype(np.float64)
            folded_bias = bias * scale + shift  # (), (1,), (N,) -> (N,);  (1, 1), (1, N) -> (1, N)
            bias_base = bias_value.name or "bias"
        else:
            folded_bias = shift
            bias_base = f"{matmul.name or 'MatMul'}_bias"
        new_matmul = self._replacement(
            matmul, [matmul.inputs[0], self._store(names, matmul, 1, "bn_folded", folded_weight, weight.dtype)], []
        )
        new_output_name(names, new_matmul, matmul.outputs[0].name or "matmul_output")
        new_matmul.outputs[0].type = matmul.outputs[0].type
        new_matmul.outputs[0].shape = matmul.outputs[0].shape
        bias_initializer = new_initializer(
            matmul.graph, names, f"{bias_base}_bn_folded", folded_bias.astype(weight.dtype)
        )
        add_name = plan.bias_add.name if plan.bias_add is not None else None
        add = ir.Node("", "Add", [new_matmul.outputs[0], bias_initializer], name=add_name or None)
        return [new_matmul, add]
