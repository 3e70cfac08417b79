"""The options shared by the quantize passes that store int8 weights for onnxruntime's dynamically quantized kernels.

Those kernels (``DynamicQuantizeLSTM``, ``DynamicQuantizeMatMul``, ``MatMulIntegerToFloat``) quantize their
activations per call and read weights stored as int8 in ``[-qmax, qmax]`` (symmetric; per output channel or per
tensor). ``guard_saturation`` stores 7-bit weights (``|w| <= 64``) where the u8·s8 kernels of a CPU without VNNI
could saturate (see :mod:`qgraph.passes.lower._qdq_patterns`).
"""

from __future__ import annotations

from qgraph.passes.infrastructure import Phase, QGraphPass


class DynamicWeightPass(QGraphPass):
    """A QUANTIZE pass over the named ``nodes`` that stores their weights as int8 for a dynamic kernel."""

    phase = Phase.QUANTIZE

    def __init__(
        self, *, nodes: tuple[str, ...] = (), qmax: int = 127, per_channel: bool = True, guard_saturation: bool = True
    ) -> None:
        super().__init__()
        if not 1 <= qmax <= 127:
            raise ValueError(f"qmax must lie in [1, 127], got {qmax}")
        self.nodes = frozenset(nodes)
        self.qmax = qmax
        self.per_channel = per_channel
        self.guard_saturation = guard_saturation
