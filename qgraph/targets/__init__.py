"""Backends qgraph compiles for: one module per target."""

from __future__ import annotations

import dataclasses

from qgraph.errors import QGraphError
from qgraph.targets.base import AUTO_CHOICES, TRANSFORMER_KERNELS, WEIGHT_BITS, Target, TargetOptions
from qgraph.targets.ort_cpu import OrtCpuTarget
from qgraph.targets.tensorrt import TensorRTTarget

_TARGETS: dict[str, type[Target]] = {target.name: target for target in (OrtCpuTarget, TensorRTTarget)}
TARGET_NAMES = tuple(_TARGETS)
#: Every output format some target writes, in the order the targets list them.
FORMATS = tuple(dict.fromkeys(name for target in _TARGETS.values() for name in target.formats))


def get_target(name: str, options: TargetOptions | None = None) -> Target:
    options = options or TargetOptions()
    if name not in _TARGETS:
        raise QGraphError(f"unknown target {name!r}; choose one of {', '.join(TARGET_NAMES)}")
    target = _TARGETS[name](options)
    if options.format is None:
        target.options = dataclasses.replace(options, format=target.formats[0])
    elif options.format not in target.formats:
        raise QGraphError(
            f"target {name} does not support --format {options.format}; it supports {', '.join(target.formats)}"
        )
    return target


__all__ = ["AUTO_CHOICES", "FORMATS", "TARGET_NAMES", "TRANSFORMER_KERNELS", "WEIGHT_BITS", "Target", "TargetOptions",
           "get_target"]
