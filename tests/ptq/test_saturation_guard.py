"""ort-cpu's saturation guard: wide 8-bit weights become uint8 + 128 where u8s8 kernels saturate, int8 elsewhere."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from qgraph import runtime
from qgraph.calibrate.driver import CalibrationConfig
from qgraph.errors import QGraphError
from qgraph.ptq import QuantizeOptions, quantize
from qgraph.targets import TargetOptions, get_target
from qgraph.targets.cpu_features import needs_reduce_range
from tests.ptq.small_models import calibration_batches, residual_cnn


def _lowered(**options):
    quantize_options = QuantizeOptions(target_options=TargetOptions(format="qoperator", reduce_range="off", **options),
                                       calibration=CalibrationConfig(method="minmax"), min_sqnr=None)
    result = quantize(ir.serde.deserialize_model(residual_cnn()), calibration_batches(), quantize_options)
    return ir.serde.serialize_model(result.model)


def _conv_weights(proto):
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in proto.graph.initializer}
    return [initializers[node.input[3]] for node in proto.graph.node if node.op_type == "QLinearConv"]


def test_auto_follows_this_cpu():
    target = get_target("ort-cpu", TargetOptions())
    assert target.saturation_guard() == needs_reduce_range() == target.reduce_range()


def test_guard_on_stores_wide_weights_as_uint8_and_off_keeps_int8_with_the_same_outputs():
    guarded, plain = _lowered(saturation_guard="on"), _lowered(saturation_guard="off")
    guarded_weights, plain_weights = _conv_weights(guarded), _conv_weights(plain)
    assert plain_weights and all(weight.dtype == np.int8 for weight in plain_weights)
    assert any(weight.dtype == np.uint8 for weight in guarded_weights)  # 8-bit codes beyond ±64 exist here
    for weight, reference in zip(guarded_weights, plain_weights):
        # the same real weights: w + 128 with zero point 128 where guarded
        codes = weight.astype(np.int16) - (128 if weight.dtype == np.uint8 else 0)
        np.testing.assert_array_equal(codes, reference.astype(np.int16))
    if not needs_reduce_range():  # this CPU's u8s8 kernels are exact (VNNI): both models compute the same
        feeds = calibration_batches(count=1, seed=7)[0]
        outputs = [runtime.run(runtime.create_session(model), feeds) for model in (guarded, plain)]
        for name in outputs[0]:
            np.testing.assert_array_equal(outputs[0][name], outputs[1][name])


def test_an_unknown_choice_is_refused():
    with pytest.raises(QGraphError, match="saturation_guard"):
        get_target("ort-cpu", TargetOptions(saturation_guard="maybe")).saturation_guard()
