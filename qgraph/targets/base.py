"""What a backend is to qgraph: which tensors it quantizes and how, and which passes lower the QDQ graph for it."""

from __future__ import annotations

import abc
import dataclasses
import logging

from qgraph.annotate.annotator import AnnotationRules
from qgraph.quant.spec import QuantSpec

logger = logging.getLogger(__name__)


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


class Target(abc.ABC):
    name: str
    formats: tuple[str, ...]
    #: The lowest default-domain opset the target's QDQ form needs.
    minimum_opset: int = 13

    def __init__(self, options: TargetOptions | None = None) -> None:
        self.options = options or TargetOptions()

    @abc.abstractmethod
    def rules(self) -> AnnotationRules:
        """Placement rules and specs for the annotator."""

    @abc.abstractmethod
    def lowering_passes(self) -> tuple[str, ...]:
        """Names of the LOWER passes for the chosen format (empty for explicit QDQ)."""

    def saturation_guard(self) -> bool:
        """Whether 8-bit weights that could saturate u8s8 kernels are stored as uint8 + 128 (the safe default)."""
        return True

    def lowering_pipeline(self) -> list:
        """The LOWER passes, constructed with this target's options."""
        from qgraph.passes.infrastructure import get_pass

        return [get_pass(name)() for name in self.lowering_passes()]

    def weight_spec(self, axis: int | None) -> QuantSpec:
        return self.rules().weight_spec.with_axis(axis if self.options.per_channel else None)
