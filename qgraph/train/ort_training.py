"""Torch-free access to onnxruntime-training's offline tooling and training API.

``import onnxruntime.training`` runs the package ``__init__``, which imports the ``optim``/``amp`` subpackages and,
through them, torch. qgraph never needs torch: the pieces it uses — ``onnxruntime.training.artifacts`` (artifact
generation), ``onnxruntime.training.onnxblock`` (loss and optimizer blocks) and ``onnxruntime.training.api``
(``CheckpointState``, ``Module``, ``Optimizer``) — are plain Python over the compiled ``onnxruntime`` extension.

So :func:`training_api` registers a bare module object as ``onnxruntime.training`` in :data:`sys.modules`, with the
package directory as its ``__path__``; Python then imports the submodules from that directory without executing the
package ``__init__``. If the real package was already imported by someone else (torch present), it is used as is.

Artifact generation builds the gradient graph in onnxruntime's C++ code, which logs every graph transformer it runs
at INFO level straight to the process's standard error, ignoring ``onnxruntime.set_default_logger_severity``.
:func:`captured_native_stderr` redirects file descriptor 2 around such calls and forwards what was written to this
module's logger at DEBUG level.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import types
from collections.abc import Iterator
from dataclasses import dataclass

from qgraph import runtime
from qgraph.errors import QGraphError

logger = logging.getLogger(__name__)

_TRAINING_PACKAGE = "onnxruntime.training"


class TrainingUnavailableError(QGraphError):
    """The installed onnxruntime has no training API (install ``qgraph[qat]``: onnxruntime-training-cpu)."""


@dataclass(frozen=True)
class TrainingApi:
    """The three modules of onnxruntime-training that qgraph uses."""

    artifacts: types.ModuleType
    api: types.ModuleType
    onnxblock: types.ModuleType


def require_training_api() -> None:
    """Refuse, naming exactly what to install, an onnxruntime without the training API (before any work starts)."""
    reason = runtime.training_unavailable_reason()
    if reason is not None:
        raise TrainingUnavailableError(reason)


def _register_training_package() -> None:
    if _TRAINING_PACKAGE in sys.modules:
        return
    require_training_api()
    training_directory = runtime.training_directory()
    package = types.ModuleType(_TRAINING_PACKAGE)
    package.__path__ = [training_directory]
    package.__package__ = _TRAINING_PACKAGE
    package.__file__ = os.path.join(training_directory, "__init__.py")
    sys.modules[_TRAINING_PACKAGE] = package
    import onnxruntime

    onnxruntime.training = package  # type: ignore[attr-defined]


@functools.cache
def training_api() -> TrainingApi:
    """The ``artifacts``, ``api`` and ``onnxblock`` modules of onnxruntime-training, imported without torch."""
    _register_training_package()
    try:
        artifacts = importlib.import_module("onnxruntime.training.artifacts")
        api = importlib.import_module("onnxruntime.training.api")
        onnxblock = importlib.import_module("onnxruntime.training.onnxblock")
    except ImportError as error:
        raise TrainingUnavailableError(
            f"onnxruntime-training could not be imported ({error}); reinstall it: "
            f'pip install --force-reinstall "qgraph[qat]" ({runtime.TRAINING_RUNTIME})'
        ) from error
    logger.debug("onnxruntime training API imported from %s", sys.modules[_TRAINING_PACKAGE].__path__)
    return TrainingApi(artifacts=artifacts, api=api, onnxblock=onnxblock)


@functools.cache
def register_gradient_overrides() -> None:
    """Gradients qgraph defines for onnxruntime-training: a cheaper equal ``Clip`` gradient, and the gradient of the
    learnable activation quantizer of QAT.

    **Clip** (two kernels instead of five). The built-in gradient is
    ``dY · Cast(And(GreaterOrEqual(X, min), LessOrEqual(X, max)))``: four passes over the input and a bool→float
    ``Cast`` that is as slow as the rest together. ``FakeQuantGrad(dY, Equal(X, Clip(X)))`` (``com.microsoft``:
    ``dY`` where the mask is true, else 0) is the same mask — a value is unchanged by the clip
    exactly when ``min ≤ X ≤ max``, and a NaN compares unequal to itself in both — read from the forward output the
    graph keeps anyway. (``Where`` would do too, but its CPU kernel is slower than the Cast chain.) The
    fake-quantization graph of QAT clips every quantized tensor, so this gradient runs once per quantizer per step;
    FP32 models with ``Clip`` (ReLU6) get the same gradient, so FP32 and QAT steps stay comparable. FakeQuantGrad's
    CPU kernel is float32 only, like the models qgraph trains.

    **PassThrough.** ``com.microsoft::PassThrough(t̂, t, S, low, high)`` — outputs alias inputs, no kernel work —
    stands for ``t̂ = DequantizeLinear(QuantizeLinear(t, S, z), S, z)`` in the QAT graph (see below for its gradient);
    the ``com.microsoft::DequantizeLinear`` feeding it gets an empty gradient. onnxruntime-training 1.19 cannot build
    this custom gradient when ``S`` needs none (it rejects the definition's intermediates), so such a quantizer's scale
    must be trained.

    The registry is process-wide and read while ``generate_artifacts`` builds the gradient graph; the written
    training model holds ordinary nodes, so sessions need nothing registered.
    """
    from onnxruntime.capi import _pybind_state

    def node(op_type: str, inputs: list[str], outputs: list[str], attributes: dict | None = None, domain: str = ""):
        definition = _pybind_state.GradientNodeDefinition()
        definition.op_type, definition.domain = op_type, domain
        definition.inputs, definition.outputs = inputs, outputs
        converted = []
        for name, (value, dtype, is_tensor) in (attributes or {}).items():
            attribute = _pybind_state.GradientNodeAttributeDefinition()
            attribute.name, attribute.value_json, attribute.dtype, attribute.is_tensor = (
                name, json.dumps(value), dtype, is_tensor)
            converted.append(attribute)
        definition.attributes = converted
        return definition

    # The learnable activation quantizer of QAT (qgraph.qat.fake_quant_graph): PassThrough(t̂, t, S, low,
    # high), where t̂ = DequantizeLinear(QuantizeLinear(t, S, z), S, z) and low, high = S·(qmin − z − ½),
    # S·(qmax − z + ½) are the ends of the quantization cells. Gradient: the STE mask m = 1[low ≤ t ≤ high] (t
    # rounds into the grid: nothing was clipped) to t, and LSQ's Σ dY·(c − m·t/S) =
    # Σ (dY·t̂ − (dY·m)·t) / S to S — differences taken element by element, then one sum of small terms (the
    # difference of two large sums would cancel most of float32's digits), reusing dY·m. t̂ is read as
    # PassThrough's output O(0), the same buffer as its input: a DequantizeLinear with several consumers is
    # duplicated per consumer by onnxruntime's QDQ graph transformers, and each copy runs. (The codes of the
    # com.microsoft DequantizeLinear are integers and its scale gets its gradient through PassThrough, so it
    # contributes none; nothing else in a qgraph training graph uses either operator.)
    _pybind_state.register_gradient_definition("com.microsoft::PassThrough", [
        node("Clip", ["I(1)", "I(3)", "I(4)"], ["clipped"]),
        node("Equal", ["I(1)", "clipped"], ["in_range"]),
        node("FakeQuantGrad", ["GO(0)", "in_range"], ["input_gradient"], domain="com.microsoft"),
        node("Identity", ["input_gradient"], ["GI(1)"]),
        node("Mul", ["GO(0)", "O(0)"], ["output_products"]),
        node("Mul", ["input_gradient", "I(1)"], ["input_products"]),
        node("Sub", ["output_products", "input_products"], ["scale_products"]),
        node("ReduceSum", ["scale_products"], ["scale_numerator"], {"keepdims": (0, "int", False)}),
        node("Div", ["scale_numerator", "I(2)"], ["GI(2)"]),
        node("Sub", ["I(3)", "I(3)"], ["GI(3)"]),  # the cell's ends only select the mask
        node("Sub", ["I(4)", "I(4)"], ["GI(4)"]),
    ])
    _pybind_state.register_gradient_definition("com.microsoft::DequantizeLinear", [])
    _pybind_state.register_gradient_definition("::Clip", [
        node("Equal", ["I(0)", "O(0)"], ["in_range"]),
        node("FakeQuantGrad", ["GO(0)", "in_range"], ["GI(0)"], domain="com.microsoft"),
    ])
    logger.debug("registered the gradients of Clip, com.microsoft::PassThrough and com.microsoft::DequantizeLinear")


@contextlib.contextmanager
def captured_native_stderr() -> Iterator[None]:
    """Redirect file descriptor 2 (native code's stderr) to a temporary file; log its content at DEBUG."""
    stderr_descriptor = 2  # native code writes to the process's fd 2 whatever sys.stderr is (pytest swaps it)
    sys.stderr.flush()
    saved_descriptor = os.dup(stderr_descriptor)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), stderr_descriptor)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved_descriptor, stderr_descriptor)
            os.close(saved_descriptor)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            if text.strip():
                logger.debug("onnxruntime native log:\n%s", text.rstrip())
