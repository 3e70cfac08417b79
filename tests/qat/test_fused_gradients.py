"""The fused quantizer gradient: the same gradients as onnxruntime's nine kernels, in the graph where it applies."""

from __future__ import annotations

import shutil
import sysconfig

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

import qgraph.train.artifacts as artifacts_module
from qgraph.qat import build_fake_quant_graph
from qgraph.train import TrainingConfig
from qgraph.train.artifacts import build_training_artifacts
from qgraph.train.fused_gradients import DOMAIN, FORWARD_OPERATOR, OPERATOR, fuse_quantizers, library_path
from qgraph.train.session import TrainingSession
from tests.ptq.small_models import calibration_batches
from tests.qat.helpers import quantized


def test_the_library_is_built_where_a_compiler_is():
    compiler = sysconfig.get_config_var("CC")
    if compiler and shutil.which(compiler.split()[0]):
        assert library_path() is not None, "a C compiler is present but the fused gradient library was not built"


def _kernel_session() -> onnxruntime.InferenceSession:
    names = ["dy", "t", "t_hat", "scale", "low", "high"]
    graph = helper.make_graph(
        [helper.make_node(OPERATOR, names, ["dt", "ds"], domain=DOMAIN)], "kernel",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("dt", "ds")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 9
    options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(library_path())
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _onnxruntime_mask(t: np.ndarray, low: np.float32, high: np.float32) -> np.ndarray:
    """Equal(t, Clip(t, low, high)) computed by onnxruntime: the mask of the composition the kernel replaces."""
    graph = helper.make_graph(
        [helper.make_node("Clip", ["t", "low", "high"], ["clipped"]),
         helper.make_node("Equal", ["t", "clipped"], ["m"])],
        "mask", [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("t", "low", "high")],
        [helper.make_tensor_value_info("m", TensorProto.BOOL, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"t": t, "low": np.array(low), "high": np.array(high)})[0]


@pytest.mark.skipif(library_path() is None, reason="built without a C compiler (the test above checks that case)")
@pytest.mark.parametrize("bounds", [(-2.5, 2.5), (np.nan, np.nan), (0.0, 0.0)])
def test_kernel_matches_the_composition_it_replaces(bounds):
    generator = np.random.default_rng(0)
    t = generator.standard_normal((3, 7, 11)).astype(np.float32) * 2
    low, high = np.float32(bounds[0]), np.float32(bounds[1])
    t.flat[:4] = [np.nan, low, high, np.inf]  # a NaN, both ends (inside), an infinity
    scale = np.float32(0.02)
    t_hat = np.clip(np.nan_to_num(t), -2.5, 2.5).astype(np.float32)
    dy = generator.standard_normal(t.shape).astype(np.float32)
    dt, ds = _kernel_session().run(None, dict(dy=dy, t=t, t_hat=t_hat, scale=np.array(scale), low=np.array(low),
                                              high=np.array(high)))
    expected_dt = np.where(_onnxruntime_mask(t, low, high), dy, np.float32(0))
    np.testing.assert_array_equal(dt, expected_dt)
    assert dt.shape == t.shape and ds.shape == ()
    with np.errstate(invalid="ignore"):  # 0 · inf in the reference, as in the kernel
        terms = (dy * t_hat - expected_dt * t).astype(np.float32).astype(np.float64)
    finite = np.isfinite(terms).all()
    expected_ds = terms.sum() / scale
    if finite:
        np.testing.assert_allclose(ds, expected_ds, rtol=1e-5)
    else:
        assert not np.isfinite(ds)


@pytest.mark.skipif(library_path() is None, reason="built without a C compiler (the first test checks that case)")
@pytest.mark.parametrize(("zero_type", "zero_point"),
                         [(TensorProto.UINT8, np.uint8(131)), (TensorProto.INT8, np.int8(-3))])
def test_fake_quantize_is_onnxruntimes_quantize_dequantize_bit_for_bit(zero_type, zero_point):
    scale = np.float32(0.0137)
    ties = ((np.arange(-300, 300) + 0.5) * scale).astype(np.float32)
    generator = np.random.default_rng(0)
    values = np.concatenate([generator.standard_normal(20_000).astype(np.float32) * 3, ties, np.nextafter(ties, 0),
                             np.nextafter(ties, 10), np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32)])
    feeds = {"t": values.reshape(-1, 7), "scale": np.array(scale), "zero_point": np.array(zero_point)}
    results = []
    for fused in (True, False):
        if fused:
            nodes = [helper.make_node(FORWARD_OPERATOR, ["t", "scale", "zero_point"], ["y"], domain=DOMAIN)]
        else:
            nodes = [helper.make_node("QuantizeLinear", ["t", "scale", "zero_point"], ["q"], domain="com.microsoft"),
                     helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"], domain="com.microsoft")]
        graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("t", TensorProto.FLOAT, None),
                                                  helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
                                                  helper.make_tensor_value_info("zero_point", zero_type, [])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 9
        options = onnxruntime.SessionOptions()
        options.register_custom_ops_library(library_path())
        session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
        results.append(session.run(None, feeds)[0])
    assert results[0].shape == results[1].shape == (len(values) // 7, 7)
    np.testing.assert_array_equal(results[0].view(np.uint32), results[1].view(np.uint32))


def _trained(result, float_model, fused: bool, tmp_path, steps: int = 3):
    graph = build_fake_quant_graph(result.qdq_model, result.plan, result.parameters, float_model=float_model)
    config = TrainingConfig(loss="mse", trainable=graph.trainable, learning_rate=1e-2, threads=1,
                            fused_gradients=fused)
    artifacts = build_training_artifacts(graph.model, tmp_path / str(fused), config)
    session = TrainingSession(artifacts, config, artifacts.checkpoint)
    feeds = calibration_batches(1, 8, seed=5)[0]
    target = np.random.default_rng(2).standard_normal((8, 5)).astype(np.float32)
    gradients, outputs = [], []
    for _ in range(steps):
        _, output = session.forward_backward(feeds, target)
        outputs.append(output)
        gradients.append({name: np.asarray(session.state.parameters[name].grad) for name in graph.trainable})
        session.update(1e-2)
    return graph, artifacts, outputs, gradients


@pytest.mark.skipif(library_path() is None, reason="built without a C compiler (the first test checks that case)")
def test_fused_training_matches_onnxruntime_kernels_step_for_step(tmp_path):
    float_model, result = quantized()
    graph, fused_artifacts, fused_outputs, fused_gradients = _trained(result, float_model, True, tmp_path)
    _, plain_artifacts, plain_outputs, plain_gradients = _trained(result, float_model, False, tmp_path)
    passes = sum(node.op_type == "PassThrough" for node in graph.model.graph.node)
    fused_model = onnx.load(fused_artifacts.training_model)
    assert passes > 0
    assert sum(node.op_type == OPERATOR and node.domain == DOMAIN for node in fused_model.graph.node) == passes
    assert sum(node.op_type == FORWARD_OPERATOR and node.domain == DOMAIN for node in fused_model.graph.node) == passes
    assert not any(node.domain == DOMAIN for node in onnx.load(plain_artifacts.training_model).graph.node)
    assert fused_artifacts.custom_operators == library_path() and plain_artifacts.custom_operators is None
    for step, (fused, plain) in enumerate(zip(fused_gradients, plain_gradients)):
        np.testing.assert_allclose(fused_outputs[step], plain_outputs[step], rtol=1e-5, atol=1e-6)
        for name, reference in plain.items():
            # scale gradients are sums of terms of both signs: the float32 ReduceSum and the kernel's double sum
            # differ by a few 1e-4 relative (measured 2.9e-4); weight gradients come out equal
            np.testing.assert_allclose(fused[name], reference, rtol=1e-3, atol=1e-6 * np.max(np.abs(reference)),
                                       err_msg=f"{name} at step {step}")


def test_without_the_library_the_graph_keeps_onnxruntime_kernels(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts_module, "library_path", lambda: None)
    float_model, result = quantized()
    graph = build_fake_quant_graph(result.qdq_model, result.plan, result.parameters, float_model=float_model)
    config = TrainingConfig(loss="mse", trainable=graph.trainable, threads=1)
    artifacts = build_training_artifacts(graph.model, tmp_path, config)
    assert artifacts.custom_operators is None
    model = onnx.load(artifacts.training_model)
    assert not any(node.domain == DOMAIN for node in model.graph.node)
    assert sum(node.op_type == "FakeQuantGrad" for node in model.graph.node) > 0
    session = TrainingSession(artifacts, config, artifacts.checkpoint)
    loss, _ = session.forward_backward(calibration_batches(1, 8, seed=5)[0], np.zeros((8, 5), np.float32))
    assert np.isfinite(loss)


def test_a_group_whose_intermediate_is_read_elsewhere_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts_module, "library_path", lambda: None)  # write the nine-kernel graph
    float_model, result = quantized()
    graph = build_fake_quant_graph(result.qdq_model, result.plan, result.parameters, float_model=float_model)
    artifacts = build_training_artifacts(graph.model, tmp_path, TrainingConfig(loss="mse", trainable=graph.trainable))
    model = onnx.load(artifacts.training_model)
    masks = [node.output[0] for node in model.graph.node
             if node.op_type == "Equal" and "qat_pass_through_Grad/" in node.name]
    model.graph.node.append(helper.make_node("Not", [masks[0]], ["extra_reader"]))
    model.graph.output.append(helper.make_tensor_value_info("extra_reader", TensorProto.BOOL, None))
    onnx.save(model, artifacts.training_model)
    assert fuse_quantizers(artifacts.training_model) == len(masks)  # every forward pair, all gradients but one
    rewritten = onnx.load(artifacts.training_model)
    assert masks[0] in {output for node in rewritten.graph.node for output in node.output}
    assert sum(node.op_type == OPERATOR for node in rewritten.graph.node) == len(masks) - 1
    assert sum(node.op_type == FORWARD_OPERATOR for node in rewritten.graph.node) == len(masks)
    assert fuse_quantizers(artifacts.training_model) == 0  # idempotent: nothing left to fuse


def test_a_forward_pair_without_an_eight_bit_zero_point_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts_module, "library_path", lambda: None)  # write onnxruntime's graph
    float_model, result = quantized()
    graph = build_fake_quant_graph(result.qdq_model, result.plan, result.parameters, float_model=float_model)
    artifacts = build_training_artifacts(graph.model, tmp_path, TrainingConfig(loss="mse", trainable=graph.trainable))
    model = onnx.load(artifacts.training_model)
    quantizes = [node for node in model.graph.node
                 if node.op_type == "QuantizeLinear" and node.domain == "com.microsoft"]
    zero_point = quantizes[0].input[2]
    for tensor in model.graph.initializer:
        if tensor.name == zero_point:  # the kernel knows the code ranges of uint8 and int8 only
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.array(0, np.int16), zero_point))
    onnx.save(model, artifacts.training_model)
    fuse_quantizers(artifacts.training_model)
    rewritten = onnx.load(artifacts.training_model)
    shared = sum(node.op_type == "QuantizeLinear" and node.input[2] == zero_point for node in quantizes)
    remaining = [node for node in rewritten.graph.node if node.op_type == "QuantizeLinear"]
    assert len(remaining) == shared >= 1
    assert sum(node.op_type == FORWARD_OPERATOR for node in rewritten.graph.node) == len(quantizes) - shared
