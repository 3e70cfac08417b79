"""Probe sessions that read convolution activations in onnxruntime's blocked layout, without reordering them.

Facts (onnxruntime CPU, graph optimisation ``ORT_ENABLE_ALL``):

* The NchwcTransformer runs 2-D convolutions, pooling and their element-wise neighbours in the NCHWc layout: channel
  ``c`` of a tensor with ``C`` channels is stored in block ``c // b``, lane ``c % b``, where ``b`` is MLAS's block
  size (8 with AVX2, 16 with AVX-512). ``C`` is padded with zero channels up to a multiple of ``b``; the tensor's
  shape is ``[N, C_padded, H, W]``. A ``com.microsoft.nchwc::ReorderOutput`` (attribute ``channels`` = ``C``)
  converts back to NCHW wherever a plain tensor is needed: every graph output, and every input of an operator that
  does not know the layout, custom operators such as the Observe kernel included.
* A calibration probe reads every annotated activation, so on ResNet-18 at batch 16, 29 reorders move 57 M values a
  batch: the probe ran at 1.16× FP32 inference with them and 1.04× without (sums of per-batch medians over 11
  batches, this machine, activations returned as outputs).

A per-tensor observer (min-max, moving-average min-max, histogram) depends only on the multiset of a tensor's
values, and when ``C`` is a multiple of 16 the blocked tensor holds exactly the plain tensor's values in another
order, with no padding channel. So the probe model is optimised once, to a file; then every ``ReorderOutput`` with
``channels % 16 == 0`` is removed that either only feeds a graph output whose observer ignores order (the blocked
input becomes the graph output instead) or only feeds Observe nodes (they read the blocked input instead); the
edited model is opened with graph optimisation off (it is optimised already, for this machine and this process
only). When nothing is to change, the session that optimised the probe is kept.

The edit also moves the Observe nodes to the end of the node list, those of the earliest activations last:
onnxruntime's default execution order is a depth-first search from the graph's sinks, the last sink first, so each
Observe node then runs right after the node producing its activation, and the activation's buffer is reused as in
plain inference (saved where onnxruntime put them, all at the end of the run, every activation stayed alive).

The edit is made on the protobuf wire format (:mod:`qgraph.calibrate.probe_edit`). The optimised model holds every
weight (45 MB for ResNet-18), and parsing it into Python objects and serialising it again would cost about what the
reorders cost on a short calibration; the nodes and graph outputs, which are all the edit touches, are a few
kilobytes, and the edit is written into the saved file in place, every field keeping its offset.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import tempfile
from collections.abc import Collection

import onnx
import onnx_ir as ir
import onnxruntime as ort

from qgraph import runtime
from qgraph.calibrate.observe_kernel import DOMAIN as OBSERVE_DOMAIN
from qgraph.calibrate.probe_edit import (  # noqa: F401 - LARGEST_BLOCK and remove_output_reorders are this module's API too
    LARGEST_BLOCK,
    BlockedOutput,
    plan_edit,
    remove_output_reorders,
)

logger = logging.getLogger(__name__)

#: Whether the edit is written into the saved file in place (:mod:`qgraph.calibrate.probe_edit`); off, the saved
#: model is loaded into onnx-ir, edited there and handed to onnxruntime serialized again. A switch for ``tools/bench_ptq.py speed --fast-paths``.
_IN_PLACE_EDIT = True

#: Models at least this large are not saved through protobuf (its 2 GB limit): their probes keep the reorders.
SIZE_LIMIT = 1 << 30


@dataclasses.dataclass
class BlockedProbeSession:
    session: ort.InferenceSession
    #: The outputs that come back blocked, under their session names; the others keep their own.
    blocked: list[BlockedOutput]


def uses_blocked_layout(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime may run part of ``model`` in NCHWc: its graph has a Conv."""
    return any(node.op_type == "Conv" and node.domain in ("", "ai.onnx") for node in model.graph.node)


