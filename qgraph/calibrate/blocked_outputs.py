"""Probe sessions that read convolution activations in onnxruntime's blocked layout, without reordering them.

Facts (onnxruntime CPU, graph optimisation ``ORT_ENABLE_ALL``):

* The NchwcTransformer runs 2-D convolutions, pooling and their element-wise neighbours in the NCHWc layout: channel
  ``c`` of a tensor with ``C`` channels is stored in block ``c // b``, lane ``c % b``, where ``b`` is MLAS's block
  size (8 with AVX2, 16 with AVX-512). ``C`` is padded with zero channels up to a multiple of ``b``; the tensor's
  shape is ``[N, C_padded, H, W]``. A ``com.microsoft.nchwc::ReorderOutput`` (attribute ``channels`` = ``C``)
  converts back to NCHW wherever a plain tensor is needed: every graph output, and every input of an operator that
  does not know the layout.
* A calibration probe reads every annotated activation, so on ResNet-18 at batch 16, 29 reorders move 57 M values a
  batch: the probe ran at 1.16× FP32 inference with them and 1.04× without (sums of per-batch medians over 11
  batches, this machine, activations returned as outputs).

A per-tensor observer (min-max, moving-average min-max, histogram) depends only on the multiset of a tensor's
values, and when ``C`` is a multiple of 16 the blocked tensor holds exactly the plain tensor's values in another
order, with no padding channel. So the probe model is optimised once, to a file; then every ``ReorderOutput`` with
``channels % 16 == 0`` that only feeds a graph output whose observer ignores order is removed (the blocked input
becomes the graph output instead), in onnx-ir; the edited model is opened with graph optimisation off (it is
optimised already, for this machine and this process only). When nothing is to change, the session that optimised
the probe is kept.

Measured share of the whole ``calibrate()`` call (``tools/bench_ptq.py speed --fast-paths``, ResNet-18, 256 samples,
percentile): see the re-layout issue's note. An earlier variant edited the saved file's protobuf wire format in place
rather than in onnx-ir; it bought under 5% of the call and was removed, as was the in-graph Observe kernel.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Collection

import onnx
import onnx_ir as ir
import onnxruntime as ort

from qgraph import runtime

logger = logging.getLogger(__name__)

#: The largest NCHWc block size MLAS uses (AVX-512); a channel count divisible by it has no padding in any block.
LARGEST_BLOCK = 16

#: Models at least this large are not saved through protobuf (its 2 GB limit): their probes keep the reorders.
SIZE_LIMIT = 1 << 30


@dataclasses.dataclass(frozen=True)
class BlockedOutput:
    """A probe output returned in the blocked layout: ``name`` in the session stands for ``tensor``."""

    tensor: str
    name: str
    channels: int


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
) -> BlockedProbeSession | None:
    """A session of ``probe`` whose outputs in ``order_free`` may come back blocked; None when it cannot be made.

    ``order_free``: the graph outputs whose consumers ignore the order of values (per-tensor observers).
    """
    if not order_free or not uses_blocked_layout(probe):
        return None
    try:
        # serialized once, here: protobuf's ByteSize() alone costs as much as serializing (70 ms for ResNet-18)
        serialized = probe.SerializeToString()
        if len(serialized) >= SIZE_LIMIT:
            return None
        session, blocked = _optimized_without_reorders(
            serialized, frozenset(order_free), threads=threads, spinning=spinning
        )
    except Exception:  # noqa: BLE001 - a speed-up only: the probe with reorders gives the same observations
        logger.debug("probe kept in the plain layout: optimising and editing it failed", exc_info=True)
        return None
    logger.debug("probe returns %d activations in the blocked layout", len(blocked))
    return BlockedProbeSession(session, blocked)


def _optimized_without_reorders(
    probe: bytes, order_free: frozenset[str], **session_options
) -> tuple[ort.InferenceSession, list[BlockedOutput]]:
    """A session of ``probe`` as onnxruntime optimised it for this machine, edited by :func:`edit_model`; when there
    is nothing to edit, the session that optimised the probe."""
    with tempfile.TemporaryDirectory(prefix="qgraph-probe-") as folder:
        path = os.path.join(folder, "optimized.onnx")
        # (onnxruntime warns that the saved model is for this machine: it is used here only, and logs are quiet)
        optimizing = runtime.create_session(probe, optimize=True, optimized_model_path=path, **session_options)
        model = ir.load(path)
        blocked = edit_model(model, order_free)
        if blocked is None:
            return optimizing, []
        del optimizing
        return runtime.create_session(ir.to_proto(model), optimize=False, **session_options), blocked


def edit_model(model: ir.Model, order_free: frozenset[str]) -> list[BlockedOutput] | None:
    """Remove from ``model`` (a probe as onnxruntime optimised it) each unpadded ``ReorderOutput`` that only feeds an
    order-free graph output, which then returns the blocked tensor: the outputs now blocked; None when nothing is to
    change."""
    graph = model.graph
    blocked: list[BlockedOutput] = []
    for node in list(graph):
        if node.op_type != "ReorderOutput" or node.domain != "com.microsoft.nchwc":
            continue
        tensor, source = node.outputs[0], node.inputs[0]
        channels = node.attributes.get_int("channels", 0)
        if channels <= 0 or channels % LARGEST_BLOCK:
            continue
        if tensor.uses() or tensor.name not in order_free or not tensor.is_graph_output() or source.is_graph_output():
            continue
        for index, output in enumerate(graph.outputs):
            if output is tensor:
                graph.outputs[index] = source
        # the blocked tensor's shape is not the plain one's (channels last, say): left unstated
        source.type, source.shape = tensor.type, None
        graph.remove(node, safe=True)
        blocked.append(BlockedOutput(tensor.name, source.name, channels))
    return blocked or None
