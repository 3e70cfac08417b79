"""The small mobile classifier at INT8 with every default: within 0.5 points of FP32 (issue 14, part 5).

The trained MobileNetV2-style network of ``models/trained/`` (depthwise convolutions, ReLU6, 10 Fashion-MNIST
classes) stands in for a text-direction classifier. ``optimize`` runs as a user would with only calibration data
(the 500 bundled calibration images): min-max ranges, the sensitivity bound, bias correction "auto", the speed
choice; the written model is scored on the 2000 bundled test images against the FP32 model on the same images.
Measured with the full 10 000-image test set: FP32 90.06%, INT8 90.09% (minmax), 90.11% (entropy), 90.05%
(percentile).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph import runtime
from qgraph.models.recipes import CALIBRATION_FILE, TEST_SUBSET_FILE, bundled_data_path, load_bundled_data
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions

MODEL = bundled_data_path(CALIBRATION_FILE).parents[1] / "trained" / "mobilenet_v2_small_fmnist.onnx"
GOAL_POINTS = 0.5


def _accuracy(proto, images: np.ndarray, labels: np.ndarray) -> float:
    session = runtime.create_session(proto, optimize=True)
    predictions = np.concatenate([session.run(None, {"input": images[start:start + 250]})[0].argmax(axis=1)
                                  for start in range(0, len(images), 250)])
    return 100.0 * float(np.mean(predictions == labels))


@pytest.mark.skipif(not MODEL.is_file(), reason="the trained model is not in this checkout")
def test_default_int8_mobilenet_v2_stays_within_half_a_point():
    calibration, _ = load_bundled_data(CALIBRATION_FILE)
    images, labels = load_bundled_data(TEST_SUBSET_FILE)
    result = optimize(MODEL, options=OptimizeOptions(quantization=QuantizeOptions()),
                      calibration_data=[{"input": calibration[start:start + 16]}
                                        for start in range(0, len(calibration), 16)])
    assert result.quantization.plan.quantized_nodes  # it was quantized, not kept in float
    fp32 = _accuracy(result.float_model, images, labels)
    int8 = _accuracy(ir.serde.serialize_model(result.model), images, labels)
    assert fp32 > 85.0
    assert fp32 - int8 <= GOAL_POINTS, (fp32, int8)
