"""Quantization-aware training on the ONNX graph through onnxruntime-training (no torch).

The calibrated QDQ graph becomes a trainable fake-quantization graph (:mod:`.fake_quant_graph`: STE rounding,
LSQ-style learnable scales), :class:`qgraph.train.Trainer` fine-tunes it with labels or by distillation from the FP32
model (:mod:`.driver`, :mod:`.distill`), and the learned weights and scales go back into the clean QDQ graph, which
the target lowers as after PTQ (:mod:`.export`).
"""

from qgraph.qat.driver import QATResult, check_logits_output, run_qat
from qgraph.qat.export import export_qdq, lower_qdq, read_checkpoint_parameters
from qgraph.qat.fake_quant_graph import FakeQuantGraph, build_fake_quant_graph
from qgraph.qat.options import QATOptions

__all__ = [
    "FakeQuantGraph",
    "QATOptions",
    "QATResult",
    "build_fake_quant_graph",
    "check_logits_output",
    "export_qdq",
    "lower_qdq",
    "read_checkpoint_parameters",
    "run_qat",
]
