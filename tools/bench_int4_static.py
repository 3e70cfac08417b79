"""4-bit weights with static (uint8) activations in onnxruntime: what takes int4, and which form is fastest per op.

Two parts, each self-contained (numpy, onnx and onnxruntime only, so that it runs in the bundled runtime and in the
latest one alike):

1. **Support** (``--part support``): whether each operator accepts int4 at opset 21 (DequantizeLinear per tensor,
   per axis and blocked; QuantizeLinear to int4; QLinearMatMul, MatMulInteger and QLinearConv with int4 weights),
   and what onnxruntime's graph optimiser turns a QDQ MatMul/Conv with an int4 weight into (fused to an integer
   kernel, or left as DequantizeLinear → float operator).
2. **Forms** (``--part forms``): one quantized layer with a 4-bit weight (codes in [-7, 7], per output channel) and
   uint8 activations, written in each form qgraph could write for the QOperator format:

   - ``int8-qlinear`` (c): the 4-bit codes widened to int8 for QLinearMatMul / QLinearConv (opset 13);
   - ``int4-dq-float`` (a): int4 storage, ``DequantizeLinear(x) → MatMul/Conv(·, DequantizeLinear(int4 W)) →
     QuantizeLinear`` (opset 21);
   - ``nbits`` / ``nbits-acc4`` (b), MatMul only: ``DequantizeLinear(x) → com.microsoft.MatMulNBits → QuantizeLinear``,
     the per-channel scale repeated over blocks of 128 (``accuracy_level`` 0: float; 4: onnxruntime quantizes x to
     int8 per block for its VNNI kernels);
   - ``fp32``: the float layer, for reference.

   Each form is timed side by side (one run of each per round, ``--rounds`` rounds, full graph optimisation,
   ``--threads`` threads); the table gives the median and the weight bytes as stored.

3. **Models** (``--part models``, needs qgraph): a MatMul-heavy model (a stack of transformer feed-forward blocks,
   hidden 768, inner 3072) and a small CNN, quantized by qgraph with static uint8 activations: FP32, INT8 and 4-bit
   weights in the QOperator format (MatMulNBits at ``accuracy_level`` 4, as qgraph writes it, and 0; Conv on
   QLinearConv with widened codes) and in the QDQ format (int4 DequantizeLinear at opset 21): file size over FP32
   and latency side by side. ``--models-dir DIR`` keeps the quantized models there and times those found there
   instead of quantizing again (so that another onnxruntime, without qgraph installed, times the same files).

    python tools/bench_int4_static.py --part support
    python tools/bench_int4_static.py --part forms [--rounds 40] [--threads 2]
    python tools/bench_int4_static.py --part models [--rounds 20] [--threads 2] [--models-dir DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper
from onnx import helper as make

logger = logging.getLogger("bench_int4_static")

BLOCK = 128


def _int4(name: str, codes: np.ndarray, signed: bool = True) -> onnx.TensorProto:
    """Codes as an int4 (uint4) initializer, packed two per byte (even index in the low nibble) as raw data."""
    codes = np.asarray(codes).astype(np.int64)
    flat = (codes.reshape(-1) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return make.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4, list(codes.shape),
                            packed.tobytes(), raw=True)


def _model(nodes, inputs, outputs, initializers, opset: int) -> onnx.ModelProto:
    graph = make.make_graph(nodes, "layer", inputs, outputs, initializers)
    model = make.make_model(graph, opset_imports=[make.make_opsetid("", opset), make.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10 if opset >= 21 else 8
    return model


def _session(model: onnx.ModelProto, *, optimize: bool = True, threads: int = 1, save: str | None = None):
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if save:
        options.optimized_model_filepath = save
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------------ support
def _try(label: str, probe) -> None:
    try:
        answer = probe()
    except Exception as error:  # onnxruntime raises its own exception types with the reason
        answer = f"refused: {type(error).__name__}: {str(error).splitlines()[0][:150]}"
    print(f"| {label} | {answer} |")


def support() -> None:
    rng = np.random.default_rng(0)
    rows, columns = 256, 64
    codes = rng.integers(-7, 8, (rows, columns))

    def dequantize(kind: str) -> str:
        if kind == "blocked":
            scale = rng.uniform(0.01, 0.1, (rows // 32, columns)).astype(np.float32)
            attributes, expected = {"axis": 0, "block_size": 32}, codes * np.repeat(scale, 32, 0)
        elif kind == "axis":
            scale = rng.uniform(0.01, 0.1, (columns,)).astype(np.float32)
            attributes, expected = {"axis": 1}, codes * scale
        else:
            scale, attributes = np.float32(0.05), {}
            expected = codes * scale
        model = _model([make.make_node("DequantizeLinear", ["w", "s"], ["y"], **attributes)], [],
                       [make.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                       [_int4("w", codes), numpy_helper.from_array(np.asarray(scale), "s")], 21)
        output = _session(model, optimize=False).run(None, {})[0]
        return "runs, exact" if np.array_equal(output, expected.astype(np.float32)) else "runs, WRONG values"

    def quantize() -> str:
        x = rng.normal(size=(4, 8)).astype(np.float32)
        model = _model([make.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                        make.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
                       [make.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                       [make.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                       [numpy_helper.from_array(np.float32(0.3), "s"), _int4("z", np.array(0))], 21)
        output = _session(model, optimize=False).run(None, {"x": x})[0]
        expected = np.clip(np.rint(x / np.float32(0.3)), -8, 7) * np.float32(0.3)
        return "runs, exact" if np.allclose(output, expected) else "runs, WRONG values"

    def integer_kernel(op: str) -> str:
        uint8 = TensorProto.UINT8
        if op == "QLinearConv":
            weight, shape = rng.integers(-7, 8, (8, 4, 3, 3)), [1, 4, 8, 8]
        else:
            weight, shape = codes, [4, rows]
        initializers = [numpy_helper.from_array(np.float32(0.1), "xs"), numpy_helper.from_array(np.uint8(128), "xz"),
                        _int4("w", weight), numpy_helper.from_array(np.float32(0.05), "ws"), _int4("wz", np.array(0)),
                        numpy_helper.from_array(np.float32(0.2), "ys"), numpy_helper.from_array(np.uint8(128), "yz")]
        if op == "MatMulInteger":
            node = make.make_node(op, ["x", "w", "xz", "wz"], ["y"])
            output = make.make_tensor_value_info("y", TensorProto.INT32, None)
        else:
            node = make.make_node(op, ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
            output = make.make_tensor_value_info("y", uint8, None)
        model = _model([node], [make.make_tensor_value_info("x", uint8, shape)], [output], initializers, 21)
        _session(model, optimize=False).run(None, {"x": np.full(shape, 128, np.uint8)})
        return "runs"

    def int8_qlinear_matmul_at_21() -> str:
        model = _qlinear_matmul(4, codes, np.full(columns, 0.05, np.float32), opset=21)
        _session(model, optimize=False).run(None, {"x": np.full((4, rows), 128, np.uint8)})
        return "runs"

    def fused(op: str, storage: str, activations: str) -> str:
        if op == "Conv":
            weight, channels = rng.integers(-7, 8, (8, 4, 3, 3)), 8
            shape = [1, 4, 8, 8]
        else:
            weight, channels, shape = codes, columns, [4, rows]
        axis = 0 if op == "Conv" else 1
        scale = np.full(channels, 0.05, np.float32)
        if storage == "int4 blocked":
            scale = np.full((rows // 32, columns), 0.05, np.float32)
            attributes = {"axis": 0, "block_size": 32}
        else:
            attributes = {"axis": axis}
        stored = numpy_helper.from_array(weight.astype(np.int8), "w") if storage == "int8" else _int4("w", weight)
        nodes = [make.make_node("DequantizeLinear", ["w", "ws"], ["wf"], **attributes)]
        initializers = [stored, numpy_helper.from_array(scale, "ws"), numpy_helper.from_array(np.float32(0.1), "s"),
                        numpy_helper.from_array(np.uint8(128), "z")]
        if activations == "QDQ":
            nodes += [make.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                      make.make_node("DequantizeLinear", ["xq", "s", "z"], ["xf"]),
                      make.make_node(op, ["xf", "wf"], ["m"]),
                      make.make_node("QuantizeLinear", ["m", "s", "z"], ["mq"]),
                      make.make_node("DequantizeLinear", ["mq", "s", "z"], ["y"])]
        else:
            nodes += [make.make_node(op, ["x", "wf"], ["y"])]
        model = _model(nodes, [make.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                       [make.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers, 21)
        session = _session(model)  # optimised in memory (saving a MatMulNBits fusion fails in 1.19)
        session.run(None, {"x": np.zeros(shape, np.float32)})
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "optimized.onnx")
            try:
                options = ort.SessionOptions()
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
                options.optimized_model_filepath = path
                options.log_severity_level = 3
                ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
                optimized = onnx.load(path)
            except Exception as error:
                return f"runs; the optimised graph cannot be saved ({str(error).splitlines()[0][:80]})"
        ops = sorted({(node.domain + "." if node.domain else "") + node.op_type for node in optimized.graph.node})
        return "runs as " + ", ".join(ops)

    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}\n")
    print("| probe (opset 21) | answer |\n|---|---|")
    _try("DequantizeLinear int4, per tensor", lambda: dequantize("tensor"))
    _try("DequantizeLinear int4, per axis", lambda: dequantize("axis"))
    _try("DequantizeLinear int4, blocked (32)", lambda: dequantize("blocked"))
    _try("QuantizeLinear to int4", quantize)
    for op in ("QLinearMatMul", "MatMulInteger", "QLinearConv"):
        _try(f"{op} with an int4 weight", lambda op=op: integer_kernel(op))
    _try("QLinearMatMul (int8) in an opset-21 model", int8_qlinear_matmul_at_21)
    for op in ("MatMul", "Conv"):
        for storage in ("int8", "int4 per axis", "int4 blocked") if op == "MatMul" else ("int8", "int4 per axis"):
            for activations in ("QDQ", "float"):
                _try(f"optimiser on {activations} activations + DQ({storage}) → {op}",
                     lambda op=op, storage=storage, activations=activations: fused(op, storage, activations))


# -------------------------------------------------------------------------------------------------- forms
def _qlinear_matmul(batch: int, codes: np.ndarray, scale: np.ndarray, *, opset: int = 13) -> onnx.ModelProto:
    rows = codes.shape[0]
    initializers = [numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.uint8(128), "xz"),
                    numpy_helper.from_array(codes.astype(np.int8), "w"), numpy_helper.from_array(scale, "ws"),
                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), "wz"),
                    numpy_helper.from_array(np.float32(0.5), "ys"), numpy_helper.from_array(np.uint8(128), "yz")]
    node = make.make_node("QLinearMatMul", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    return _model([node], [make.make_tensor_value_info("x", TensorProto.UINT8, [batch, rows])],
                  [make.make_tensor_value_info("y", TensorProto.UINT8, None)], initializers, opset)


def _around(nodes_for, x_shape, initializers, opset: int) -> onnx.ModelProto:
    """``DequantizeLinear(x) → nodes → QuantizeLinear``: a float layer between quantized neighbours."""
    initializers = initializers + [numpy_helper.from_array(np.float32(0.05), "xs"),
                                   numpy_helper.from_array(np.uint8(128), "xz"),
                                   numpy_helper.from_array(np.float32(0.5), "ys"),
                                   numpy_helper.from_array(np.uint8(128), "yz")]
    nodes = [make.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]), *nodes_for("xf", "m"),
             make.make_node("QuantizeLinear", ["m", "ys", "yz"], ["y"])]
    return _model(nodes, [make.make_tensor_value_info("x", TensorProto.UINT8, x_shape)],
                  [make.make_tensor_value_info("y", TensorProto.UINT8, None)], initializers, opset)


def _pack_nbits(codes: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    rows, columns = codes.shape
    blocks = -(-rows // BLOCK)
    padded = np.full((blocks * BLOCK, columns), 8, np.uint8)
    padded[:rows] = (codes + 8).astype(np.uint8)
    by_column = padded.T.reshape(columns, blocks, BLOCK)
    packed = (by_column[..., 0::2] | (by_column[..., 1::2] << 4)).astype(np.uint8)
    scales = np.repeat(scale[:, None], blocks, axis=1).reshape(-1).astype(np.float32)
    return packed, scales, blocks


def matmul_forms(batch: int, rows: int, columns: int, rng) -> dict[str, onnx.ModelProto]:
    codes = rng.integers(-7, 8, (rows, columns))
    scale = rng.uniform(0.005, 0.02, columns).astype(np.float32)
    forms = {"fp32": _model([make.make_node("MatMul", ["x", "w"], ["y"])],
                            [make.make_tensor_value_info("x", TensorProto.FLOAT, [batch, rows])],
                            [make.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                            [numpy_helper.from_array((codes * scale).astype(np.float32), "w")], 13),
             "int8-qlinear": _qlinear_matmul(batch, codes, scale)}
    forms["int4-dq-float"] = _around(
        lambda x, y: [make.make_node("DequantizeLinear", ["w", "ws"], ["wf"], axis=1),
                      make.make_node("MatMul", [x, "wf"], [y])],
        [batch, rows], [_int4("w", codes), numpy_helper.from_array(scale, "ws")], 21)
    packed, scales, _ = _pack_nbits(codes, scale)
    for name, level in (("nbits", 0), ("nbits-acc4", 4)):
        forms[name] = _around(
            lambda x, y, level=level: [make.make_node("MatMulNBits", [x, "b", "bs"], [y], domain="com.microsoft",
                                                      K=rows, N=columns, bits=4, block_size=BLOCK,
                                                      accuracy_level=level)],
            [batch, rows], [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "bs")], 13)
    return forms


def conv_forms(channels_in: int, channels_out: int, kernel: int, size: int, rng) -> dict[str, onnx.ModelProto]:
    codes = rng.integers(-7, 8, (channels_out, channels_in, kernel, kernel))
    scale = rng.uniform(0.005, 0.02, channels_out).astype(np.float32)
    pads = [kernel // 2] * 4
    x_shape = [1, channels_in, size, size]
    forms = {"fp32": _model([make.make_node("Conv", ["x", "w"], ["y"], pads=pads)],
                            [make.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                            [make.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                            [numpy_helper.from_array((codes * scale[:, None, None, None]).astype(np.float32), "w")],
                            13)}
    initializers = [numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.uint8(128), "xz"),
                    numpy_helper.from_array(codes.astype(np.int8), "w"), numpy_helper.from_array(scale, "ws"),
                    numpy_helper.from_array(np.zeros(channels_out, np.int8), "wz"),
                    numpy_helper.from_array(np.float32(0.5), "ys"), numpy_helper.from_array(np.uint8(128), "yz")]
    forms["int8-qlinear"] = _model(
        [make.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], pads=pads)],
        [make.make_tensor_value_info("x", TensorProto.UINT8, x_shape)],
        [make.make_tensor_value_info("y", TensorProto.UINT8, None)], initializers, 13)
    forms["int4-dq-float"] = _around(
        lambda x, y: [make.make_node("DequantizeLinear", ["w", "ws"], ["wf"], axis=0),
                      make.make_node("Conv", [x, "wf"], [y], pads=pads)],
        x_shape, [_int4("w", codes), numpy_helper.from_array(scale, "ws")], 21)
    return forms


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers with more than 64 elements (the weight and its scales), as stored."""
    return sum(len(tensor.raw_data) or len(tensor.SerializeToString()) for tensor in model.graph.initializer
               if int(np.prod(tensor.dims)) > 64)


