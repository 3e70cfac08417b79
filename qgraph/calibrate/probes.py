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
import os
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from qgraph import runtime
from qgraph.calibrate import observe_kernel
from qgraph.calibrate.blocked_outputs import create_blocked_probe_session
from qgraph.ir.traversal import branches, captured_values, defined_values
from qgraph.ir.values import is_constant, is_op

logger = logging.getLogger(__name__)

#: The optional fast paths behind the probe, each switched off alone by ``tools/bench_ptq.py speed --fast-paths``.
_FAST_PATHS = {"observe_kernel": True, "blocked_outputs": True}


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
    #: Tensors observed inside the graph by the Observe kernel (:mod:`qgraph.calibrate.observe_kernel`): the outputs
    #: that carry their statistics, fetched after ``fetched``.
    statistics: dict[str, observe_kernel.ObservedOutputs] = dataclasses.field(default_factory=dict)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray | observe_kernel.BatchStatistics]]:
        """``(tensor, array)`` for every tensor observed in this probe and in the branches the batch took; a tensor
        observed in the graph comes as ``(tensor, BatchStatistics)``.

        A tensor in ``blocked`` holds its values in another order than the plain tensor.
        """
        available: dict[str, object] = dict(feeds)
        names = [*(self.session_outputs or self.fetched)]
        for outputs in self.statistics.values():
            names += [outputs.counts, outputs.summary]
        if names:
            values = run_without_copies(self.session, names, feeds)
            available.update(zip(self.fetched, values))
            for tensor, channels in self.blocked.items():
                shape = available[tensor].shape
                if len(shape) < 2 or shape[1] != channels:  # padding channels would add zeros to its values
                    raise RuntimeError(f"blocked probe output {tensor!r} has shape {shape}, not {channels} channels")
            summaries = iter(values[len(self.fetched):])
            for tensor in self.statistics:
                available[tensor] = observe_kernel.BatchStatistics.from_outputs(next(summaries), next(summaries))
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


def untyped_output(value: ir.Value) -> onnx.ValueInfoProto:
    """A graph output for ``value`` with its type where known, else none (onnxruntime infers it)."""
    return value_info(value) if value.dtype is not None else onnx.ValueInfoProto(name=value.name)


