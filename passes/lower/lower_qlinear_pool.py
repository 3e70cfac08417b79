"""LowerQLinearPool: ``DQ(x) → GlobalAveragePool | AveragePool → Q(y)`` becomes com.microsoft
``QLinearGlobalAveragePool`` / ``QLinearAveragePool`` (NCHW: ``channels_last = 0``).

An average is linear, so with ``x = (xq - zx)·sx`` (uint8 per tensor) over a window W of |W| elements:

    yq = saturate(round(sx/sy · (Σ_W xq / |W| - zx)) + zy)

which is ``Q(avg(DQ(x)))`` up to float rounding (at most one output step). AveragePool keeps its ``auto_pad``,
``ceil_mode``, ``count_include_pad``, ``kernel_shape``, ``pads`` and ``strides`` (padding counts as zero *real*
value, i.e. ``zx``, exactly like the float pool's zero padding).

Refused (logged): x or y not uint8 per tensor, non-constant params, AveragePool with dilations other than 1 (the
contrib kernel has none), the float result read by anything but the one Q.
"""

from __future__ import annotations

import onnx_ir as ir

from qgraph.passes.infrastructure import register
from qgraph.passes.lower import _qdq_patterns as qdq
from qgraph.passes.lower._lowering_bases import ContribIslandLowering

_AVERAGE_POOL_ATTRIBUTES = ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")


@register
class LowerQLinearPool(ContribIslandLowering):
    """Lower QDQ GlobalAveragePool/AveragePool islands to their com.microsoft QLinear kernels."""

    summary = "DQ → GlobalAveragePool|AveragePool → Q becomes QLinearGlobalAveragePool/QLinearAveragePool"
    kernels = {"GlobalAveragePool": "QLinearGlobalAveragePool", "AveragePool": "QLinearAveragePool"}

    def refusal(self, node: ir.Node) -> str | None:
        dilations = qdq.attribute(node, "dilations", None)
        if dilations is not None and any(int(d) != 1 for d in dilations):
            return f"dilations {list(dilations)}: QLinearAveragePool has no dilations"
        return None

    def kernel_attributes(self, node: ir.Node) -> list[ir.Attr]:
        attributes = [ir.AttrInt64("channels_last", 0)]
        if node.op_type == "AveragePool":
            attributes += [attr for name, attr in node.attributes.items() if name in _AVERAGE_POOL_ATTRIBUTES]
        return attributes