def time_forms(forms: dict[str, onnx.ModelProto], rounds: int, threads: int) -> dict[str, float]:
    sessions, feeds = {}, {}
    for name, model in forms.items():
        try:
            session = _session(model, threads=threads)
        except Exception as error:
            logger.warning("%s does not run: %s", name, str(error).splitlines()[0])
            continue
        value = session.get_inputs()[0]
        shape = [int(dimension) for dimension in value.shape]
        feeds[name] = {value.name: (np.random.default_rng(1).integers(100, 156, shape).astype(np.uint8)
                                    if "uint8" in value.type else np.random.default_rng(1).normal(size=shape)
                                    .astype(np.float32))}
        sessions[name] = session
        for _ in range(3):
            session.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feeds[name])
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def forms_table(rounds: int, threads: int) -> None:
    rng = np.random.default_rng(0)
    cases = [(f"MatMul {rows}x{columns}, M={batch}", matmul_forms(batch, rows, columns, rng))
             for rows, columns in ((768, 768), (768, 3072)) for batch in (1, 8, 128)]
    cases += [(f"Conv {cin}->{cout} k{kernel} {size}x{size}", conv_forms(cin, cout, kernel, size, rng))
              for cin, cout, kernel, size in ((64, 64, 3, 56), (256, 64, 1, 28), (128, 128, 3, 14))]
    print(f"onnxruntime {ort.__version__}, {threads} threads, median of {rounds} interleaved rounds (ms); "
          "weight bytes as stored\n")
    names = ("fp32", "int8-qlinear", "int4-dq-float", "nbits", "nbits-acc4")
    print("| layer | " + " | ".join(names) + " |\n|---" * (len(names) + 1) + "|")
    for label, forms in cases:
        medians = time_forms(forms, rounds, threads)
        cells = []
        for name in names:
            if name not in forms:
                cells.append("—")
            elif name not in medians:
                cells.append(f"does not run ({weight_bytes(forms[name])} B)")
            else:
                cells.append(f"{medians[name]:.3f} ms, {weight_bytes(forms[name]) / 1024:.0f} KiB")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


