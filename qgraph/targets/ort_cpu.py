"""Target ``ort-cpu``: onnxruntime on CPU.

Activations uint8 asymmetric per tensor (a ReLU output uses all 256 codes), weights int8 symmetric per output channel,
biases int32. With ``--format qoperator`` (default) the QDQ graph is lowered to onnxruntime's integer operators
(QLinearConv, QLinearMatMul, QGemm, QLinearAdd, …); ``--format qdq`` keeps explicit pairs, which onnxruntime fuses at
session creation. ``reduce_range`` (7-bit weights) is on by default for x86 CPUs without VNNI, whose u8s8 kernels
can saturate (see :mod:`qgraph.targets.cpu_features`), and so is the lowering's saturation guard (8-bit weight
codes beyond ±64 stored as uint8 + 128, run on onnxruntime's exact but slower u8u8 kernels). On a CPU with VNNI
both are off: 8-bit int8 weights on its exact, faster u8s8 kernels. The model is thus tuned for the machine that
quantizes it; one built on a VNNI machine for CPUs without it should use ``--reduce-range on`` (7-bit weights,
exact everywhere).

``transformer_kernels="fast"`` (TargetOptions) appends :data:`FAST_TRANSFORMER_PASSES` to the QOperator lowering:
each integer self-attention block becomes one com.microsoft QAttention (the int8 projections and a float attention
core in one kernel), an exact GELU whose output is quantized becomes FastGelu (the tanh form, within a quarter
step of the output quantization), and float readers of a quantized activation (the residual Add beside a
projection's QuantizeLinear) read the float tensor instead of its DequantizeLinear. The accuracy to FP32 is the same
or better; the written model no longer follows the QDQ simulation within deploy parity's one step (the attention's
quantization steps are gone, the residuals carry no rounding, and the GELU's sub-step differences add up end to
end). The default, ``"auto"``, lowers exactly here; after PTQ :mod:`qgraph.transformer_kernels` adds the fast
kernels where the fast model's output SQNR holds against FP32. docs/runtime-facts.md has the timings.
"""

from __future__ import annotations

import logging

from qgraph.annotate.annotator import (
    BINARY_OPS,
    COMPUTE_OPS,
    FUSABLE_ACTIVATIONS,
    OWN_RANGE_OPS,
    PASS_THROUGH_OPS,
    AnnotationRules,
)
from qgraph.errors import QGraphError
from qgraph.passes.infrastructure import QGraphPass
from qgraph.passes.lower.bypass_float_dequantize import BypassFloatDequantize
from qgraph.passes.lower.lower_conv_integer import LowerConvInteger
from qgraph.passes.lower.lower_fast_gelu import LowerFastGelu
from qgraph.passes.lower.lower_four_bit_matmul import LowerFourBitMatMul
from qgraph.passes.lower.lower_integer_matmul import LowerIntegerMatMul
from qgraph.passes.lower.lower_integer_passthrough import LowerIntegerPassThrough
from qgraph.passes.lower.lower_matmul_integer_to_float import LowerMatMulIntegerToFloat
from qgraph.passes.lower.lower_qgemm import LowerQGemm
from qgraph.passes.lower.lower_qlinear_binary import LowerQLinearBinary
from qgraph.passes.lower.lower_qlinear_concat import LowerQLinearConcat
from qgraph.passes.lower.lower_qlinear_conv import LowerQLinearConv
from qgraph.passes.lower.lower_qlinear_matmul import LowerQLinearMatMul
from qgraph.passes.lower.lower_qlinear_pool import LowerQLinearPool
from qgraph.passes.lower.lower_qlinear_unary import LowerQLinearUnary
from qgraph.passes.lower.lower_quantized_attention import LowerQuantizedAttention
from qgraph.passes.lower.lower_quantized_gather import LowerQuantizedGather
from qgraph.passes.lower.remove_redundant_quantization import RemoveRedundantQuantization
from qgraph.passes.lower.store_int4_weights import StoreInt4Weights
from qgraph.quant.spec import QuantSpec
from qgraph.targets.base import AUTO_CHOICES, TRANSFORMER_KERNELS, Target
from qgraph.targets.cpu_features import needs_reduce_range

logger = logging.getLogger(__name__)

