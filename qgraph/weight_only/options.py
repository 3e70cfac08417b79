"""The options of weight-only quantization (one frozen dataclass, checked when built)."""

from __future__ import annotations

import dataclasses

from qgraph.errors import QGraphError
from qgraph.quant.blockwise import check_block_size

ALGORITHMS = ("rtn", "gptq", "awq")
#: Algorithms that need calibration data.
CALIBRATED_ALGORITHMS = ("gptq", "awq")
WEIGHT_ONLY_BITS = (4, 8)
#: How the quantized weights are written: packed ``MatMulNBits`` (onnxruntime CPU, 4-bit) or blocked
#: ``DequantizeLinear`` → ``MatMul`` at opset 21 (runtimes that fuse it, TensorRT).
WEIGHT_ONLY_FORMATS = ("matmulnbits", "qdq")

@dataclasses.dataclass(frozen=True)
class WeightOnlyOptions:
    """Weight-only quantization: which bits, blocks and algorithm, and how it is written."""

    bits: int = 4
    block_size: int = 128
    algorithm: str = "rtn"
    #: Symmetric codes (no zero points) or asymmetric (a zero point per block).
    symmetric: bool = False
    #: Also quantize Gather tables (token embeddings), blocked along the hidden axis.
    quantize_embeddings: bool = False
    #: "matmulnbits" (onnxruntime CPU) or "qdq" (blocked DequantizeLinear, opset 21).
    format: str = "matmulnbits"
    #: RTN (and the block parameters of GPTQ): search a clipping ratio per block for the least squared error.
    mse_clip: bool = False
    #: GPTQ: take each layer's inputs from the model whose earlier layers are already quantized.
    sequential: bool = False
    #: GPTQ: dampening, as a fraction of the Hessian's mean diagonal added to its diagonal.
    dampening: float = 0.01
    #: GPTQ: round the inputs in the order of decreasing Hessian diagonal (block parameters stay per stored block).
    act_order: bool = True
    #: GPTQ: rows rounded between two updates of the rest of the weight (rounded up to whole blocks).
    lazy_batch: int = 128
    #: AWQ: points of the exponent grid α ∈ [0, 1] of the scales ``mean|x|^α``.
    awq_grid: int = 20
    #: AWQ: quantize the scaled weights with "rtn" or "gptq".
    awq_then: str = "rtn"
    #: AWQ with RTN: search each block's clipping ratio on the layer's output error after scaling.
    awq_clip: bool = True
    #: MatMulNBits accuracy_level (0: unset, float compute; 4: int8 compute of the activations). 4 by default: at 0
    #: onnxruntime's CPU kernel decoded the trained decoder at 0.8x FP32 and the 2.37 GB one at 1.15x, at 4 at
    #: 1.7-2.4x and 5.5x, for a perplexity change of 0.03% (tools/bench_llm.py --accuracy-level).
    accuracy_level: int = 4
    #: Calibration: samples (None: all) and batch size.
    samples: int | None = 128
    batch_size: int = 8
    #: Quantize layer by layer from memory-mapped weights, spilling the results to external data
    #: (:mod:`qgraph.weight_only.streaming`); None: when the model has external data.
    streaming: bool | None = None
    #: Node names to keep in float.
    exclude: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.bits not in WEIGHT_ONLY_BITS:
            raise QGraphError(f"--weight-bits must be 4 or 8 for weight-only quantization, got {self.bits}")
        check_block_size(self.block_size)
        if self.algorithm not in ALGORITHMS:
            raise QGraphError(
                f"unknown weight-only algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}"
            )
        if self.format not in WEIGHT_ONLY_FORMATS:
            raise QGraphError(f"unknown weight-only format {self.format!r}; choose one of "
                              f"{', '.join(WEIGHT_ONLY_FORMATS)}")
        if self.awq_then not in ("rtn", "gptq"):
            raise QGraphError(f"AWQ quantizes the scaled weights with rtn or gptq, got {self.awq_then!r}")
        if not 0.0 <= self.dampening < 1.0:
            raise QGraphError(f"GPTQ dampening must be in [0, 1), got {self.dampening}")
        if self.lazy_batch < 1 or self.awq_grid < 1 or self.batch_size < 1:
            raise QGraphError("lazy_batch, awq_grid and batch_size must be at least 1")
        if self.samples is not None and self.samples < 1:
            raise QGraphError(f"samples must be at least 1, got {self.samples}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise QGraphError(f"MatMulNBits accuracy_level is 0 to 4, got {self.accuracy_level}")

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm in CALIBRATED_ALGORITHMS
