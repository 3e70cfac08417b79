"""Weight-only quantization: block math, packing, GPTQ's Hessian and algorithm, AWQ, the passes through
onnxruntime, the KV-cache calibration feeds, the driver and the command line's refusals."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from qgraph import runtime
from qgraph.errors import DataError, QGraphError
from qgraph.models.decoder import DecoderConfig, build_decoder, prefill_feeds, random_weights
from qgraph.passes.lower.lower_matmul_nbits import LowerMatMulNBits
from qgraph.passes.quantize.apply_input_channel_scales import ApplyInputChannelScales
from qgraph.passes.quantize.quantize_weights_blockwise import QuantizeWeightsBlockwise
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.quant.blockwise import (
    BlockSpec,
    dequantize_matmul_nbits,
    pack_matmul_nbits,
)
from qgraph.testing import to_ir
from qgraph.weight_only.awq import clip_search, output_error, search_scales
from qgraph.weight_only.driver import quantize_weight_only
from qgraph.weight_only.feeds import complete_feeds, model_inputs
from qgraph.weight_only.gptq import ADD_COLUMNS, HessianAccumulator, factor_hessian, quantize_gptq
from qgraph.weight_only.options import WeightOnlyOptions
from qgraph.weight_only.rtn import quantize_rtn


def _weight(rows, columns, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(rows, columns)) * rng.uniform(0.2, 2.0, (rows, 1))).astype(np.float32)


# --- blocks and packing -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("rows", [64, 72, 40])
def test_rtn_codes_and_dequantization_by_the_formula(symmetric, rows):
    spec = BlockSpec(4, 32, symmetric)
    weight = _weight(rows, 6)
    quantized = quantize_rtn(weight, spec)
    assert quantized.scales.shape == (-(-rows // 32), 6)
    assert quantized.codes.min() >= spec.qmin and quantized.codes.max() <= spec.qmax
    for block in range(quantized.n_blocks):
        part = weight[block * 32:(block + 1) * 32]
        low, high = np.minimum(part.min(0), 0), np.maximum(part.max(0), 0)
        if symmetric:
            scale = np.maximum(high / 7, -low / 8)
            np.testing.assert_allclose(quantized.scales[block], scale, rtol=1e-6)
        else:
            np.testing.assert_allclose(quantized.scales[block], (high - low) / 15, rtol=1e-6)
        # every weight within half a step of its dequantized value
        deq = quantized.dequantize()[block * 32:(block + 1) * 32]
        assert np.all(np.abs(deq - part) <= quantized.scales[block] / 2 + 1e-6)


def test_partial_last_block_is_quantized_from_its_own_rows():
    """K = 72 with blocks of 32: the last block's parameters come from its 8 rows, as if quantized alone."""
    spec = BlockSpec(4, 32, False)
    weight = _weight(72, 5)
    weight[64:] *= 0.01  # a tiny last block: padding with anything but zeros would widen its range
    quantized = quantize_rtn(weight, spec)
    alone = quantize_rtn(np.concatenate([weight[64:], np.zeros((24, 5), np.float32)]), spec)
    np.testing.assert_array_equal(quantized.scales[2], alone.scales[0])
    np.testing.assert_array_equal(quantized.codes[64:], alone.codes[:8])
    assert np.max(np.abs(quantized.dequantize()[64:] - weight[64:])) < 0.01 * np.abs(weight).max() / 15


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("rows,block", [(64, 16), (72, 32), (96, 32), (100, 64)])
def test_packed_weights_equal_numpy_dequantization_element_by_element(symmetric, rows, block):
    quantized = quantize_rtn(_weight(rows, 7), BlockSpec(4, block, symmetric))
    packed, scales, zero = pack_matmul_nbits(quantized)
    count = -(-rows // block)
    assert packed.shape == (7, count, block // 2) and packed.dtype == np.uint8
    assert scales.shape == (7 * count,)
    assert (zero is None) == symmetric
    if zero is not None:
        assert zero.shape == (7 * -(-count // 2),)
    np.testing.assert_array_equal(dequantize_matmul_nbits(packed, scales, zero, rows, block), quantized.dequantize())
    # the nibble order itself: column 0, block 0, first byte holds codes 0 (low) and 1 (high)
    codes = quantized.codes + (8 if symmetric else 0)
    assert packed[0, 0, 0] == codes[0, 0] | (codes[1, 0] << 4)


def test_mse_clip_never_worse_than_plain_rtn():
    weight = _weight(128, 16)
    weight[5, :] *= 8  # outliers
    spec = BlockSpec(4, 32, False)
    plain = np.sum((quantize_rtn(weight, spec).dequantize() - weight) ** 2)
    clipped = np.sum((quantize_rtn(weight, spec, mse_clip=True).dequantize() - weight) ** 2)
    assert clipped <= plain


def test_block_size_is_checked():
    for size in (8, 48, 512):
        with pytest.raises(QGraphError, match="--block-size"):
            BlockSpec(4, size)
        with pytest.raises(QGraphError, match="--block-size"):
            WeightOnlyOptions(block_size=size)
    with pytest.raises(QGraphError, match="--weight-bits"):
        WeightOnlyOptions(bits=3)


# --- GPTQ ---------------------------------------------------------------------------------------------------------

def test_hessian_accumulation_equals_the_batch_formula():
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(size, 5, 24)).astype(np.float32) for size in (3, 1, 4)]
    accumulator = HessianAccumulator(24)
    for batch in batches:
        accumulator.add(batch)
    everything = np.concatenate([batch.reshape(-1, 24) for batch in batches]).astype(np.float64)
    np.testing.assert_allclose(accumulator.hessian, 2 * everything.T @ everything, rtol=1e-12)
    np.testing.assert_allclose(accumulator.mean_absolute, np.abs(everything).mean(0), rtol=1e-12)
    assert accumulator.count == 40


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_has_lower_output_error_than_rtn(act_order):
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(512, 64)) @ rng.normal(size=(64, 64))  # correlated inputs
    accumulator = HessianAccumulator(64)
    accumulator.add(inputs)
    weight = _weight(64, 32)
    spec = BlockSpec(4, 32, False)
    rtn = quantize_rtn(weight, spec).dequantize()
    gptq = quantize_gptq(weight, accumulator.hessian, spec, act_order=act_order, lazy_batch=32).dequantize()
    assert output_error(weight, gptq, accumulator.hessian) < 0.8 * output_error(weight, rtn, accumulator.hessian)


def test_gptq_lazy_batches_equal_row_by_row_updates():
    rng = np.random.default_rng(2)
    accumulator = HessianAccumulator(64)
    accumulator.add(rng.normal(size=(256, 64)))
    weight, spec = _weight(64, 8), BlockSpec(4, 16, True)
    small = quantize_gptq(weight, accumulator.hessian, spec, act_order=False, lazy_batch=16)
    large = quantize_gptq(weight, accumulator.hessian, spec, act_order=False, lazy_batch=64)
    np.testing.assert_array_equal(small.codes, large.codes)


def test_hessian_accumulation_in_column_chunks_equals_the_batch_formula():
    size = ADD_COLUMNS + 188  # two chunks, the second partial
    rows = np.random.default_rng(5).normal(size=(2, 30, size)).astype(np.float32)
    accumulator = HessianAccumulator(size)
    accumulator.add(rows[0])
    accumulator.add(rows[1])
    everything = rows.reshape(-1, size).astype(np.float64)
    np.testing.assert_allclose(accumulator.sum_outer, everything.T @ everything, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("act_order", [False, True])
def test_hessian_factor_is_the_cholesky_factor_of_the_inverse(act_order):
    rng = np.random.default_rng(6)
    inputs = rng.normal(size=(300, 48)) @ rng.normal(size=(48, 48))
    inputs[:, 7] = 0.0  # an input that never fires
    accumulator = HessianAccumulator(48)
    accumulator.add(inputs)
    factor = factor_hessian(accumulator.sum_outer, dampening=0.01, act_order=act_order, scale=2.0)
    hessian = accumulator.hessian.copy()
    assert factor.dead[7] and factor.dead.sum() == 1
    hessian[7, 7] = 1.0
    hessian[np.diag_indices(48)] += 0.01 * np.mean(np.diag(hessian))
    if act_order:
        assert list(factor.order) == list(np.argsort(-np.diag(hessian), kind="stable"))
    else:
        assert list(factor.order) == list(range(48))
    permuted = hessian[np.ix_(factor.order, factor.order)]
    np.testing.assert_array_equal(factor.upper, np.triu(factor.upper))
    assert np.all(np.diag(factor.upper) > 0)
    np.testing.assert_allclose(factor.upper.T @ factor.upper, np.linalg.inv(permuted), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.linalg.cholesky(np.linalg.inv(permuted)).T, factor.upper, rtol=1e-8, atol=1e-12)


def test_gptq_with_a_shared_factor_equals_gptq_per_column_slice():
    rng = np.random.default_rng(7)
    accumulator = HessianAccumulator(64)
    accumulator.add(rng.normal(size=(256, 64)) @ rng.normal(size=(64, 64)))
    weight, spec = _weight(64, 24), BlockSpec(4, 32, False)
    whole = quantize_gptq(weight, accumulator.hessian, spec)
    factor = factor_hessian(accumulator.sum_outer, scale=2.0)
    for columns in (slice(0, 10), slice(10, 24)):
        part = quantize_gptq(weight[:, columns], None, spec, factor=factor)
        np.testing.assert_array_equal(part.codes, whole.codes[:, columns])
        np.testing.assert_array_equal(part.scales, whole.scales[:, columns])
    with pytest.raises(ValueError, match="Hessian or its factor"):
        quantize_gptq(weight, None, spec)


# --- AWQ ----------------------------------------------------------------------------------------------------------

def test_awq_scales_reduce_output_error_on_outlier_channels():
    rng = np.random.default_rng(3)
    inputs = rng.normal(size=(1024, 64))
    inputs[:, :4] *= 30.0  # activation outliers
    accumulator = HessianAccumulator(64)
    accumulator.add(inputs)
    weight = _weight(64, 32)
    scales, alpha, ratio = search_scales(weight, accumulator.mean_absolute, accumulator.hessian, BlockSpec(4, 32))
    assert alpha > 0 and ratio < 0.9
    assert scales[:4].mean() > scales[4:].mean()


def test_awq_clipping_search_lowers_the_output_error_and_is_never_worse():
    rng = np.random.default_rng(8)
    inputs = rng.normal(size=(1024, 64)) * rng.uniform(0.2, 3.0, 64)
    accumulator = HessianAccumulator(64)
    accumulator.add(inputs)
    weight = rng.standard_t(3, size=(64, 48)).astype(np.float32)  # heavy tails: clipping pays
    spec = BlockSpec(4, 32, False)
    plain = quantize_rtn(weight, spec)
    clipped = clip_search(weight, accumulator.sum_outer, spec)
    assert clipped.codes.shape == plain.codes.shape
    assert np.any(clipped.scales < plain.scales)
    error = output_error(weight, clipped.dequantize(), accumulator.hessian)
    assert error < 0.95 * output_error(weight, plain.dequantize(), accumulator.hessian)
    uniform = rng.uniform(-1, 1, size=(64, 48)).astype(np.float32)  # nothing to clip: at worst RTN itself
    assert output_error(uniform, clip_search(uniform, accumulator.sum_outer, spec).dequantize(),
                        accumulator.hessian) <= output_error(uniform, quantize_rtn(uniform, spec).dequantize(),
                                                             accumulator.hessian)


def _matmul_model(producer: str) -> str:
    return f"""
    <ir_version: 8, opset_import: ["" : 21]>
    g (float[2, 8] x) => (float[2, 4] y, float[2, 4] z) {{
        {producer}
        y = MatMul(h, wq)
        z = MatMul(h, wk)
    }}
    """


@pytest.mark.parametrize("producer,fold", [
    ("h = Mul(gamma, x)", "Mul"),
    ("h = LayerNormalization(x, gamma, beta)", "LayerNormalization"),
    ("h = Relu(x)", "explicit"),
])
def test_apply_input_channel_scales_keeps_outputs(producer, fold):
    rng = np.random.default_rng(4)
    model = onnx.parser.parse_model(_matmul_model(producer))
    for name, shape in (("gamma", (8,)), ("beta", (8,)), ("wq", (8, 4)), ("wk", (8, 4))):
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name))
    feeds = {"x": rng.normal(size=(2, 8)).astype(np.float32)}
    before = runtime.run(runtime.create_session(model), feeds)
    ir_model = ir.serde.deserialize_model(model)
    scales = rng.uniform(0.5, 4.0, 8)
    result = ApplyInputChannelScales(scales={"h": scales})(ir_model)
    assert result.modified
    ops = [node.op_type for node in ir_model.graph]
    assert ops.count("Mul") == (0 if fold == "LayerNormalization" else 1)
    assert (ops[1] == "Mul") == (fold == "explicit")
    proto = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(proto, full_check=True)
    after = runtime.run(runtime.create_session(proto), feeds)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-5)
    assert not ApplyInputChannelScales(scales={"h": scales})(ir_model).modified


