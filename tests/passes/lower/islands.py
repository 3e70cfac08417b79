"""QDQ islands shared by several lowering test files (the Conv island, the MatMul island), built with QDQBuilder,
and the pieces the refusal tests need that QDQBuilder does not write: a DequantizeLinear of constant codes with any
(scale, zero point, axis), an integer graph input, and a check that a pass refuses a model for a stated reason.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.passes.qdq_builders import QDQBuilder, lower_and_check


def dequantize_constant(builder: QDQBuilder, codes: np.ndarray, scale, zero_point, *, axis: int | None = None) -> str:
    """``DequantizeLinear(codes, scale, zero_point[, axis])`` on constants; returns its output."""
    inputs = [builder.constant("codes", codes), builder.constant("scale", np.asarray(scale, np.float32)),
              builder.constant("zero_point", np.asarray(zero_point, codes.dtype))]
    attributes = {"axis": axis} if axis is not None else {}
    return builder.node("DequantizeLinear", inputs, **attributes)


def integer_input(builder: QDQBuilder, name: str, shape: list[int], dtype) -> str:
    """A graph input of an integer type (fed small seeded codes when the builder calibrates)."""
    builder.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape))
    for feeds in builder.calibration:
        feeds[name] = builder.rng.integers(0, 4, shape).astype(dtype)
    return name


def dequantize_input(builder: QDQBuilder, name: str, shape: list[int]) -> str:
    """``DequantizeLinear`` of an int8 graph input ``name`` (a weight that is not a constant); returns its output."""
    codes = integer_input(builder, name, shape, np.int8)
    return builder.node("DequantizeLinear", [codes, builder.constant("s", np.float32(0.05)),
                                             builder.constant("z", np.int8(0))])


def assert_refused(model, pass_instance, caplog, reason: str) -> None:
    """``pass_instance`` leaves ``model`` unchanged (valid, same outputs, idempotent) and logs ``reason``."""
    with caplog.at_level("INFO"):
        lower_and_check(model, pass_instance, expect_modified=False)
    assert reason in caplog.text, f"expected the refusal {reason!r}, the log says:\n{caplog.text}"


def conv_island(*, activation: str | None = "Relu", output_zero_point: int | None = None, bits: int = 8,
                per_channel: bool = True, bias: bool = True, clip: tuple[float, float] = (0.0, 6.0),
                output_scale: float | None = None, seed: int = 0):
    builder = QDQBuilder(seed=seed)
    rng = np.random.default_rng(seed)
    x = builder.quantize(builder.add_input("x", [1, 3, 8, 8]))
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.5
    bias_array = rng.standard_normal(4).astype(np.float32) if bias else None
    y = builder.conv(x, weight, bias_array, per_channel=per_channel, bits=bits, pads=[1, 1, 1, 1])
    if activation == "Relu":
        y = builder.node("Relu", [y])
    elif activation == "Clip":
        y = builder.node("Clip", [y, builder.constant("lo", np.float32(clip[0])),
                                  builder.constant("hi", np.float32(clip[1]))])
    out = builder.output(builder.quantize(y, scale=output_scale, zero_point=output_zero_point))
    return builder, out


def matmul_model(*, quantized_output: bool, per_channel: bool = True, weight_axis: int = 1, bits: int = 8,
                 activation: str | None = None, three_d: bool = False):
    builder = QDQBuilder(seed=3)
    rng = np.random.default_rng(3)
    a = builder.quantize(builder.add_input("a", [2, 5, 8] if three_d else [5, 8]))
    weight_value, _ = builder.weight(rng.standard_normal((8, 6)).astype(np.float32),
                                     axis=weight_axis if per_channel else None, bits=bits)
    y = builder.node("MatMul", [a, weight_value])
    if activation:
        y = builder.node(activation, [y])
    out = builder.output(builder.quantize(y) if quantized_output else y)
    return builder, out


ROWS, COLUMNS = 50, 8


def embedding_lookup(*, per_tensor: bool = False, dequantize_axis: int = 1, gather_axis: int = 0, ids_shape=(2, 3),
           whole_table_output: bool = False, zero_point: bool = True, second_lookup: bool = False,
           zero_point_value: int = 0, seed: int = 0) -> onnx.ModelProto:
    """``Gather(DequantizeLinear(codes), ids)``: a quantized embedding table, as InsertQuantizeDequantize writes it."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-127, 128, (ROWS, COLUMNS)).astype(np.int8)
    channels = 1 if per_tensor else (ROWS if dequantize_axis == 0 else COLUMNS)
    scale = (rng.random(channels).astype(np.float32) + 0.5) / 64
    shape = () if per_tensor else (channels,)
    initializers = [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scale.reshape(shape), "scale")]
    dequantize_inputs = ["codes", "scale"]
    if zero_point:
        initializers.append(numpy_helper.from_array(np.full(shape, zero_point_value, np.int8), "zero_point"))
        dequantize_inputs.append("zero_point")
    attributes = {} if per_tensor else {"axis": dequantize_axis}
    nodes = [helper.make_node("DequantizeLinear", dequantize_inputs, ["table"], name="table_dequantize", **attributes),
             helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup", axis=gather_axis),
             helper.make_node("Tanh", ["rows"], ["y"], name="after")]
    rows_shape = [*ids_shape, COLUMNS] if gather_axis == 0 else [ROWS, *ids_shape]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, rows_shape)]
    if second_lookup:
        nodes.append(helper.make_node("Gather", ["table", "ids"], ["again"], name="second_lookup"))
        outputs.append(helper.make_tensor_value_info("again", TensorProto.FLOAT, [*ids_shape, COLUMNS]))
    if whole_table_output:
        outputs.append(helper.make_tensor_value_info("table", TensorProto.FLOAT, [ROWS, COLUMNS]))
    graph = helper.make_graph(nodes, "lookup", [helper.make_tensor_value_info("ids", TensorProto.INT64, ids_shape)],
                              outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def blocked_embedding_lookup(*, signed: bool = True, bits: int = 4, block: int = 4, columns: int = COLUMNS,
                             axis: int = 1, ids_shape=(2, 3), seed: int = 0) -> onnx.ModelProto:
    """``Gather(DequantizeLinear(codes; axis=1, block_size), ids)``: a weight-only table as QuantizeWeightsBlockwise
    writes it (opset 21, 4-bit codes by default, one scale and zero point per block of a row)."""
    import ml_dtypes
    import onnx_ir as ir

    rng = np.random.default_rng(seed)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    dtype = {(4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4, (8, True): np.int8, (8, False): np.uint8}
    codes = rng.integers(low, high, (ROWS, columns))
    blocks_shape = (ROWS, -(-columns // block)) if axis == 1 else (-(-ROWS // block), columns)
    scale = ((rng.random(blocks_shape) + 0.5) / 64).astype(np.float32)
    zero_point = rng.integers(low, high, blocks_shape) if not signed else np.zeros(blocks_shape, np.int64)
    tensors = [ir.serde.serialize_tensor(ir.tensor(codes.astype(dtype[bits, signed]), name="codes")),
               numpy_helper.from_array(scale, "scale"),
               ir.serde.serialize_tensor(ir.tensor(zero_point.astype(dtype[bits, signed]), name="zero_point"))]
    nodes = [helper.make_node("DequantizeLinear", ["codes", "scale", "zero_point"], ["table"], name="table_dequantize",
                              axis=axis, block_size=block),
             helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup"),
             helper.make_node("Tanh", ["rows"], ["y"], name="after")]
    graph = helper.make_graph(nodes, "blocked_lookup",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ids_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*ids_shape, columns])], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
