"""Target ``tensorrt``: explicit QDQ placed by TensorRT's rules.

TensorRT reads Q/DQ pairs as the precision contract and fuses around them, so qgraph only places them:

- int8 symmetric everywhere (zero point 0), narrow range [-127, 127] for weights;
- Q/DQ on the activation inputs of Conv, ConvTranspose, MatMul and Gemm, none on their outputs (TensorRT fuses the
  output into the next layer's input quantization);
- weights per channel on the output axis (axis 0 for Conv, 1 for ConvTranspose);
- no Q/DQ on biases: TensorRT quantizes them itself from the input and weight scales;
- the residual input of an Add that follows a convolution is quantized, so TensorRT can fuse the Add into the
  convolution as an int8 residual;
- opset ≥ 13 (per-channel DequantizeLinear).
"""

from __future__ import annotations

from qgraph.annotate.annotator import COMPUTE_OPS, AnnotationRules
from qgraph.passes.infrastructure import QGraphPass
from qgraph.quant.spec import QuantSpec
from qgraph.targets.base import Target


class TensorRTTarget(Target):
    name = "tensorrt"
    formats = ("qdq",)

    def rules(self) -> AnnotationRules:
        bits = self.options.weight_bits
        return AnnotationRules(
            target=self.name,
            activation_spec=QuantSpec.int8(symmetric=True),
            weight_spec=QuantSpec(bits=bits, signed=True, symmetric=True, narrow_range=True),
            quantize_outputs=False,
            fuse_activations=False,
            quantize_biases=False,
            residual_add_only=True,
            supported_ops=COMPUTE_OPS | {"Add"},
        )

    def lowering_passes(self) -> tuple[type[QGraphPass], ...]:
        return ()