class _Builder:
    def __init__(
        self,
        model: ir.Model,
        tensors: Iterable[str],
        threads: int | None,
        spinning: bool,
        order_free: Iterable[str],
        in_graph: Mapping[str, int],
    ) -> None:
        self.model = model
        self.tensors = set(tensors)
        self.threads = threads
        self.spinning = spinning
        self.order_free = frozenset(order_free)
        self.library = observe_kernel.library_path() if in_graph and _FAST_PATHS["observe_kernel"] else None
        self.in_graph = dict(in_graph) if self.library is not None else {}

    def kernel_observed(self, observed: list[str], needed: Iterable[str], values: Mapping[str, ir.Value]) -> dict[str, int]:
        """The observed tensors (of ``values``, defined in this graph) that the Observe kernel takes: name -> bins.

        A tensor that the probe must return anyway (an If's condition or captured value) is observed from the output.
        """
        returned = set(needed)
        return {
            name: self.in_graph[name] for name in observed
            if name in self.in_graph and name not in returned and name in values
            and values[name].dtype in (None, ir.DataType.FLOAT)
        }

    def probe(
        self, proto: onnx.ModelProto, inputs: list[str], fetched: list[str], observed: list[str],
        children: list[BranchProbe], in_graph: Mapping[str, int], output_info: Callable[[str], onnx.ValueInfoProto],
    ) -> Probe:
        """A probe on a session of ``proto``, with ``in_graph`` observed by Observe nodes and the order-free observed
        tensors read in the blocked layout if it helps.

        Should onnxruntime refuse the Observe nodes (a tensor whose type the model does not state turns out not to be
        float32, say), the tensors in ``in_graph`` become graph outputs (``output_info`` describes one) instead.
        """
        if in_graph:
            try:
                return self.session_probe(proto, inputs, fetched, observed, children, in_graph)
            except Exception as error:  # noqa: BLE001 - onnxruntime's refusal; the probe can return the tensors
                logger.warning("observing activations inside the probe failed (%s): the probe returns them instead",
                               str(error).strip().splitlines()[0][:200])
                observe_kernel.remove_observe_nodes(proto)
                present = {output.name for output in proto.graph.output}
                proto.graph.output.extend(output_info(name) for name in in_graph if name not in present)
                fetched = [*fetched, *in_graph]
        return self.session_probe(proto, inputs, fetched, observed, children, {})

    def session_probe(
        self, proto: onnx.ModelProto, inputs: list[str], fetched: list[str], observed: list[str],
        children: list[BranchProbe], in_graph: Mapping[str, int],
    ) -> Probe:
        """:meth:`probe` without the fallback."""
        # the kernel spreads its work over as many threads as onnxruntime's pool has (all cores by default)
        threads = self.threads or os.cpu_count() or 1
        statistics = observe_kernel.add_observe_nodes(proto, in_graph, threads=threads) if in_graph else {}
        library = self.library if statistics else None
        blocked = create_blocked_probe_session(
            proto, self.order_free.intersection(observed), threads=self.threads, spinning=self.spinning,
            custom_operators=library,
        ) if _FAST_PATHS["blocked_outputs"] else None
        if blocked is None:
            session = runtime.create_session(
                proto, optimize=True, threads=self.threads, spinning=self.spinning, custom_operators=library
            )
            return Probe(session, inputs, fetched, observed, children, statistics=statistics)
        renamed = {output.tensor: output.name for output in blocked.blocked}
        channels = {output.tensor: output.channels for output in blocked.blocked}
        names = [renamed.get(name, name) for name in fetched]
        return Probe(blocked.session, inputs, fetched, observed, children, names, channels, statistics)

    def main(self) -> Probe:
        graph = self.model.graph
        observed = [name for name in defined_values(graph) if name in self.tensors]
        children, needed = self.children_of(graph)
        inputs = [value.name for value in graph.inputs]
        values = defined_values(graph)
        in_graph = self.kernel_observed([name for name in observed if name not in inputs], needed, values)
        wanted = list(dict.fromkeys([*observed, *needed]))
        proto = ir.serde.serialize_model(self.model)
        present = {output.name for output in proto.graph.output}
        known = {info.name: info for info in proto.graph.value_info}
        for name in wanted:
            if name in present or name in inputs or name in in_graph:
                continue
            proto.graph.output.append(known[name] if name in known else value_info(values[name]))
        fetched = [name for name in wanted if name not in inputs and name not in in_graph]

        def output_info(name: str) -> onnx.ValueInfoProto:
            return known[name] if name in known else untyped_output(values[name])

        return self.probe(proto, inputs, fetched, sorted(observed, key=wanted.index), children, in_graph, output_info)

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
        in_graph = self.kernel_observed(observed, own_needed, values)
        wanted = list(dict.fromkeys([*observed, *own_needed]))
        fetched = [name for name in wanted if name not in in_graph]
        for name in fetched:
            proto_graph.output.append(value_info(values[name]))
        opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in self.model.opset_imports.items()]
        proto = onnx.helper.make_model(proto_graph, opset_imports=opsets, ir_version=self.model.ir_version)
        # what the children need from outside this branch arrives as this branch's inputs
        return self.probe(proto, inputs, fetched, observed, children, in_graph, lambda name: untyped_output(values[name]))


def build_probes(
    model: ir.Model,
    tensors: Iterable[str],
    *,
    threads: int | None = None,
    spinning: bool = True,
    order_free: Iterable[str] = (),
    in_graph: Mapping[str, int] | None = None,
) -> Probe:
    """The probe tree that observes ``tensors`` (names of annotated activations anywhere in main graph and Ifs).

    ``spinning``: whether onnxruntime's idle threads spin (see :func:`qgraph.runtime.create_session`).
    ``order_free``: tensors whose observers ignore the order of values (per-tensor ones); these may be returned in
    onnxruntime's blocked NCHWc layout, which spares the probe a reorder of each (see
    :mod:`qgraph.calibrate.blocked_outputs`).
    ``in_graph``: tensors to observe inside the graph with the Observe kernel (:mod:`qgraph.calibrate.observe_kernel`),
    name -> histogram bins (0 for the extremes only); float32 ones that the probe needs not return otherwise are, where
    the kernel library was built. ``Probe.run`` gives their :class:`~qgraph.calibrate.observe_kernel.BatchStatistics`.
    """
    probe = _Builder(model, tensors, threads, spinning, order_free, in_graph or {}).main()
    count = len(_tree(probe)) - 1
    if count:
        logger.info("calibration probes: the main graph and %d If branch(es)", count)
    in_kernel = sum(len(node.statistics) for node in _tree(probe))
    if in_kernel:
        logger.info("%d activation(s) observed inside the probe graph by qgraph's Observe kernel", in_kernel)
    return probe


def _tree(probe: Probe) -> list[Probe]:
    """``probe`` and every branch probe below it."""
    return [probe, *(node for child in probe.children for node in _tree(child.probe))]