LOWERING_PASSES: tuple[type[QGraphPass], ...] = (
    LowerQLinearConv,
    LowerQLinearMatMul,
    LowerQGemm,
    LowerMatMulIntegerToFloat,
    LowerIntegerMatMul,
    LowerConvInteger,
    LowerQLinearBinary,
    LowerQLinearConcat,
    LowerQLinearPool,
    LowerQLinearUnary,
    LowerIntegerPassThrough,
    LowerQuantizedGather,
    RemoveRedundantQuantization,
)
#: What ``transformer_kernels="fast"`` adds after the lowering: each needs the projections / GELU as the passes above
#: leave them, and each moves outputs away from the QDQ simulation (see their modules and docs/runtime-facts.md).
FAST_TRANSFORMER_PASSES: tuple[type[QGraphPass], ...] = (LowerQuantizedAttention, LowerFastGelu, BypassFloatDequantize)
#: MatMulNBits' accuracy_level for 4-bit MatMul/Gemm weights: 4 (x quantized to int8 per block, VNNI kernels) ran
#: 1.8-3.1x faster than 0 (float) at every batch size; it moves some outputs by a step, the SQNR not measurably
#: (docs/runtime-facts.md).
FOUR_BIT_ACCURACY_LEVEL = 4
#: Lowering passes with integer kernels whose u8s8 form can saturate (they take ``guard_saturation``).
GUARDED_PASSES: frozenset[type[QGraphPass]] = frozenset({LowerQLinearConv, LowerQLinearMatMul, LowerQGemm,
                                                         LowerMatMulIntegerToFloat, LowerIntegerMatMul})


class OrtCpuTarget(Target):
    name = "ort-cpu"
    formats = ("qoperator", "qdq")

    def reduce_range(self) -> bool:
        return _for_this_cpu(self.options.reduce_range, "--reduce-range")

    def saturation_guard(self) -> bool:
        return _for_this_cpu(self.options.saturation_guard, "saturation_guard")

    def rules(self) -> AnnotationRules:
        bits = self.options.weight_bits
        # Narrow range keeps the grid symmetric (-127..127, or -63..63 with reduce_range): the largest weight
        # lands exactly on the end code instead of half a step past it.
        weight = QuantSpec(
            bits=bits, signed=True, symmetric=True, narrow_range=True, reduce_range=self.reduce_range() and bits == 8
        )
        return AnnotationRules(
            target=self.name,
            activation_spec=QuantSpec.uint8(),
            weight_spec=weight,
            quantize_outputs=True,
            fuse_activations=True,
            quantize_biases=True,
            residual_add_only=False,
            supported_ops=COMPUTE_OPS | BINARY_OPS | PASS_THROUGH_OPS | OWN_RANGE_OPS | FUSABLE_ACTIVATIONS
            | {"Concat"},
            quantize_embeddings=True,
        )

    def lowering_passes(self) -> tuple[type[QGraphPass], ...]:
        if self.options.transformer_kernels not in TRANSFORMER_KERNELS:
            raise QGraphError(f"transformer_kernels must be one of {', '.join(TRANSFORMER_KERNELS)}, got "
                              f"{self.options.transformer_kernels!r}")
        if self.options.format != "qoperator":
            # explicit QDQ too: onnxruntime would dequantize a whole embedding table on every run
            passes = (LowerQuantizedGather,)
            return passes + (StoreInt4Weights,) if self.options.weight_bits == 4 else passes
        passes = LOWERING_PASSES
        if self.options.transformer_kernels == "fast":
            passes = passes + FAST_TRANSFORMER_PASSES
        if self.options.weight_bits == 4:  # docs/runtime-facts.md, "4-bit weights with static activations"
            passes = (LowerFourBitMatMul,) + passes + (StoreInt4Weights,)
        return passes

    def lowering_pipeline(self) -> list[QGraphPass]:
        guard = self.saturation_guard()
        return [
            pass_class(guard_saturation=guard) if pass_class in GUARDED_PASSES
            else LowerFourBitMatMul(accuracy_level=FOUR_BIT_ACCURACY_LEVEL) if pass_class is LowerFourBitMatMul
            else pass_class()
            for pass_class in self.lowering_passes()
        ]


def _for_this_cpu(choice: str, option: str) -> bool:
    """An auto/on/off option whose auto means: on where u8s8 kernels can saturate (x86 without VNNI)."""
    if choice not in AUTO_CHOICES:
        raise QGraphError(f"{option} must be auto, on or off, got {choice!r}")
    return needs_reduce_range() if choice == "auto" else choice == "on"
