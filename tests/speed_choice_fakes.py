"""What the speed-choice tests share: the target options and lowering, a fake latency measurement with fixed run
times, and an op-type count."""

from __future__ import annotations

from collections import Counter

import onnx

from qgraph.latency import LatencyOptions, LatencyTable
from qgraph.speed_choice import target_lowering
from qgraph.targets import TargetOptions, get_target

TARGET_OPTIONS = TargetOptions(format="qoperator", reduce_range="off", saturation_guard="off")


def lowering():
    return target_lowering(get_target("ort-cpu", TARGET_OPTIONS))


def fake_measure(times: dict[str, float]):
    """Fixed run times per candidate name (``times["*"]``, else 1.0, for names not listed), times the batch size.

    Returns the measurement and the list of the candidate-name tuples it was asked to time, in order.
    """
    calls: list[tuple[str, ...]] = []

    def measure(models, options: LatencyOptions, *, reference: str, feeds=None) -> LatencyTable:
        calls.append(tuple(models))
        samples = {size: {name: tuple(times.get(name, times.get("*", 1.0)) * size for _ in range(options.rounds))
                          for name in models}
                   for size in options.batch_sizes}
        return LatencyTable(reference, samples, options.threads)

    return measure, calls


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)