# --- passes through onnxruntime -----------------------------------------------------------------------------------

def _single_matmul(rows, columns, seed=0):
    weight = _weight(rows, columns, seed)
    model = onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 21]>
    g (float[3, {rows}] x) => (float[3, {columns}] y) {{ y = MatMul(x, w) }}
    """)
    model.graph.node[0].name = "mm"
    model.graph.initializer.append(onnx.numpy_helper.from_array(weight, "w"))
    return model, weight


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("rows", [64, 80])
def test_matmul_nbits_equals_dequantize_matmul_through_onnxruntime(symmetric, rows):
    model, weight = _single_matmul(rows, 12)
    quantized = quantize_rtn(weight, BlockSpec(4, 32, symmetric))
    feeds = {"x": np.random.default_rng(5).normal(size=(3, rows)).astype(np.float32)}
    ir_model = ir.serde.deserialize_model(model)
    assert QuantizeWeightsBlockwise(weights={"mm": quantized})(ir_model).modified
    assert [node.op_type for node in ir_model.graph] == ["DequantizeLinear", "MatMul"]
    qdq = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(qdq, full_check=True)
    qdq_out = runtime.run(runtime.create_session(qdq), feeds)["y"]
    np.testing.assert_allclose(qdq_out, feeds["x"] @ quantized.dequantize(), rtol=1e-5, atol=1e-5)
    assert not QuantizeWeightsBlockwise(weights={"mm": quantized})(ir_model).modified
    assert LowerMatMulNBits()(ir_model).modified
    assert [node.op_type for node in ir_model.graph] == ["MatMulNBits"]
    lowered = ir.serde.serialize_model(ir_model)
    nbits_out = runtime.run(runtime.create_session(lowered), feeds)["y"]
    np.testing.assert_allclose(nbits_out, qdq_out, rtol=1e-5, atol=1e-5)
    assert not LowerMatMulNBits()(ir_model).modified


def test_eight_bit_weights_stay_dequantize_linear():
    model, weight = _single_matmul(64, 8)
    quantized = quantize_rtn(weight, BlockSpec(8, 32, True))
    ir_model = ir.serde.deserialize_model(model)
    QuantizeWeightsBlockwise(weights={"mm": quantized})(ir_model)
    assert not LowerMatMulNBits()(ir_model).modified
    session = runtime.create_session(ir.serde.serialize_model(ir_model))
    out = runtime.run(session, {"x": np.eye(3, 64, dtype=np.float32)})
    np.testing.assert_allclose(out["y"], quantized.dequantize()[:3], rtol=1e-6)


def test_quantize_refuses_below_opset_21():
    model, weight = _single_matmul(64, 8)
    model.opset_import[0].version = 17
    ir_model = ir.serde.deserialize_model(model)
    assert not QuantizeWeightsBlockwise(weights={"mm": quantize_rtn(weight, BlockSpec())})(ir_model).modified


# --- feeds and the driver on the decoder ----------------------------------------------------------------------------

CONFIG = DecoderConfig(hidden_size=64, num_layers=2, intermediate_size=160, vocab_size=128)


@pytest.fixture(scope="module")
def decoder():
    return build_decoder(CONFIG, random_weights(CONFIG))


def test_empty_past_is_built_and_partial_past_named(decoder):
    inputs = model_inputs(decoder)
    feeds = complete_feeds(inputs, {"input_ids": np.ones((2, 5), np.int64)})
    assert feeds["past_key_values.1.value"].shape == (2, CONFIG.num_heads, 0, CONFIG.head_dim)
    np.testing.assert_array_equal(feeds["position_ids"], [[0, 1, 2, 3, 4]] * 2)
    assert feeds["attention_mask"].shape == (2, 5)
    with pytest.raises(DataError, match="past_key_values.0.value"):
        complete_feeds(inputs, {"input_ids": np.ones((2, 5), np.int64),
                                "past_key_values.0.key": np.zeros((2, 4, 0, 16), np.float32)})


def _calibration(count=3):
    rng = np.random.default_rng(6)
    return [{"input_ids": rng.integers(0, CONFIG.vocab_size, (4, 24))} for _ in range(count)]


@pytest.mark.parametrize("algorithm,options", [("rtn", {}), ("gptq", {}), ("gptq", {"sequential": True}),
                                               ("awq", {}), ("awq", {"awq_then": "gptq", "format": "qdq"})])
def test_driver_on_the_decoder(decoder, algorithm, options):
    canonical = optimize(ir.serde.deserialize_model(decoder)).model
    result = quantize_weight_only(canonical, _calibration() if algorithm != "rtn" else None,
                                  WeightOnlyOptions(algorithm=algorithm, block_size=32, **options))
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto)
    ops = [node.op_type for node in proto.graph.node]
    expected_op = "DequantizeLinear" if options.get("format") == "qdq" else "MatMulNBits"
    assert ops.count(expected_op) == 2 * 7 + 1  # 7 per layer and the LM head
    ids = np.random.default_rng(7).integers(0, CONFIG.vocab_size, (1, 16))
    reference = runtime.run(runtime.create_session(decoder), prefill_feeds(CONFIG, ids))["logits"]
    logits = runtime.run(runtime.create_session(proto), prefill_feeds(CONFIG, ids))["logits"]
    assert np.linalg.norm(logits - reference) / np.linalg.norm(reference) < 0.6
    assert len(result.layers) == 15


def test_gptq_without_calibration_names_calib(decoder):
    with pytest.raises(QGraphError, match="--calib"):
        quantize_weight_only(to_ir(decoder), None, WeightOnlyOptions(algorithm="gptq"))


def test_four_bit_file_is_at_most_030_of_fp32(tmp_path):
    config = DecoderConfig(hidden_size=128, num_layers=2, intermediate_size=352, vocab_size=512)
    source = tmp_path / "decoder.onnx"
    onnx.save(build_decoder(config, random_weights(config)), source)
    output = tmp_path / "decoder.q4.onnx"
    optimize(source, output, OptimizeOptions(
        weight_only=WeightOnlyOptions(quantize_embeddings=True, block_size=32)))
    assert output.stat().st_size <= 0.30 * source.stat().st_size
    # the lookup reads the table's codes, not a DequantizeLinear of the whole table on every call
    written = onnx.load(output)
    producers = {name: node.op_type for node in written.graph.node for name in node.output}
    lookups = [node for node in written.graph.node if node.op_type == "Gather" and node.input[1] == "input_ids"]
    assert lookups and all(producers.get(node.input[0]) != "DequantizeLinear" for node in lookups)


def test_cli_refusals(tmp_path, decoder):
    from qgraph.cli import cli as main

    source = tmp_path / "decoder.onnx"
    onnx.save(decoder, source)
    runner = CliRunner()
    result = runner.invoke(main, ["optimize", str(source), "-o", str(tmp_path / "q.onnx"), "--weight-only",
                                  "--algorithm", "gptq"])
    assert result.exit_code != 0 and "--calib" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["optimize", str(source), "-o", str(tmp_path / "q.onnx"), "--weight-only",
                                  "--block-size", "48"])
    assert result.exit_code != 0 and "--block-size" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["optimize", str(source), "-o", str(tmp_path / "q.onnx"), "--block-size", "32"])
    assert result.exit_code != 0 and "--weight-only" in result.output
    result = runner.invoke(main, ["optimize", str(source), "-o", str(tmp_path / "q.onnx"), "--weight-only"])
    assert result.exit_code == 0, result.output
    assert "MatMulNBits" in {node.op_type for node in onnx.load(tmp_path / "q.onnx").graph.node}
