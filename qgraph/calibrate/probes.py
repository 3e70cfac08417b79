"""Probe models: onnxruntime sessions that return every annotated activation, If branches included.

The main graph's probe is the model with each annotated tensor it defines added as a graph output. onnxruntime
cannot return a tensor from inside an If branch, so each branch that holds annotated tensors gets a probe of its
own: the branch body as a standalone model whose inputs are the values it captures from enclosing graphs (captured
constants become its initializers) and whose outputs are its annotated tensors. The parent probe also returns the
If's condition and the captured values, and per batch a branch probe runs only when the condition selected that
branch, fed with the values that reached the If (see :mod:`qgraph.ir.subgraphs` for why this design). Probes
form a tree that mirrors the nesting of the Ifs.

Each annotated tensor is observed in exactly one probe: the one of the graph that defines it (a main-graph input is
observed from the feeds), so a value that a branch captures is observed once per batch, on every batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from qgraph import runtime
from qgraph.calibrate.blocked_outputs import create_blocked_probe_session
from qgraph.ir.traversal import branches, captured_values, defined_values
from qgraph.ir.values import is_constant, is_op

logger = logging.getLogger(__name__)

#: The optional fast path behind the probe, switched off by ``tools/bench_ptq.py speed --fast-paths`` to measure it.
_FAST_PATHS = {"blocked_outputs": True}


@dataclasses.dataclass
class BranchProbe:
    """A branch's probe, run when the If's ``condition`` equals ``taken_when``."""

    label: str
    condition: str
    taken_when: bool
    probe: Probe


@dataclasses.dataclass
class Probe:
    session: object
    #: The names this probe is fed with (model inputs, or the values a branch captures).
    inputs: list[str]
    #: The outputs asked of onnxruntime.
    fetched: list[str]
    #: The annotated tensors observed here (fetched or fed).
    observed: list[str]
    children: list[BranchProbe]
    #: The session's name for each of ``fetched`` (a tensor returned in the blocked layout has another one).
    session_outputs: list[str] = dataclasses.field(default_factory=list)
    #: Tensors returned in onnxruntime's blocked layout (:mod:`qgraph.calibrate.blocked_outputs`): their channel count.
    blocked: dict[str, int] = dataclasses.field(default_factory=dict)
    #: The graph's own outputs (the main graph's: what the model computes), for :meth:`run`'s ``outputs``.
    graph_outputs: list[str] = dataclasses.field(default_factory=list)

    def run(self, feeds: Mapping[str, np.ndarray],
            outputs: dict[str, np.ndarray] | None = None) -> list[tuple[str, np.ndarray]]:
        """``(tensor, array)`` for every tensor observed in this probe and in the branches the batch took.

        A tensor in ``blocked`` holds its values in another order than the plain tensor. ``outputs``, when given,
        receives a copy of each of ``graph_outputs`` in its plain layout (one blocked is left out), from the same run.
        """
        available: dict[str, np.ndarray] = dict(feeds)
        names = [*(self.session_outputs or self.fetched)]
        extra = [] if outputs is None else [name for name in self.graph_outputs
                                            if name not in self.fetched and name not in available]
        if names or extra:
            values = run_without_copies(self.session, names + extra, feeds)
            available.update(zip(self.fetched + extra, values))
            if outputs is not None:
                outputs.update((name, np.array(available[name])) for name in self.graph_outputs
                               if name in available and name not in self.blocked)
            for tensor, channels in self.blocked.items():
                shape = available[tensor].shape
                if len(shape) < 2 or shape[1] != channels:  # padding channels would add zeros to its values
                    raise RuntimeError(f"blocked probe output {tensor!r} has shape {shape}, not {channels} channels")
        collected = [(tensor, available[tensor]) for tensor in self.observed]
        for child in self.children:
            if bool(np.asarray(available[child.condition]).reshape(-1)[0]) != child.taken_when:
                continue
            collected += child.probe.run({name: available[name] for name in child.probe.inputs})
        return collected


def run_without_copies(session, fetched: list[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run`` whose outputs are numpy views of onnxruntime's own buffers rather than copies.

    A probe returns every annotated activation, about 230 MB a batch for ResNet-18 at batch 16: ``session.run``
    copies each into a fresh numpy array, about a tenth of the run (median 234 against 207 ms here). The views stay
    valid as long as the arrays live (each holds its OrtValue).
    """
    from onnxruntime import OrtValue

    ort_feeds = {name: OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)) for name, array in feeds.items()}
    return [value.numpy() for value in session.run_with_ort_values(fetched, ort_feeds)]


def value_info(value: ir.Value) -> onnx.ValueInfoProto:
    """A typed graph input/output for ``value`` (float when its type is unknown: annotated tensors are float)."""
    element = int(value.dtype) if value.dtype is not None else onnx.TensorProto.FLOAT
    shape = None
    if value.shape is not None:
        shape = [size if isinstance(size, int) else None for size in value.shape]
    return onnx.helper.make_tensor_value_info(value.name, element, shape)


