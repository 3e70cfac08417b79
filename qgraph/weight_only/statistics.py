"""Streaming layer-input statistics: the Hessian ``2XᵀX`` and ``mean |x|`` of chosen tensors over calibration data.

A probe is the model with the chosen tensors added as graph outputs; each calibration batch (completed into a
prefill call by :mod:`.feeds`) runs once through onnxruntime, and each fetched tensor ``[..., K]`` is folded into
its :class:`~qgraph.weight_only.gptq.HessianAccumulator` and dropped: memory is one batch of activations plus
O(K²) per tensor, never per sample. The probe is built on a serialized copy of the model, so the caller's graph
is not touched; weights may be replaced (``substitutions``) to collect inputs of a partly quantized model
(GPTQ's ``--sequential``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from qgraph import runtime
from qgraph.errors import DataError
from qgraph.weight_only.feeds import complete_feeds, model_inputs
from qgraph.weight_only.gptq import HessianAccumulator

logger = logging.getLogger(__name__)


def collect_statistics(model: onnx.ModelProto, tensors: Mapping[str, int], batches: Iterable[Mapping[str, np.ndarray]],
                       *, substitutions: Mapping[str, np.ndarray] | None = None,
                       progress: Callable[[int], None] | None = None) -> dict[str, HessianAccumulator]:
    """Accumulators of ``tensors`` (name -> channel count K) over ``batches``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    if substitutions:
        for tensor in probe.graph.initializer:
            if tensor.name in substitutions:
                tensor.CopyFrom(onnx.numpy_helper.from_array(np.asarray(substitutions[tensor.name]), tensor.name))
    outputs = {output.name for output in probe.graph.output}
    for name in tensors:
        if name not in outputs:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = runtime.create_session(probe, prepacking=False)  # the kernels of the streamed segments
    inputs = model_inputs(model)
    fetched = list(tensors)
    accumulators = {name: HessianAccumulator(size) for name, size in tensors.items()}
    samples = 0
    for batch in batches:
        feeds = complete_feeds(inputs, batch)
        for name, array in zip(fetched, session.run(fetched, feeds)):
            accumulators[name].add(array)
        count = len(next(iter(feeds.values())))
        samples += count
        if progress is not None:
            progress(count)
    if samples == 0:
        raise DataError("the calibration data holds no samples")
    logger.info("collected the inputs of %d tensors over %d calibration samples", len(tensors), samples)
    return accumulators


def replayable(batches: Iterable[Mapping[str, np.ndarray]]) -> Sequence[Mapping[str, np.ndarray]] | Iterable:
    """``batches`` as something that can be iterated more than once (a list unless it already is one)."""
    return batches if isinstance(batches, (list, tuple)) else list(batches)
