"""FoldConstants: constant subexpressions and static Shape/Size become initializers, within a size bound."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph.passes.canonicalize.eliminate_dead_code import EliminateDeadCode
from qgraph.passes.canonicalize.eliminate_identity import EliminateIdentity
from qgraph.passes.canonicalize.fold_constants import FoldConstants
from qgraph.passes.canonicalize.lift_constants import LiftConstants
from qgraph.passes.infrastructure import PassManager
from qgraph.testing import check_pass, op_types, to_ir

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


#: The initializers :func:`flatten` reads, in ONNX text.
FLATTEN_CONSTANTS = "int64 zero = {0}, int64[1] axes = {0}, int64[1] rest = {-1}"


def flatten(source: str, output: str) -> str:
    """The exporters' flatten ``output = Reshape(source, Concat(Unsqueeze(Gather(Shape(source), zero)), rest))``
    as lines of ONNX text (it reads the constants ``zero``, ``axes`` and ``rest``, and writes ``target``)."""
    return f"""
      shape = Shape({source})
      batch = Gather(shape, zero)
      batch_1d = Unsqueeze(batch, axes)
      target = Concat<axis = 0>(batch_1d, rest)
      {output} = Reshape({source}, target)"""


def assert_not_folded(text: str, caplog, kept: list[str], reason: str, fold: FoldConstants | None = None) -> None:
    """The pass leaves ``text``'s graph as it is (nodes ``kept``) and logs ``reason``."""
    with caplog.at_level(logging.INFO, logger="qgraph.passes.canonicalize.fold_constants"):
        result = check_pass(text, fold or FoldConstants(), expect_modified=False)
    assert op_types(result.model) == kept
    assert reason in caplog.text


def test_constant_chain_folds_in_one_run_and_unread_inputs_are_dropped():
    text = HEADER + """
    g (float[3] x) => (float[3] y) <float[3] a = {1.0, 2.0, 3.0}, float[3] b = {0.5, 0.5, 0.5}, float c = {4.0}> {
      product = Mul(a, b)
      shifted = Add(product, c)
      root = Sqrt(shifted)
      y = Add(x, root)
    }
    """
    result = check_pass(text, FoldConstants())
    assert op_types(result.model) == ["Add"]
    assert set(result.model.graph.initializers) == {"root"}
    np.testing.assert_allclose(
        result.model.graph.initializers["root"].const_value.numpy(), np.sqrt([4.5, 5.0, 5.5]), rtol=1e-6
    )


def test_static_shape_arithmetic_collapses():
    # The exported pattern: Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])).
    text = HEADER + f"""
    g (float[2,3,4] x) => (float[2,12] y, int64 count) <{FLATTEN_CONSTANTS}> {{
      {flatten("x", "y")}
      count = Size(x)
    }}
    """
    result = check_pass(text, FoldConstants())
    assert op_types(result.model) == ["Reshape"]
    np.testing.assert_array_equal(result.model.graph.initializers["target"].const_value.numpy(), [2, -1])
    assert int(result.model.graph.initializers["count"].const_value.numpy()) == 24
    assert set(result.model.graph.initializers) == {"target", "count"}


