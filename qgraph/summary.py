"""A description of a model without running it: versions, signature, operator histogram, parameters and size.

Parameter counts and sizes come from tensor shapes and dtypes, so external data is never read.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import onnx_ir as ir

from qgraph.ir.traversal import iterate_graphs


@dataclasses.dataclass(frozen=True)
class TensorSignature:
    name: str
    dtype: str
    shape: tuple[int | str, ...] | None

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name}: {self.dtype} [unknown shape]"
        dims = ", ".join(str(dim) for dim in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    ir_version: int
    opsets: dict[str, int]
    producer: str
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]
    operator_counts: dict[str, int]
    node_count: int
    subgraph_count: int
    function_count: int
    parameter_count: int
    parameter_bytes: int
    external_parameter_bytes: int


def _signature(value: ir.Value) -> TensorSignature:
    dtype = value.dtype.name.lower() if value.dtype is not None else "unknown"
    shape = None
    if value.shape is not None:
        shape = tuple(dim if isinstance(dim, int) else str(dim.value or "?") for dim in value.shape)
    return TensorSignature(value.name or "", dtype, shape)


def _operator_name(node: ir.Node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def summarize(model: ir.Model) -> ModelSummary:
    counts: collections.Counter[str] = collections.Counter()
    subgraphs = 0
    parameters = 0
    total_bytes = 0
    external_bytes = 0
    graphs = list(iterate_graphs(model))
    for graph in graphs:
        for node in graph:
            counts[_operator_name(node)] += 1
        if isinstance(graph, ir.Graph):
            if graph is not model.graph:
                subgraphs += 1
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None:
                    continue
                elements = math.prod(tuple(tensor.shape)) if tensor.shape is not None else 0
                size = tensor.nbytes
                parameters += elements
                total_bytes += size
                if isinstance(tensor, ir.ExternalTensor):
                    external_bytes += size
    return ModelSummary(
        ir_version=model.ir_version,
        opsets=dict(sorted((domain or "ai.onnx", version) for domain, version in model.opset_imports.items())),
        producer=" ".join(part for part in (model.producer_name, model.producer_version) if part),
        inputs=tuple(_signature(value) for value in model.graph.inputs if not value.is_initializer()),
        outputs=tuple(_signature(value) for value in model.graph.outputs),
        operator_counts=dict(counts.most_common()),
        node_count=sum(counts.values()),
        subgraph_count=subgraphs,
        function_count=len(model.functions),
        parameter_count=parameters,
        parameter_bytes=total_bytes,
        external_parameter_bytes=external_bytes,
    )


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size:.2f} GB"


def human_count(count: int) -> str:
    if count >= 1_000_000:
        return f"{count / 1e6:.2f}M"
    if count >= 1_000:
        return f"{count / 1e3:.1f}K"
    return str(count)
