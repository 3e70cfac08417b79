"""Backends qgraph compiles for: one module per target."""

from __future__ import annotations

from qgraph.errors import QGraphError
from qgraph.targets.base import Target, TargetOptions

TARGET_NAMES = ("ort-cpu", "tensorrt")


def get_target(name: str, options: TargetOptions | None = None) -> Target:
    options = options or TargetOptions()
    if name == "ort-cpu":
        from qgraph.targets.ort_cpu import OrtCpuTarget

        target: Target = OrtCpuTarget(options)
    elif name == "tensorrt":
        from qgraph.targets.tensorrt import TensorRTTarget

        target = TensorRTTarget(options)
    else:
        raise QGraphError(f"unknown target {name!r}; choose one of {', '.join(TARGET_NAMES)}")
    if options.format is None:
        import dataclasses

        target.options = dataclasses.replace(options, format=target.formats[0])
    elif options.format not in target.formats:
        raise QGraphError(
            f"target {name} does not support --format {options.format}; it supports {', '.join(target.formats)}"
        )
    return target


__all__ = ["TARGET_NAMES", "Target", "TargetOptions", "get_target"]
