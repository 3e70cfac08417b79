"""The quantization plan: what the ANNOTATE phase decides and the later phases carry out.

A plan names tensors, not edges (see docs/qdq-format.md): each activation tensor in ``activations`` gets one
QuantizeLinear/DequantizeLinear pair after its producer; each weight in ``weights`` is stored quantized on the given
axis; each bias in ``biases`` is stored as int32 with scale ``s_input · s_weight``. ``groups`` lists activation
tensors that must share one (scale, zero point) — Concat inputs and output, pass-through ops — so their calibrated
ranges are merged (the union of the ranges) before parameters are computed. ``fp32_nodes`` says, for each node left
in floating point, why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from qgraph.quant.spec import compute_quant_params


@dataclasses.dataclass(frozen=True)
class WeightPlan:
    """A constant weight read by ``consumer`` and quantized per channel along ``axis`` (None: per tensor)."""

    name: str
    consumer: str
    axis: int | None


@dataclasses.dataclass(frozen=True)
class BiasPlan:
    """A constant bias whose scale is the product of the scales of ``activation`` and ``weight``."""

    name: str
    consumer: str
    activation: str
    weight: str


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    target: str
    activation_spec: object
    weight_spec: object
    activations: tuple[str, ...]
    weights: tuple[WeightPlan, ...]
    biases: tuple[BiasPlan, ...]
    groups: tuple[frozenset[str], ...]
    quantized_nodes: tuple[str, ...]
    fp32_nodes: Mapping[str, str]
    #: Per-tensor spec overrides (from a config file); tensors not listed use ``activation_spec``.
    activation_overrides: Mapping[str, object] = dataclasses.field(default_factory=dict)
    #: Per-weight spec overrides; weights not listed use ``weight_spec``.
    weight_overrides: Mapping[str, object] = dataclasses.field(default_factory=dict)
    #: Calibration method per activation (overrides the run's method); tensors not listed use the run's method.
    activation_methods: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Recurrent nodes (LSTM) whose weights are quantized for a dynamically quantized kernel instead of Q/DQ.
    dynamic_nodes: tuple[str, ...] = ()
    #: FP32 nodes that compute no float value (shape arithmetic, indices, masks): nothing there to quantize, so
    #: they are left out of :attr:`coverage`.
    index_nodes: frozenset[str] = frozenset()

    def activation_spec_of(self, tensor: str):
        return self.activation_overrides.get(tensor, self.activation_spec)

    def weight_spec_of(self, weight: str):
        return self.weight_overrides.get(weight, self.weight_spec)

    def activation_parameters(self, ranges: Mapping[str, tuple[float, float]]) -> dict:
        """The quantization parameters of every planned activation that ``ranges`` holds: {tensor: QuantParams}."""
        return {tensor: compute_quant_params(self.activation_spec_of(tensor), *ranges[tensor])
                for tensor in self.activations if tensor in ranges}

    def group_of(self, tensor: str) -> frozenset[str]:
        for group in self.groups:
            if tensor in group:
                return group
        return frozenset({tensor})

    @property
    def coverage(self) -> float:
        """The quantized share of the nodes that compute float values (:attr:`index_nodes` left out)."""
        total = len(self.quantized_nodes) + len(self.fp32_nodes) - len(self.index_nodes)
        return len(self.quantized_nodes) / total if total else 0.0


def merge_groups(pairs: Iterable[tuple[str, str]], tensors: Iterable[str]) -> tuple[frozenset[str], ...]:
    """Connected components of the 'must share a scale' relation, restricted to groups of two or more.

    A union-find over the tensor names (path halving): every annotation asks this, and importing networkx for it
    cost the command 0.14 s of its start-up.
    """
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        parent.setdefault(name, name)
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for name in tensors:
        root(name)
    for first, second in pairs:
        parent[root(first)] = root(second)
    components: dict[str, set[str]] = {}
    for name in parent:
        components.setdefault(root(name), set()).add(name)
    groups = (frozenset(component) for component in components.values() if len(component) > 1)
    return tuple(sorted(groups, key=lambda group: sorted(group)[0]))
