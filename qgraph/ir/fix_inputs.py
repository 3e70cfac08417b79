"""Fixing graph inputs to constants (``--fix-input NAME=VALUE``) before canonicalization.

A model input that a deployment always feeds with the same value (a sample rate, a mode flag, a feature switch)
is control data, not an activation: once it is a constant, FoldConstants evaluates what depends on it (for example
``Greater(sample_rate, 8000)``) and FoldConstantIf inlines the ``If`` branch that the value selects, so the branch
that can never run disappears instead of being quantized for nothing.

:func:`fix_inputs` removes each named input from the main graph's inputs and turns the same value object into an
initializer holding the given array: every reader (including If/Loop bodies that capture it) now reads a constant.
Values are checked against the input's declared element type and shape first:

- text (the command line) parses as one scalar or a comma list in the input's element type: ``16000``, ``1.5``,
  ``true``/``false``/``1``/``0`` for booleans, ``1,0,1``; an integer input refuses ``1.5`` and out-of-range values;
- arrays (the Python API) must hold values the input's element type represents exactly (``np.float64(2.0)`` fixes
  an int64 input, ``2.5`` does not);
- the number of values must fill the input's shape: a scalar input takes one value, a fully static shape takes its
  element count (the values are reshaped), a rank-1 input with a symbolic length takes any count; a symbolic
  dimension in a higher rank cannot be inferred from a flat list and is refused.

Every problem raises :class:`~qgraph.errors.QGraphError` with one line naming the input (exit status 2 on the
command line); a name that is no input lists the inputs there are.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qgraph.errors import QGraphError

logger = logging.getLogger(__name__)

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def parse_assignment(text: str) -> tuple[str, str]:
    """``"NAME=VALUE"`` split into its name and value text."""
    name, separator, value = text.partition("=")
    if not separator or not name.strip() or not value.strip():
        raise QGraphError(f"--fix-input expects NAME=VALUE (for example sample_rate=16000), got {text!r}")
    return name.strip(), value.strip()


def _input_named(model: ir.Model, name: str) -> ir.Value:
    for value in model.graph.inputs:
        if value.name == name:
            return value
    names = ", ".join(value.name or "" for value in model.graph.inputs) or "none"
    raise QGraphError(f"--fix-input {name}: the model has no input named {name!r} (its inputs: {names})")


def _numpy_dtype(value: ir.Value) -> np.dtype:
    if value.dtype is None:
        raise QGraphError(f"--fix-input {value.name}: the input declares no element type, so no value can be checked")
    try:
        return np.dtype(value.dtype.numpy())
    except Exception:
        raise QGraphError(
            f"--fix-input {value.name}: inputs of element type {value.dtype.name} cannot be fixed"
        ) from None


def _parse_scalar(name: str, text: str, dtype: np.dtype):
    word = text.strip().lower()
    try:
        if dtype == np.bool_:
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
            raise ValueError
        if np.issubdtype(dtype, np.integer):
            number = int(word, 0) if word.startswith(("0x", "-0x")) else int(word)
            limits = np.iinfo(dtype)
            if not limits.min <= number <= limits.max:
                raise QGraphError(
                    f"--fix-input {name}: {text} is outside the range of {dtype.name} [{limits.min}, {limits.max}]"
                )
            return number
        if np.issubdtype(dtype, np.floating):
            return float(word)
    except ValueError:
        raise QGraphError(f"--fix-input {name}: {text!r} is not a {dtype.name} value") from None
    raise QGraphError(f"--fix-input {name}: inputs of type {dtype.name} cannot be fixed")


def parse_input_value(model: ir.Model, name: str, text: str) -> np.ndarray:
    """The array that ``text`` (one scalar or a comma list) gives for input ``name`` of ``model``, checked."""
    value = _input_named(model, name)
    dtype = _numpy_dtype(value)
    parts = [part.strip() for part in text.split(",")]
    if any(not part for part in parts):
        raise QGraphError(f"--fix-input {name}: {text!r} holds an empty value")
    array = np.array([_parse_scalar(name, part, dtype) for part in parts], dtype=dtype)
    return _fit_shape(value, array)


def _coerce(value: ir.Value, array) -> np.ndarray:
    """``array`` in the element type of input ``value``, refused if the conversion changes any value."""
    dtype = _numpy_dtype(value)
    source = np.asarray(array)
    if source.dtype == dtype:
        return source
    if source.dtype.kind in "OSUV":
        raise QGraphError(f"--fix-input {value.name}: a {source.dtype} value cannot fix a {dtype.name} input")
    with np.errstate(all="ignore"):
        converted = source.astype(dtype)
        same = np.array_equal(converted.astype(np.float64), source.astype(np.float64), equal_nan=True)
    if not same:
        raise QGraphError(
            f"--fix-input {value.name}: the {source.dtype} values do not fit the input's element type {dtype.name}"
        )
    return converted


def _fit_shape(value: ir.Value, array: np.ndarray) -> np.ndarray:
    shape = value.shape
    if shape is None:
        return array.reshape(()) if array.size == 1 else array.reshape(-1)
    dimensions = list(shape)
    sizes = [size for size in dimensions if isinstance(size, int)]
    if len(sizes) == len(dimensions):
        expected = math.prod(sizes)
        if array.size != expected:
            raise QGraphError(
                f"--fix-input {value.name}: the input has shape {tuple(sizes)} ({expected} values), "
                f"got {array.size} value(s)"
            )
        return array.reshape(sizes)
    if len(dimensions) == 1:
        return array.reshape(-1)
    raise QGraphError(
        f"--fix-input {value.name}: the input has shape {tuple(str(size) for size in dimensions)} with a symbolic "
        "dimension, which a list of values cannot fill"
    )


def fix_inputs(model: ir.Model, values: Mapping[str, object]) -> ir.Model:
    """Make each input named in ``values`` a constant initializer of ``model`` (in place); returns ``model``.

    A value is text (parsed as on the command line) or anything numpy turns into an array.
    """
    if not values:
        return model
    arrays: dict[str, np.ndarray] = {}
    for name, given in values.items():
        graph_input = _input_named(model, name)
        if isinstance(given, str):
            arrays[name] = parse_input_value(model, name, given)
        else:
            arrays[name] = _fit_shape(graph_input, _coerce(graph_input, given))
    graph = model.graph
    for name, array in arrays.items():
        graph_input = _input_named(model, name)
        graph.inputs.remove(graph_input)
        if graph.initializers.get(name) is graph_input:  # an input with a default (IR < 4 style)
            graph.initializers.pop(name)
        array = np.array(array, order="C")
        graph_input.const_value = ir.tensor(array, name=name)
        graph_input.shape = ir.Shape(array.shape)
        graph.register_initializer(graph_input)
        logger.info("fixed input %s to %s", name, np.array2string(array, threshold=8))
    return model
