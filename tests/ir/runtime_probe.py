"""What the installed onnxruntime runs, measured: the highest IR version it loads and the highest default-domain opset
whose operators it runs — one row of ``qgraph.ir.versions.RUNTIME_LIMITS``.

The probe is one model of the operators qgraph writes whose schemas changed in recent opsets (QuantizeLinear,
DequantizeLinear, Conv, Relu, Add, Cast, Reshape, Transpose, Squeeze, MaxPool, GlobalAveragePool, Flatten, Identity,
Shape, Unsqueeze, Pad, Range), stamped with IR version n and opset m, created as a session and run once. A release's
row holds the largest n (at opset 13) and then the largest m (at that n) for which that succeeds: a release that
loads an opset but lacks one of these kernels there gets the opset below.

``python tests/ir/runtime_probe.py`` prints the row of the onnxruntime on the path. To measure a release without
installing it, unpack its wheel's ``onnxruntime/`` folder and put it first on the path::

    pip download --no-deps --only-binary=:all: onnxruntime==1.24.4 -d wheels
    unzip -q wheels/onnxruntime-1.24.4-*.whl 'onnxruntime/*' -d ort-1.24.4
    PYTHONPATH=ort-1.24.4 python tests/ir/runtime_probe.py
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

#: The probe's IR versions and opsets: from what every supported release runs up to past the newest onnx.
IR_VERSIONS = range(7, 20)
OPSETS = range(13, 40)


def probe_model(opset: int, ir_version: int) -> bytes:
    """The probe model at default-domain ``opset`` and IR ``ir_version``, serialized (onnx does not check it)."""
    constants = [
        helper.make_tensor("weight", TensorProto.FLOAT, [1, 1, 1, 1], [2.0]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("zero_point", TensorProto.UINT8, [], [128]),
        helper.make_tensor("shape", TensorProto.INT64, [2], [1, 16]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [0]),
        helper.make_tensor("pads", TensorProto.INT64, [6], [0] * 6),
        helper.make_tensor("start", TensorProto.INT64, [], [0]),
        helper.make_tensor("limit", TensorProto.INT64, [], [5]),
        helper.make_tensor("delta", TensorProto.INT64, [], [1]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["quantized"]),
        helper.make_node("DequantizeLinear", ["quantized", "scale", "zero_point"], ["dequantized"]),
        helper.make_node("Conv", ["dequantized", "weight"], ["convolved"]),
        helper.make_node("Relu", ["convolved"], ["rectified"]),
        helper.make_node("Add", ["rectified", "dequantized"], ["sum"]),
        helper.make_node("Cast", ["sum"], ["cast"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["cast", "shape"], ["reshaped"]),
        helper.make_node("Transpose", ["reshaped"], ["transposed"]),
        helper.make_node("Squeeze", ["transposed"], ["squeezed"]),
        helper.make_node("MaxPool", ["dequantized"], ["pooled"], kernel_shape=[2, 2]),
        helper.make_node("GlobalAveragePool", ["pooled"], ["averaged"]),
        helper.make_node("Flatten", ["averaged"], ["flat"]),
        helper.make_node("Identity", ["flat"], ["same"]),
        helper.make_node("Shape", ["same"], ["dimensions"]),
        helper.make_node("Unsqueeze", ["same", "axes"], ["unsqueezed"]),
        helper.make_node("Pad", ["unsqueezed", "pads"], ["padded"]),
        helper.make_node("Range", ["start", "limit", "delta"], ["counted"]),
    ]
    outputs = [
        helper.make_tensor_value_info("squeezed", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("padded", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("dimensions", TensorProto.INT64, None),
        helper.make_tensor_value_info("counted", TensorProto.INT64, None),
    ]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              outputs, constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model.SerializeToString()


def failure(opset: int, ir_version: int) -> str | None:
    """Why the installed onnxruntime does not load and run the probe at these versions; None when it does."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(probe_model(opset, ir_version), providers=["CPUExecutionProvider"])
        session.run(None, {"x": np.ones((1, 1, 4, 4), np.float32)})
    except Exception as error:  # onnxruntime raises its own exception types, one per status code
        return (str(error).strip().splitlines() or [type(error).__name__])[0]
    return None


def measure() -> tuple[int, int]:
    """(highest IR version, highest opset) of the installed onnxruntime, by the probe."""
    ir_version = max(version for version in IR_VERSIONS if failure(13, version) is None)
    opset = max(version for version in OPSETS if failure(version, ir_version) is None)
    return ir_version, opset


if __name__ == "__main__":
    import onnxruntime

    measured_ir, measured_opset = measure()
    print(f"onnxruntime {onnxruntime.__version__}: IR <= {measured_ir}, opset <= {measured_opset}")
    print(f"  IR {measured_ir + 1}: {failure(13, measured_ir + 1)}")
    print(f"  opset {measured_opset + 1}: {failure(measured_opset + 1, measured_ir)}")
