"""What a backend is to qgraph: which tensors it quantizes and how, and which passes lower the QDQ graph for it."""

from __future__ import annotations

import abc
import dataclasses
import logging

from qgraph.annotate.annotator import AnnotationRules
from qgraph.passes.infrastructure import QGraphPass
from qgraph.quant.spec import QuantSpec

logger = logging.getLogger(__name__)

#: The values of an option that a target may turn on for this machine (``auto``) or that the user forces.
AUTO_CHOICES = ("auto", "on", "off")
#: Weight bit widths the targets quantize to.
WEIGHT_BITS = (8, 4)
#: The values of TargetOptions.transformer_kernels.
TRANSFORMER_KERNELS = ("auto", "exact", "fast")


@dataclasses.dataclass(frozen=True)
class TargetOptions:
    """The user's choices that shape a target's specs."""

    #: "qoperator" (integer operators) or "qdq" (explicit QuantizeLinear/DequantizeLinear pairs); None: the
    #: target's default (its first format).
    format: str | None = None
    #: "auto" (on for x86 CPUs without VNNI), "on" or "off": 7-bit weights for u8s8 kernels that can saturate.
    reduce_range: str = "auto"
    per_channel: bool = True
    weight_bits: int = 8
    #: "auto" (on for x86 CPUs without VNNI), "on" or "off": lowering stores 8-bit weight codes beyond ±64 as
    #: uint8 (w + 128) so that onnxruntime runs them on its exact u8u8 kernels instead of saturating u8s8 ones.
    saturation_guard: str = "auto"
    #: "auto", "exact" or "fast": with "fast" the ort-cpu lowering also fuses each integer self-attention block into
    #: one com.microsoft QAttention (the attention core in float) and runs an exact GELU whose output is quantized
    #: as the tanh form (com.microsoft FastGelu): faster on onnxruntime's CPU kernels at the same accuracy to FP32,
    #: but the written model no longer follows the QDQ simulation within deploy parity's one step
    #: (docs/runtime-facts.md, "BERT-base at 1.2x"). "auto": fast after PTQ where the fast model's output SQNR
    #: holds against FP32 (:mod:`qgraph.transformer_kernels`), exact otherwise and after QAT.
    transformer_kernels: str = "auto"


class Target(abc.ABC):
    name: str
    formats: tuple[str, ...]
    #: The lowest default-domain opset the target's QDQ form needs.
    minimum_opset: int = 13

    def __init__(self, options: TargetOptions | None = None) -> None:
        self.options = options or TargetOptions()

    @abc.abstractmethod
    def rules(self) -> AnnotationRules:
        """Placement rules and specs for the annotator (built anew on each call: a run builds them once)."""

    @abc.abstractmethod
    def lowering_passes(self) -> tuple[type[QGraphPass], ...]:
        """The LOWER pass classes for the chosen format, in order (empty for explicit QDQ)."""

    def saturation_guard(self) -> bool:
        """Whether 8-bit weights that could saturate u8s8 kernels are stored as uint8 + 128 (the safe default)."""
        return True

    def lowering_pipeline(self) -> list[QGraphPass]:
        """The LOWER passes, constructed with this target's options."""
        return [pass_class() for pass_class in self.lowering_passes()]

    def weight_spec(self, rules: AnnotationRules, axis: int | None) -> QuantSpec:
        """The weight spec of ``rules`` on ``axis``, per tensor when the user asked for per-tensor weights."""
        return rules.weight_spec.with_axis(axis if self.options.per_channel else None)