@pytest.mark.parametrize("start, end, expected", [(1, None, [3, 4]), (-2, -1, [3]), (0, 10, [2, 3, 4]), (5, None, [])])
def test_shape_start_and_end_follow_onnx_clamping(start, end, expected):
    attributes = f"start = {start}" + (f", end = {end}" if end is not None else "")
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3,4] x) => (int64[{len(expected)}] y) {{
      y = Shape<{attributes}>(x)
    }}
    """
    result = check_pass(text, FoldConstants())
    np.testing.assert_array_equal(result.model.graph.initializers["y"].const_value.numpy(), expected)


def test_shape_of_a_dynamic_dimension_is_not_folded():
    text = HEADER + """
    g (float[N,3] x) => (int64[2] y) {
      y = Shape(x)
    }
    """
    result = check_pass(text, FoldConstants(), expect_modified=False)
    assert op_types(result.model) == ["Shape"]


def test_folded_graph_output_keeps_its_name():
    text = HEADER + """
    g (float[2] x) => (float[2] y, float[2] constant) <float[2] a = {1.0, 4.0}> {
      constant = Sqrt(a)
      y = Add(x, constant)
    }
    """
    result = check_pass(text, FoldConstants())
    assert [output.name for output in result.model.graph.outputs] == ["y", "constant"]
    assert result.model.graph.outputs[1].is_initializer()


def test_big_expand_is_not_folded(caplog):
    # 2048 x 1024 = 2M elements from a scalar: above the default bound of 1M elements.
    text = HEADER + """
    g (float[2048,1024] x) => (float[2048,1024] y) <float one = {1.0}, int64[2] shape = {2048, 1024}> {
      big = Expand(one, shape)
      y = Add(x, big)
    }
    """
    assert_not_folded(text, caplog, ["Expand", "Add"], "max_output_elements")


def test_constant_of_shape_from_a_static_shape_is_bounded():
    text = HEADER + """
    g (float[4,64] x) => (float[4,64] y) {
      shape = Shape(x)
      filler = ConstantOfShape<value = float[1] {2.0}>(shape)
      y = Mul(x, filler)
    }
    """
    bounded = check_pass(text, FoldConstants(max_output_elements=100))
    assert op_types(bounded.model) == ["ConstantOfShape", "Mul"]  # the Shape folded, the 256-element fill did not
    unbounded = check_pass(text, FoldConstants())
    assert op_types(unbounded.model) == ["Mul"]


def test_tile_without_a_declared_shape_is_bounded_through_shape_inference(caplog):
    # Nothing declares the shape of `tiled`: the bound comes from shape inference on the node, repeats as data.
    text = HEADER + """
    g (float[300] x) => (float[300] y) <float[3] a = {1.0, 2.0, 3.0}, int64[1] repeats = {100}> {
      tiled = Tile(a, repeats)
      y = Add(x, tiled)
    }
    """
    assert_not_folded(text, caplog, ["Tile", "Add"], "300 elements", fold=FoldConstants(max_output_elements=50))
    assert op_types(check_pass(text, FoldConstants(max_output_elements=300)).model) == ["Add"]


def test_same_size_rewrite_of_a_large_weight_folds_above_the_bound():
    text = HEADER + """
    g (float[2,8] x) => (float[2,4] y) {
      y = MatMul(x, transposed)
    }
    """
    text = text.replace("{\n      y", "<float[4,8] weight = {" + ", ".join(f"{v:.1f}" for v in range(32)) + "}> {\n"
                        "      transposed = Transpose(weight)\n      y", 1)
    result = check_pass(text, FoldConstants(max_output_elements=10))
    assert op_types(result.model) == ["MatMul"]
    assert result.model.graph.initializers["transposed"].const_value.shape == (8, 4)


@pytest.mark.parametrize("operator", ["RandomNormalLike", "RandomUniformLike", "Bernoulli"])
def test_random_operators_are_not_folded(operator, caplog):
    text = HEADER + f"""
    g (float[3] x) => (float[3] y) <float[3] probabilities = {{0.5, 0.5, 0.5}}, float zero = {{0.0}}> {{
      noise = {operator}(probabilities)
      silenced = Mul(noise, zero)
      y = Add(x, silenced)
    }}
    """
    assert_not_folded(text, caplog, [operator, "Mul", "Add"], "non-deterministic")


def test_dequantize_linear_of_a_weight_is_not_folded(caplog):
    text = HEADER + """
    g (float[3] x) => (float[3] y) <int8[3] quantized = {-7, 0, 100}, float scale = {0.1}, int8 zero_point = {0}> {
      weight = DequantizeLinear(quantized, scale, zero_point)
      y = Mul(x, weight)
    }
    """
    assert_not_folded(text, caplog, ["DequantizeLinear", "Mul"], "quantization")


def test_initializer_that_is_also_a_graph_input_is_not_a_constant():
    text = HEADER + """
    g (float[3] x, float[3] default) => (float[3] y) <float[3] default = {1.0, 2.0, 3.0}> {
      doubled = Add(default, default)
      y = Mul(x, doubled)
    }
    """
    # check_pass feeds its own value for `default`: folding it would give the wrong answer.
    result = check_pass(text, FoldConstants(), expect_modified=False)
    assert op_types(result.model) == ["Add", "Mul"]


def test_non_default_domain_and_subgraph_operators_are_not_folded():
    text = """
    <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[3] x) => (float[3] y) <float[3] a = {1.0, -2.0, 3.0}, bool condition = {1}> {
      activated = com.microsoft.Gelu(a)
      chosen = If(condition) <
        then_branch = then_graph () => (float[3] then_out) { then_out = Neg(a) },
        else_branch = else_graph () => (float[3] else_out) { else_out = Abs(a) }
      >
      sum = Add(activated, chosen)
      y = Add(x, sum)
    }
    """
    result = check_pass(text, FoldConstants())
    assert op_types(result.model) == ["Gelu", "If", "Add", "Add"]
    # Inside the If branches, constant expressions fold into initializers of the branch.
    if_node = list(result.model.graph)[1]
    for branch in ("then_branch", "else_branch"):
        graph = if_node.attributes[branch].as_graph()
        assert len(graph) == 0 and len(graph.initializers) == 1


def test_nothing_constant_reports_unmodified():
    text = HEADER + """
    g (float[3] x) => (float[3] y) <float[3] a = {1.0, 2.0, 3.0}> {
      product = Mul(x, a)
      y = Relu(product)
    }
    """
    result = check_pass(text, FoldConstants(), expect_modified=False)
    assert op_types(result.model) == ["Mul", "Relu"]


def test_integer_and_boolean_expressions_fold_with_their_types():
    text = HEADER + """
    g (int64[3] x) => (int64[3] y, bool[3] mask) <int64[3] a = {1, 2, 3}, int64[3] b = {3, 2, 1}> {
      mask = Greater(a, b)
      smallest = Min(a, b)
      y = Add(x, smallest)
    }
    """
    result = check_pass(text, FoldConstants())
    initializers = result.model.graph.initializers
    assert initializers["mask"].const_value.numpy().dtype == np.bool_
    assert initializers["smallest"].const_value.numpy().dtype == np.int64


def test_exported_model_collapses_through_the_cleanup_passes():
    # What a Paddle-style export looks like: weights in Constant nodes, flatten through Shape arithmetic,
    # an Identity on the way out and a dead branch. Shape inference (done by qgraph's loader) supplies the
    # static shape of the Conv output that Shape folds from.
    weight = ", ".join(f"{value:.2f}" for value in np.linspace(-1, 1, 2 * 3 * 3 * 3))
    text = HEADER + f"""
    g (float[1,3,4,4] x) => (float[1,32] y) {{
      weight = Constant<value = float[2,3,3,3] {{{weight}}}>()
      bias = Constant<value_floats = [0.1, -0.2]>()
      zero = Constant<value = int64 {{0}}>()
      axes = Constant<value_ints = [0]>()
      rest = Constant<value_ints = [-1]>()
      conv = Conv<pads = [1, 1, 1, 1]>(x, weight, bias)
      {flatten("conv", "flat")}
      unused = Exp(flat)
      y = Identity(flat)
    }}
    """
    model = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text))
    passes = [LiftConstants(), EliminateIdentity(), FoldConstants(), EliminateDeadCode()]
    result = PassManager(passes, fixed_point=True, verify=True, verify_rtol=1e-5, verify_atol=1e-6).run(to_ir(model))
    assert op_types(result.model) == ["Conv", "Reshape"]
    assert set(result.model.graph.initializers) == {"weight", "bias", "target"}
    assert result.model.graph.outputs[0].name == "y"
    check_pass(ir.serde.serialize_model(result.model), FoldConstants(), expect_modified=False)