class _Builder:
    def __init__(
        self, model: ir.Model, tensors: Iterable[str], threads: int | None, spinning: bool, order_free: Iterable[str]
    ) -> None:
        self.model = model
        self.tensors = set(tensors)
        self.threads = threads
        self.spinning = spinning
        self.order_free = frozenset(order_free)

    def probe(
        self, proto: onnx.ModelProto, inputs: list[str], fetched: list[str], observed: list[str],
        children: list[BranchProbe],
    ) -> Probe:
        """A probe on a session of ``proto``, with the order-free observed tensors read in the blocked layout if it
        helps."""
        blocked = create_blocked_probe_session(
            proto, self.order_free.intersection(observed), threads=self.threads, spinning=self.spinning
        ) if _FAST_PATHS["blocked_outputs"] else None
        if blocked is None:
            session = runtime.create_session(proto, optimize=True, threads=self.threads, spinning=self.spinning)
            return Probe(session, inputs, fetched, observed, children)
        renamed = {output.tensor: output.name for output in blocked.blocked}
        channels = {output.tensor: output.channels for output in blocked.blocked}
        names = [renamed.get(name, name) for name in fetched]
        return Probe(blocked.session, inputs, fetched, observed, children, names, channels)

    def main(self) -> Probe:
        graph = self.model.graph
        observed = [name for name in defined_values(graph) if name in self.tensors]
        children, needed = self.children_of(graph)
        inputs = [value.name for value in graph.inputs]
        values = defined_values(graph)
        wanted = list(dict.fromkeys([*observed, *needed]))
        proto = ir.serde.serialize_model(self.model)
        present = {output.name for output in proto.graph.output}
        known = {info.name: info for info in proto.graph.value_info}
        for name in wanted:
            if name in present or name in inputs:
                continue
            proto.graph.output.append(known[name] if name in known else value_info(values[name]))
        fetched = [name for name in wanted if name not in inputs]
        probe = self.probe(proto, inputs, fetched, sorted(observed, key=wanted.index), children)
        probe.graph_outputs = [value.name for value in graph.outputs if value is not None]
        return probe

    def children_of(self, graph: ir.Graph) -> tuple[list[BranchProbe], list[str]]:
        """Branch probes of the Ifs directly in ``graph`` and the names ``graph`` must provide them."""
        children: list[BranchProbe] = []
        needed: list[str] = []
        for node in graph:
            if not is_op(node, "If") or not node.inputs or node.inputs[0] is None:
                continue
            for attribute, branch in branches(node):
                probe = self.branch(branch)
                if probe is None:
                    continue
                condition = node.inputs[0].name
                label = f"{node.name or 'If'}/{attribute}"
                children.append(BranchProbe(label, condition, attribute == "then_branch", probe))
                needed += [condition, *probe.inputs]
        return children, needed

    def branch(self, graph: ir.Graph) -> Probe | None:
        values = defined_values(graph)
        observed = [name for name in values if name in self.tensors]
        children, needed = self.children_of(graph)
        if not observed and not children:
            return None
        captured = captured_values(graph)
        captured_names = {value.name for value in captured}
        proto_graph = ir.serde.serialize_graph(graph)
        del proto_graph.output[:]
        inputs: list[str] = []
        for value in captured:
            if is_constant(value):
                tensor = ir.serde.serialize_tensor(value.const_value)
                tensor.name = value.name
                proto_graph.initializer.append(tensor)
            else:
                proto_graph.input.append(value_info(value))
                inputs.append(value.name)
        own_needed = [name for name in needed if name not in captured_names]
        fetched = list(dict.fromkeys([*observed, *own_needed]))
        for name in fetched:
            proto_graph.output.append(value_info(values[name]))
        opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in self.model.opset_imports.items()]
        proto = onnx.helper.make_model(proto_graph, opset_imports=opsets, ir_version=self.model.ir_version)
        # what the children need from outside this branch arrives as this branch's inputs
        return self.probe(proto, inputs, fetched, observed, children)


def build_probes(
    model: ir.Model,
    tensors: Iterable[str],
    *,
    threads: int | None = None,
    spinning: bool = True,
    order_free: Iterable[str] = (),
) -> Probe:
    """The probe tree that observes ``tensors`` (names of annotated activations anywhere in main graph and Ifs).

    ``spinning``: whether onnxruntime's idle threads spin (see :func:`qgraph.runtime.create_session`).
    ``order_free``: tensors whose observers ignore the order of values (per-tensor ones); these may be returned in
    onnxruntime's blocked NCHWc layout, which spares the probe a reorder of each (see
    :mod:`qgraph.calibrate.blocked_outputs`).
    """
    probe = _Builder(model, tensors, threads, spinning, order_free).main()
    count = len(_tree(probe)) - 1
    if count:
        logger.info("calibration probes: the main graph and %d If branch(es)", count)
    return probe


def _tree(probe: Probe) -> list[Probe]:
    """``probe`` and every branch probe below it."""
    return [probe, *(node for child in probe.children for node in _tree(child.probe))]