# ------------------------------------------------------------------------------------------------- models
def feed_forward_model(layers: int = 2, hidden: int = 768, inner: int = 3072, seed: int = 0) -> onnx.ModelProto:
    """``layers`` × (MatMul + bias → Relu → MatMul + bias → residual Add), input ``[rows, hidden]``."""
    rng = np.random.default_rng(seed)
    nodes, initializers, current = [], [], "x"
    for layer in range(layers):
        names = [f"l{layer}.{part}" for part in ("w1", "b1", "w2", "b2")]
        initializers += [
            numpy_helper.from_array((rng.standard_normal((hidden, inner)) / np.sqrt(hidden)).astype(np.float32),
                                    names[0]),
            numpy_helper.from_array((rng.standard_normal(inner) * 0.1).astype(np.float32), names[1]),
            numpy_helper.from_array((rng.standard_normal((inner, hidden)) / np.sqrt(inner)).astype(np.float32),
                                    names[2]),
            numpy_helper.from_array((rng.standard_normal(hidden) * 0.1).astype(np.float32), names[3])]
        prefix = f"l{layer}"
        nodes += [make.make_node("MatMul", [current, names[0]], [f"{prefix}.m1"], name=f"{prefix}.matmul1"),
                  make.make_node("Add", [f"{prefix}.m1", names[1]], [f"{prefix}.a1"], name=f"{prefix}.bias1"),
                  make.make_node("Relu", [f"{prefix}.a1"], [f"{prefix}.r"], name=f"{prefix}.relu"),
                  make.make_node("MatMul", [f"{prefix}.r", names[2]], [f"{prefix}.m2"], name=f"{prefix}.matmul2"),
                  make.make_node("Add", [f"{prefix}.m2", names[3]], [f"{prefix}.a2"], name=f"{prefix}.bias2"),
                  make.make_node("Add", [f"{prefix}.a2", current], [f"{prefix}.out"], name=f"{prefix}.residual")]
        current = f"{prefix}.out"
    graph = make.make_graph(nodes, "feed_forward", [make.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 ["rows", hidden])],
                            [make.make_tensor_value_info(current, TensorProto.FLOAT, ["rows", hidden])], initializers)
    return make.make_model(graph, opset_imports=[make.make_opsetid("", 17)], ir_version=8)