def create_blocked_probe_session(
    probe: onnx.ModelProto,
    order_free: Collection[str],
    *,
    threads: int | None,
    spinning: bool,
    custom_operators: str | None = None,
) -> BlockedProbeSession | None:
    """A session of ``probe`` whose outputs in ``order_free`` may come back blocked; None when it cannot be made.

    ``order_free``: the graph outputs whose consumers ignore the order of values (per-tensor observers). The inputs of
    Observe nodes (:mod:`qgraph.calibrate.observe_kernel`) are order-free too: they are read blocked where possible.
    ``custom_operators``: the library of the Observe kernel, when the probe has Observe nodes.
    """
    observing = any(node.domain == OBSERVE_DOMAIN for node in probe.graph.node)
    if not (order_free or observing) or not uses_blocked_layout(probe):
        return None
    try:
        # serialized once, here: protobuf's ByteSize() alone costs as much as serializing (70 ms for ResNet-18)
        serialized = probe.SerializeToString()
        if len(serialized) >= SIZE_LIMIT:
            return None
        session, blocked = _optimized_without_reorders(
            serialized, frozenset(order_free), threads=threads, spinning=spinning, custom_operators=custom_operators
        )
    except Exception:  # noqa: BLE001 - a speed-up only: the probe with reorders gives the same observations
        logger.debug("probe kept in the plain layout: optimising and editing it failed", exc_info=True)
        return None
    logger.debug("probe returns %d activations in the blocked layout", len(blocked))
    return BlockedProbeSession(session, blocked)


def _optimized_without_reorders(
    probe: bytes, order_free: frozenset[str], **session_options
) -> tuple[ort.InferenceSession, list[BlockedOutput]]:
    """A session of ``probe`` as onnxruntime optimised it for this machine, edited by :mod:`qgraph.calibrate.probe_edit`.

    The edit is written into the saved file in place where it keeps every field's offset, and the file is opened by
    path (~18 ms for ResNet-18, against ~70 ms to copy the whole edited model and have onnxruntime parse the copy);
    otherwise the rewritten model is passed as bytes. When there is nothing to edit, the session that optimised the
    probe is the probe's session.
    """
    with tempfile.TemporaryDirectory(prefix="qgraph-probe-") as folder:
        path = os.path.join(folder, "optimized.onnx")
        # (onnxruntime warns that the saved model is for this machine: it is used here only, and logs are quiet)
        optimizing = runtime.create_session(probe, optimize=True, optimized_model_path=path, **session_options)
        if not _IN_PLACE_EDIT:
            model = ir.load(path)
            blocked = edit_model(model, order_free)
            if blocked is None:
                return optimizing, []
            del optimizing
            return runtime.create_session(ir.to_proto(model), optimize=False, **session_options), blocked
        with open(path, "r+b") as file:
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as optimized:
                edit = plan_edit(optimized, order_free)
                if edit is None:
                    return optimizing, []
                patches = edit.patches()
                source: str | bytes = path if patches is not None else edit.rewritten()
                blocked = edit.blocked
                edit.release()
            for offset, patch in patches or ():
                file.seek(offset)
                file.write(patch)
        del optimizing
        return runtime.create_session(source, optimize=False, **session_options), blocked


def edit_model(model: ir.Model, order_free: frozenset[str]) -> list[BlockedOutput] | None:
    """The edit of :func:`qgraph.calibrate.probe_edit.plan_edit` made on ``model`` in onnx-ir: the outputs now blocked;
    None when nothing is to change (no removable ReorderOutput and no Observe node)."""
    graph = model.graph
    blocked: list[BlockedOutput] = []
    removed = False
    for node in list(graph):
        if node.op_type != "ReorderOutput" or node.domain != "com.microsoft.nchwc":
            continue
        tensor, source = node.outputs[0], node.inputs[0]
        channels = node.attributes.get_int("channels", 0)
        if channels <= 0 or channels % LARGEST_BLOCK:
            continue
        readers = {user for user, _ in tensor.uses()}
        if readers and not tensor.is_graph_output():
            if all(reader.domain == OBSERVE_DOMAIN for reader in readers):
                tensor.replace_all_uses_with(source)
                graph.remove(node, safe=True)
                removed = True
            continue
        if readers or tensor.name not in order_free or not tensor.is_graph_output() or source.is_graph_output():
            continue
        for index, output in enumerate(graph.outputs):
            if output is tensor:
                graph.outputs[index] = source
        # the blocked tensor's shape is not the plain one's (channels last, say): left unstated
        source.type, source.shape = tensor.type, None
        graph.remove(node, safe=True)
        blocked.append(BlockedOutput(tensor.name, source.name, channels))
        removed = True
    observers = [node for node in graph if node.domain == OBSERVE_DOMAIN]
    if not removed and not observers:
        return None
    position = {node: index for index, node in enumerate(graph)}
    graph.remove(observers)
    # last in the node list, the earliest activations' last of all (see the module)
    graph.extend(sorted(observers, key=lambda node: position.get(node.inputs[0].producer(), -1), reverse=True))
    return blocked
