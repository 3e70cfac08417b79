"""Deploy parity: the written model on onnxruntime's real integer kernels against the QDQ simulation, per tensor.

The QDQ graph that quantization builds is the *simulation*: run with onnxruntime's graph optimisations off, every
QuantizeLinear computes ``q = saturate(round(x / s) + z)`` in float and every DequantizeLinear ``(q − z)·s``; that is
the arithmetic the quantizer reasoned about. The *deployed* model is the lowered one (QLinearConv, QLinearMatMul,
MatMulInteger, MatMulNBits, ...) run at full optimisation, where onnxruntime adds its own QDQ fusions; its kernels
requantize with fixed-point multipliers and their own rounding, so a one-step difference is expected, anything
larger means a kernel computes something else.

The lowering passes keep each QuantizeLinear output's name for the integer tensor that replaces it
(``take_over`` in :mod:`qgraph.passes.lower._qdq_patterns`), so the quantized tensor ``y`` of the QDQ graph is the
tensor ``y`` of the lowered graph. Both models get those tensors as extra graph outputs and run on the same
batches. For each tensor, with ``q`` the simulation's codes and ``p`` the deployed ones (both integers in the Q's
code space, ``p`` shifted by 128 where the lowering turned int8 into uint8 or back):

- ``max_steps = max |q − p|``: the largest difference in quantization steps;
- ``sqnr_db = 10·log10(Σ x̂² / Σ (x̂ − x̃)²)`` with ``x̂ = (q − z)·s`` and ``x̃ = (p − z)·s``.

Differences propagate: a one-step rounding difference early on grows through the layers after it, so compared
end to end a deep network drifts by a few steps without any kernel being wrong. Each layer is therefore also judged
*in isolation*: in a second copy of the lowered model every reader of a compared tensor reads a new graph input
instead, fed with the simulation's codes, so each kernel (or each cluster onnxruntime fuses between two quantized
tensors) sees exactly the inputs the simulation saw. ``max_steps`` is the isolated difference, which the flag uses;
``end_to_end_max_steps`` and ``end_to_end_sqnr_db`` are the drift of the whole deployed model.

A tensor whose ``max_steps`` exceeds the tolerance (one step) is flagged. Reading a tensor as a graph output keeps
onnxruntime from fusing it away, so the deployed model is observed at each quantized tensor the lowering kept; a
tensor the lowering removed (a redundant requantization) is not compared.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from qgraph import runtime
from qgraph.quant.numerics import power_ratio_db

logger = logging.getLogger(__name__)

#: Differences up to this many quantization steps are rounding; more is flagged.
DEFAULT_TOLERANCE_STEPS = 1

_EIGHT_BIT = {onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8}


@dataclasses.dataclass(frozen=True)
class TensorParity:
    """One quantized tensor: the simulation's codes against the deployed kernels' codes."""

    tensor: str
    #: The node of the lowered model that writes the tensor (``op_type name``).
    producer: str
    #: Largest difference in steps with the layer fed the simulation's inputs (see the module docstring).
    max_steps: int
    #: Fraction of elements that differ at all (in isolation).
    mismatch_fraction: float
    #: SQNR (dB) of the deployed tensor against the simulated one, in isolation.
    sqnr_db: float
    #: The same measures with the whole deployed model run end to end (differences accumulated from earlier layers).
    end_to_end_max_steps: int
    end_to_end_sqnr_db: float
    flagged: bool


@dataclasses.dataclass(frozen=True)
class ParityResult:
    tolerance_steps: int
    tensors: tuple[TensorParity, ...]
    #: SQNR (dB) of each float graph output, deployed against simulated.
    outputs: dict[str, float]
    #: Quantized tensors of the QDQ graph that the lowered graph no longer holds.
    not_compared: tuple[str, ...] = ()
    #: Why tensors off by more than the tolerance are expected (a lowering that leaves the simulation on purpose,
    #: such as ``--transformer-kernels fast``); None: every flagged tensor is a finding.
    expected_reason: str | None = None

    @property
    def flagged(self) -> tuple[TensorParity, ...]:
        return tuple(tensor for tensor in self.tensors if tensor.flagged)

    @property
    def clean(self) -> bool:
        return not self.flagged

    def to_markdown(self) -> list[str]:
        lines = [f"## Deploy parity (integer kernels vs QDQ simulation, tolerance {self.tolerance_steps} step)", ""]
        if self.flagged:
            lines += [f"{len(self.flagged)} tensor(s) off by more than {self.tolerance_steps} step: "
                      + ", ".join(tensor.tensor for tensor in self.flagged) + ".", ""]
        else:
            lines += [f"All {len(self.tensors)} compared tensors within {self.tolerance_steps} step.", ""]
        if self.expected_reason:
            lines += [f"Departures expected: {self.expected_reason}.", ""]
        lines += ["| tensor | written by | max steps | differing | SQNR (dB) | end to end: max steps | SQNR (dB) "
                  "| flagged |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | :---: |"]
        lines += [f"| {t.tensor} | {t.producer} | {t.max_steps} | {t.mismatch_fraction:.3%} | {t.sqnr_db:.1f} | "
                  f"{t.end_to_end_max_steps} | {t.end_to_end_sqnr_db:.1f} | {'**yes**' if t.flagged else 'no'} |"
                  for t in self.tensors]
        return lines


@dataclasses.dataclass(frozen=True)
class _Quantized:
    tensor: str
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    dtype: int


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {initializer.name: numpy_helper.to_array(initializer) for initializer in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def quantized_tensors(qdq_model: onnx.ModelProto) -> tuple[_Quantized, ...]:
    """Every QuantizeLinear output of the main graph with constant 8-bit parameters."""
    graph = qdq_model.graph
    constants = _constants(graph)
    found = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[1] not in constants:
            continue
        zero_point = constants.get(node.input[2])
        if zero_point is None or zero_point.dtype not in (np.int8, np.uint8):
            continue
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
        dtype = onnx.TensorProto.INT8 if zero_point.dtype == np.int8 else onnx.TensorProto.UINT8
        found.append(_Quantized(node.output[0], constants[node.input[1]].astype(np.float64),
                                zero_point.astype(np.int64), axis, dtype))
    return tuple(found)


def _with_outputs(model: onnx.ModelProto, names: Iterable[str], dtypes: Mapping[str, int]) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {output.name for output in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, dtypes[name], None))
    return probe


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of the main graph that shape inference (or the node itself) can tell."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {info.name: info.type.tensor_type.elem_type
             for info in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    types.update({initializer.name: initializer.data_type for initializer in model.graph.initializer})
    return types


def _producers(model: onnx.ModelProto) -> dict[str, str]:
    return {output: f"{node.op_type} {node.name}".strip() for node in model.graph.node for output in node.output}


def _dequantize(codes: np.ndarray, quantized: _Quantized) -> np.ndarray:
    scale, zero_point = quantized.scale, quantized.zero_point
    if scale.ndim == 1 and codes.ndim > 1:
        shape = [1] * codes.ndim
        shape[quantized.axis % codes.ndim] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return (codes.astype(np.int64) - zero_point) * scale


def _isolated(model: onnx.ModelProto, names: Iterable[str], types: Mapping[str, int]) -> onnx.ModelProto:
    """``model`` where every reader of each of ``names`` reads the graph input ``NAME__simulated`` instead."""
    isolated = onnx.ModelProto()
    isolated.CopyFrom(model)
    names = set(names)
    for node in isolated.graph.node:
        for index, name in enumerate(node.input):
            if name in names:
                node.input[index] = f"{name}__simulated"
    isolated.graph.input.extend(onnx.helper.make_tensor_value_info(f"{name}__simulated", types[name], None)
                                for name in sorted(names))
    return isolated


class _Accumulator:
    """Running max |q − p|, count of differing codes, and signal/noise energies of one tensor."""

    def __init__(self) -> None:
        self.steps = self.differing = self.elements = 0
        self.signal = self.noise = 0.0

    def add(self, expected: np.ndarray, actual: np.ndarray, quantized: _Quantized | None) -> None:
        if quantized is not None:
            difference = np.abs(expected.astype(np.int64) - actual.astype(np.int64))
            self.steps = max(self.steps, int(difference.max(initial=0)))
            self.differing += int(np.count_nonzero(difference))
            self.elements += difference.size
            expected, actual = _dequantize(expected, quantized), _dequantize(actual, quantized)
        expected = expected.astype(np.float64)
        self.signal += float(np.sum(expected**2))
        self.noise += float(np.sum((expected - actual.astype(np.float64)) ** 2))

    @property
    def sqnr_db(self) -> float:
        return power_ratio_db(self.signal, self.noise)


def _to_code_space(codes: np.ndarray, lowered_type: int, quantized: _Quantized) -> np.ndarray:
    """Deployed codes in the Q's code space: int8 and uint8 codes of one value differ by 128."""
    codes = codes.astype(np.int64)
    if lowered_type == quantized.dtype:
        return codes
    return codes - 128 if quantized.dtype == onnx.TensorProto.INT8 else codes + 128