def small_cnn_model(seed: int = 0) -> onnx.ModelProto:
    """Conv 3→32 (stride 2) → Relu → 2 × (Conv 32→32 3×3 → Relu) → GlobalAveragePool → Flatten → Gemm 32→10."""
    rng = np.random.default_rng(seed)
    nodes, initializers, current, channels = [], [], "x", 3
    for index, (out, stride) in enumerate(((32, 2), (32, 1), (32, 1))):
        weight = (rng.standard_normal((out, channels, 3, 3)) / np.sqrt(channels * 9)).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"conv{index}.w"),
                         numpy_helper.from_array((rng.standard_normal(out) * 0.1).astype(np.float32), f"conv{index}.b")]
        nodes += [make.make_node("Conv", [current, f"conv{index}.w", f"conv{index}.b"], [f"c{index}"], pads=[1] * 4,
                                 strides=[stride] * 2, name=f"conv{index}"),
                  make.make_node("Relu", [f"c{index}"], [f"r{index}"], name=f"relu{index}")]
        current, channels = f"r{index}", out
    initializers += [numpy_helper.from_array((rng.standard_normal((10, 32)) * 0.2).astype(np.float32), "fc.w"),
                     numpy_helper.from_array(np.zeros(10, np.float32), "fc.b")]
    nodes += [make.make_node("GlobalAveragePool", [current], ["gap"], name="gap"),
              make.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              make.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1, name="fc")]
    graph = make.make_graph(nodes, "small_cnn", [make.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                              ["batch", 3, 64, 64])],
                            [make.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializers)
    return make.make_model(graph, opset_imports=[make.make_opsetid("", 17)], ir_version=8)


