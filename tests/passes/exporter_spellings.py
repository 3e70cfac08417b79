"""Builders of decomposed LayerNorm and GELU as exporters write them, for the fusion tests.

Each builder reproduces one exporter's node sequence with onnx.helper (constants as initializers, which is what
LiftConstants leaves), and takes keyword switches for the variants and the broken forms the fusions must refuse.

- torch.onnx LayerNorm (opset < 17): ReduceMean → Sub → Pow(2) → ReduceMean → Add(eps) → Sqrt → Div → Mul → Add;
- tf2onnx LayerNorm: ReduceMean, SquaredDifference as its own Sub → Mul(d, d), ReduceMean, Add(eps), Rsqrt as
  Sqrt → Reciprocal, a second Sub(x, mean) multiplied by it, then Mul(gamma) and Add(beta);
- torch.onnx GELU (opset < 20): Div(x, 1.4142135) → Erf → Add(1) → Mul(x, ·) → Mul(·, 0.5); tanh approximation
  Mul(x, Mul(x, x)) or Pow(x, 3) → Mul(0.044715) → Add(x) → Mul(0.7978845608) → Tanh → Add(1) → Mul(0.5 x, ·).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from qgraph.models.common import ProtoGraph


class _Builder(ProtoGraph):
    """Nodes named ``<Op>_<n>`` as the exporters write them, constants stored as float32."""

    def __init__(self) -> None:
        super().__init__()
        self.counter = 0

    def constant(self, name: str, value) -> str:
        array = np.asarray(value)
        return self.add_initializer(name, array.astype(np.float32) if array.dtype == np.float64 else array)

    def node(self, op_type: str, inputs: list[str], output: str | None = None, **attributes) -> str:
        self.counter += 1
        output = output or f"{op_type.lower()}_{self.counter}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"{op_type}_{self.counter}", **attributes))
        return output

    def model(
        self,
        name: str,
        opset: int,
        inputs: list[tuple[str, list]],
        outputs: list[tuple[str, list | None]],
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape) for input_name, shape in inputs],
            [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, shape) for output_name, shape in outputs],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
        return onnx.shape_inference.infer_shapes(model)


def _reduce_mean(builder: _Builder, data: str, axes: list[int], opset: int, keepdims: int, output=None) -> str:
    if opset >= 18:
        axes_name = builder.constant(f"axes_{builder.counter + 1}", np.array(axes, np.int64))
        return builder.node("ReduceMean", [data, axes_name], output, keepdims=keepdims)
    return builder.node("ReduceMean", [data], output, axes=axes, keepdims=keepdims)


def layer_norm(
    spelling: str = "torch",
    *,
    opset: int = 17,
    shape: tuple[int | str, ...] = (2, 5, 16),
    normalized_axes: int = 1,
    axes: list[int] | None = None,
    variance_axes: list[int] | None = None,
    affine: str = "both",
    epsilon: float = 1e-5,
    epsilon_after_sqrt: bool = False,
    keepdims: int = 1,
    scale_as_input: bool = False,
    mean_fan_out: bool = False,
    swap_operands: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """A decomposed LayerNorm over the last ``normalized_axes`` axes of ``x``.

    ``spelling``: ``torch`` (Sub, Pow(2), Div), ``mul_square`` (Sub, Mul(d, d), Div), ``tf2onnx`` (two Subs, Mul(d, d),
    Sqrt → Reciprocal → Mul). ``affine``: ``both``, ``scale`` (Mul only), ``none``. The remaining switches build the
    forms a fusion must refuse.
    """
    generator = np.random.default_rng(seed)
    rank = len(shape)
    builder = _Builder()
    normalized_shape = [dim for dim in shape[rank - normalized_axes:]]
    axes = axes if axes is not None else list(range(-normalized_axes, 0))
    variance_axes = variance_axes if variance_axes is not None else axes

    def ordered(first: str, second: str) -> list[str]:
        return [second, first] if swap_operands else [first, second]

    mean = _reduce_mean(builder, "x", axes, opset, keepdims, "mean")
    centred = builder.node("Sub", ["x", mean], "centred")
    if spelling == "torch":
        two = builder.constant("two", np.float32(2.0))
        square = builder.node("Pow", [centred, two], "square")
    else:
        square = builder.node("Mul", [centred, centred], "square")
    variance = _reduce_mean(builder, square, variance_axes, opset, keepdims, "variance")
    epsilon_name = builder.constant("epsilon", np.float32(epsilon))
    if epsilon_after_sqrt:
        deviation = builder.node("Sqrt", [variance], "deviation_without_epsilon")
        deviation = builder.node("Add", ordered(deviation, epsilon_name), "deviation")
    else:
        shifted = builder.node("Add", ordered(variance, epsilon_name), "variance_plus_epsilon")
        deviation = builder.node("Sqrt", [shifted], "deviation")
    if spelling == "tf2onnx":
        inverse = builder.node("Reciprocal", [deviation], "inverse_deviation")
        numerator = builder.node("Sub", ["x", mean], "centred_again")
        normalized = builder.node("Mul", ordered(numerator, inverse), "normalized")
    else:
        normalized = builder.node("Div", [centred, deviation], "normalized")
    inputs: list[tuple[str, list]] = [("x", list(shape))]
    output = normalized
    if affine in ("both", "scale"):
        scale_array = (1.0 + 0.1 * generator.standard_normal(normalized_shape)).astype(np.float32)
        if scale_as_input:
            inputs.append(("gamma", normalized_shape))
            scale = "gamma"
        else:
            scale = builder.constant("gamma", scale_array)
        output = builder.node("Mul", ordered(output, scale), "scaled")
    if affine == "both":
        bias = builder.constant("beta", (0.1 * generator.standard_normal(normalized_shape)).astype(np.float32))
        output = builder.node("Add", ordered(output, bias), "y")
    outputs = [(output, list(shape))]
    if mean_fan_out:
        builder.node("Identity", [mean], "mean_copy")
        outputs.append(("mean_copy", None))
    return builder.model(f"layer_norm_{spelling}", opset, inputs, outputs)


ERF_SCALE = math.sqrt(2.0)
TANH_SCALE = math.sqrt(2.0 / math.pi)
TANH_CUBIC = 0.044715


def _times_half(builder: _Builder, half: str, shifted: str, ordered, *, half_leads: bool) -> str:
    """``y = x · shifted · 0.5`` in the order ``half`` names: ``after`` (``Mul(Mul(x, shifted), 0.5)``), ``before``
    (``Mul(Mul(x, 0.5), shifted)``, or ``Mul(0.5, x)`` first with ``half_leads``, as torch writes the tanh GELU) or
    ``on_sum`` (``Mul(Mul(shifted, 0.5), x)``); ``ordered`` orders each commutative pair of operands."""
    half_name = builder.constant("half", np.float32(0.5))
    if half == "after":
        product = builder.node("Mul", ordered("x", shifted), "x_times_sum")
        return builder.node("Mul", ordered(product, half_name), "y")
    if half == "before":
        half_x = builder.node("Mul", ordered(half_name, "x") if half_leads else ordered("x", half_name), "half_x")
        return builder.node("Mul", ordered(half_x, shifted), "y")
    half_sum = builder.node("Mul", ordered(shifted, half_name), "half_sum")
    return builder.node("Mul", ordered(half_sum, "x"), "y")


def gelu_erf(
    *,
    opset: int = 17,
    shape: tuple[int | str, ...] = (3, 32),
    multiply_by_inverse: bool = False,
    half: str = "after",
    swap_operands: bool = False,
    scale: float | None = None,
    one: float = 1.0,
    x_fan_out_from_inside: bool = False,
) -> onnx.ModelProto:
    """``x · 0.5 · (1 + erf(x / √2))`` as torch.onnx writes it (``half="after"``: ``Mul(Mul(x, p), 0.5)``).

    ``multiply_by_inverse``: ``Mul(x, 0.70710678)`` instead of ``Div(x, 1.4142135)``; ``half``: ``after``,
    ``before`` (``Mul(Mul(x, 0.5), p)``) or ``on_sum`` (``Mul(Mul(p, 0.5), x)``); ``swap_operands`` flips every
    commutative operand order. ``scale``/``one`` override the constants (a near-GELU).
    """
    builder = _Builder()

    def ordered(first: str, second: str) -> list[str]:
        return [second, first] if swap_operands else [first, second]

    if multiply_by_inverse:
        inverse = builder.constant("inverse_sqrt2", np.float32(1.0 / (scale or ERF_SCALE)))
        scaled = builder.node("Mul", ordered("x", inverse), "scaled")
    else:
        divisor = builder.constant("sqrt2", np.float32(scale or ERF_SCALE))
        scaled = builder.node("Div", ["x", divisor], "scaled")
    erf = builder.node("Erf", [scaled], "erf")
    one_name = builder.constant("one", np.float32(one))
    shifted = builder.node("Add", ordered(erf, one_name), "one_plus_erf")
    output = _times_half(builder, half, shifted, ordered, half_leads=False)
    outputs = [(output, list(shape))]
    if x_fan_out_from_inside:
        builder.node("Identity", [erf], "erf_copy")
        outputs.append(("erf_copy", list(shape)))
    return builder.model("gelu_erf", opset, [("x", list(shape))], outputs)


def gelu_tanh(
    *,
    opset: int = 17,
    shape: tuple[int | str, ...] = (3, 32),
    cube: str = "mul",
    swap_operands: bool = False,
    cubic: float = TANH_CUBIC,
    scale: float = TANH_SCALE,
    half: str = "before",
) -> onnx.ModelProto:
    """``0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))``: torch.onnx's ``Mul(x, Mul(x, x))`` (``cube="mul"``)
    or Hugging Face's ``Pow(x, 3)`` (``cube="pow"``); ``half`` as for :func:`gelu_erf` (torch: ``before``)."""
    builder = _Builder()

    def ordered(first: str, second: str) -> list[str]:
        return [second, first] if swap_operands else [first, second]

    if cube == "pow":
        three = builder.constant("three", np.float32(3.0))
        cubed = builder.node("Pow", ["x", three], "cubed")
    else:
        squared = builder.node("Mul", ["x", "x"], "squared")
        cubed = builder.node("Mul", ordered("x", squared), "cubed")
    cubic_name = builder.constant("cubic", np.float32(cubic))
    weighted = builder.node("Mul", ordered(cubed, cubic_name), "weighted_cube")
    inner = builder.node("Add", ordered("x", weighted), "inner")
    scale_name = builder.constant("tanh_scale", np.float32(scale))
    argument = builder.node("Mul", ordered(inner, scale_name), "tanh_argument")
    tanh = builder.node("Tanh", [argument], "tanh")
    one_name = builder.constant("one", np.float32(1.0))
    shifted = builder.node("Add", ordered(tanh, one_name), "one_plus_tanh")
    output = _times_half(builder, half, shifted, ordered, half_leads=True)
    return builder.model("gelu_tanh", opset, [("x", list(shape))], [(output, list(shape))])