def _from_code_space(codes: np.ndarray, lowered_type: int, quantized: _Quantized) -> np.ndarray:
    codes = codes.astype(np.int64)
    if lowered_type != quantized.dtype:
        codes = codes + 128 if quantized.dtype == onnx.TensorProto.INT8 else codes - 128
    return codes.astype(_EIGHT_BIT[lowered_type])


def check_parity(
    qdq_model: onnx.ModelProto,
    lowered_model: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    tolerance_steps: int = DEFAULT_TOLERANCE_STEPS,
    threads: int | None = None,
    expected_reason: str | None = None,
) -> ParityResult:
    """Compare every quantized tensor of ``qdq_model`` (simulated) with the same tensor of ``lowered_model``
    (deployed at full optimisation) on ``batches``, each layer in isolation and end to end; see the module
    docstring. ``expected_reason`` says why departures are expected: flagged tensors are then logged as information, not
    warned about."""
    candidates = quantized_tensors(qdq_model)
    lowered_types = _tensor_types(lowered_model)
    compared = [quantized for quantized in candidates if lowered_types.get(quantized.tensor) in _EIGHT_BIT]
    not_compared = tuple(sorted({q.tensor for q in candidates} - {q.tensor for q in compared}))
    output_names = [output.name for output in lowered_model.graph.output]
    names = [quantized.tensor for quantized in compared]
    fetch = names + [name for name in output_names if name not in names]
    simulation = runtime.create_session(
        _with_outputs(qdq_model, names, {q.tensor: q.dtype for q in compared}), threads=threads)
    probe = _with_outputs(lowered_model, names, lowered_types)
    deployed = runtime.create_session(probe, optimize=True, threads=threads)
    isolated = runtime.create_session(_isolated(probe, names, lowered_types), optimize=True, threads=threads)
    isolated_inputs = {model_input.name for model_input in isolated.get_inputs()}
    input_names = [model_input.name for model_input in deployed.get_inputs()]
    end_to_end = [_Accumulator() for _ in fetch]
    alone = [_Accumulator() for _ in compared]
    for index, batch in enumerate(batches):
        feeds = {name: batch[name] for name in input_names}
        simulated = simulation.run(fetch, feeds)
        real = deployed.run(fetch, feeds)
        injected = dict(feeds)
        for quantized, codes in zip(compared, simulated):
            if f"{quantized.tensor}__simulated" in isolated_inputs:
                injected[f"{quantized.tensor}__simulated"] = _from_code_space(
                    codes, lowered_types[quantized.tensor], quantized)
        real_alone = isolated.run(names, injected) if names else []
        for position, (expected, actual) in enumerate(zip(simulated, real)):
            quantized = compared[position] if position < len(compared) else None
            if quantized is not None:
                lowered_type = lowered_types[quantized.tensor]
                actual = _to_code_space(actual, lowered_type, quantized)
                alone[position].add(expected, _to_code_space(real_alone[position], lowered_type, quantized),
                                    quantized)
            end_to_end[position].add(expected, actual, quantized)
        logger.info("parity: batch %d compared on %d quantized tensors", index + 1, len(compared))
    producers = _producers(lowered_model)
    tensors = tuple(
        TensorParity(q.tensor, producers.get(q.tensor, "graph input"), alone[i].steps,
                     alone[i].differing / max(alone[i].elements, 1), alone[i].sqnr_db, end_to_end[i].steps,
                     end_to_end[i].sqnr_db, alone[i].steps > tolerance_steps)
        for i, q in enumerate(compared)
    )
    outputs = {name: end_to_end[fetch.index(name)].sqnr_db for name in output_names}
    result = ParityResult(tolerance_steps, tensors, outputs, not_compared, expected_reason)
    if expected_reason and result.flagged:
        logger.info("parity: %d tensor(s) off by more than %d step, as expected: %s", len(result.flagged),
                    tolerance_steps, expected_reason)
        return result
    for tensor in result.flagged:
        logger.warning("parity: %s (%s) is off by %d steps on the integer kernels, its inputs equal to the "
                       "simulation's", tensor.tensor, tensor.producer, tensor.max_steps)
    return result