def quantized_variants(float_model: onnx.ModelProto, batches) -> dict[str, onnx.ModelProto]:
    """FP32, and qgraph's static quantization of it at 8 and 4 bits, QOperator and QDQ (no speed choice)."""
    import onnx_ir as ir

    from qgraph.pipeline import OptimizeOptions, optimize
    from qgraph.ptq import QuantizeOptions
    from qgraph.targets import TargetOptions

    variants = {"fp32": float_model}
    for bits in (8, 4):
        for output_format in ("qoperator", "qdq"):
            options = OptimizeOptions(quantization=QuantizeOptions(
                target_options=TargetOptions(weight_bits=bits, format=output_format), min_sqnr=None,
                speed_choice=False))
            result = optimize(ir.serde.deserialize_model(float_model), options=options, calibration_data=batches)
            variants[f"int{bits} {output_format}"] = ir.serde.serialize_model(result.model)
    exact = onnx.ModelProto()  # qgraph writes accuracy_level 4; 0 (float arithmetic) for comparison
    exact.CopyFrom(variants["int4 qoperator"])
    for node in exact.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [attribute for attribute in node.attribute if attribute.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept)
    variants["int4 qoperator acc0"] = exact
    return variants


def stored_variants(folder: str | None, label: str, build) -> dict[str, onnx.ModelProto]:
    """The variants saved under ``folder`` for ``label``, or ``build()``'s (saved there when a folder is given)."""
    prefix = os.path.join(folder, label.split()[0]) if folder else None
    index = f"{prefix}.index" if prefix else None
    if index and os.path.exists(index):
        with open(index, encoding="utf-8") as names:
            return {name: onnx.load(f"{prefix}.{number}.onnx") for number, name in enumerate(names.read().splitlines())}
    variants = build()
    if prefix:
        os.makedirs(folder, exist_ok=True)
        for number, variant in enumerate(variants.values()):
            onnx.save(variant, f"{prefix}.{number}.onnx")
        with open(index, "w", encoding="utf-8") as names:
            names.write("\n".join(variants))
    return variants


def models_table(rounds: int, threads: int, folder: str | None = None) -> None:
    rng = np.random.default_rng(0)
    cases = [("feed-forward 2x(768-3072-768)", feed_forward_model(), lambda rows: {"x": rng.standard_normal(
                 (rows, 768)).astype(np.float32)}, (1, 32)),
             ("small CNN 64x64", small_cnn_model(), lambda rows: {"x": rng.standard_normal(
                 (rows, 3, 64, 64)).astype(np.float32)}, (1, 8))]
    print(f"onnxruntime {ort.__version__}, {threads} threads, median of {rounds} interleaved rounds; size = file "
          "bytes over FP32's\n")
    for label, model, feeds_for, sizes in cases:
        variants = stored_variants(folder, label, lambda model=model, feeds_for=feeds_for: quantized_variants(
            model, [feeds_for(8) for _ in range(4)]))
        print(f"**{label}**\n\n| variant | size × FP32 | ops | " + " | ".join(f"batch {size}" for size in sizes)
              + " |\n|---|---|---|" + "---|" * len(sizes))
        timings = {}
        for size in sizes:
            feeds = feeds_for(size)
            sessions = {name: _session(variant, threads=threads) for name, variant in variants.items()}
            for session in sessions.values():
                session.run(None, feeds)
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for _ in range(rounds):
                for name, session in sessions.items():
                    started = time.perf_counter()
                    session.run(None, feeds)
                    times[name].append(time.perf_counter() - started)
            timings[size] = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        for name, variant in variants.items():
            ops = sorted({node.op_type for node in variant.graph.node} - {"QuantizeLinear", "DequantizeLinear"})
            cells = [f"{timings[size][name]:.2f} ms ({timings[size]['fp32'] / timings[size][name]:.2f}× FP32)"
                     for size in sizes]
            print(f"| {name} | {variant.ByteSize() / model.ByteSize():.3f} | {', '.join(ops)} | "
                  + " | ".join(cells) + " |", flush=True)
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("support", "forms", "models"), default="support")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models-dir", help="--part models: keep the quantized models here (reused when present)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if arguments.part == "support":
        support()
    elif arguments.part == "forms":
        forms_table(arguments.rounds, arguments.threads)
    else:
        models_table(arguments.rounds, arguments.threads, arguments.models_dir)


if __name__ == "__main__":
    main()
