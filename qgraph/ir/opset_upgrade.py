"""Upgrade a model to a newer default-domain opset, for a fusion whose operator the model's opset does not have.

A LayerNorm written out node by node in an opset-13 model cannot become LayerNormalization (opset 17) in place. onnx's
version converter rewrites every node to the newer opset through its per-operator adapters; this module uses it
only when the result is demonstrably the same function:

1. the target must not exceed the newest opset the installed onnxruntime runs (:func:`runtime_opset_cap`, the
   one place that reads it from :mod:`qgraph.ir.versions`); a target above it is refused;
2. the conversion itself is :func:`qgraph.ir.versions.convert_opset` (onnx's converter, refusing an operator without
   an adapter or a result that contradicts the shapes the model declares);
3. the original and the converted model run in onnxruntime (graph optimisation disabled) on the same seeded random
   inputs (symbolic dimensions set to ``batch``); every output must agree within ``rtol``/``atol`` (NaN where NaN).
   Otherwise the upgrade is refused with a log line saying which output differed and by how much.

A refusal returns ``None`` and leaves the model alone: the caller keeps the unfused graph, which is correct, only
slower. Random inputs cannot prove equality on every input, but the adapters are per-operator rewrites, so a wrong
one shows on almost any input; they exercise every node the model runs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

from qgraph import runtime
from qgraph.errors import UnsupportedModelError
from qgraph.ir import versions
from qgraph.ir.values import default_opset

logger = logging.getLogger(__name__)

#: Tolerances of the before/after comparison: the adapters change no arithmetic, only how nodes are written.
RTOL = 1e-5
ATOL = 1e-6


def runtime_opset_cap() -> int:
    """The newest default-domain opset the installed onnxruntime runs (a model is never upgraded beyond it)."""
    return versions.supported_versions().opset


def upgrade_opset(
    model: ir.Model, target: int, *, seed: int = 0, batch: int = 2, rtol: float = RTOL, atol: float = ATOL
) -> ir.Model | None:
    """``model`` converted to default-domain opset ``target`` and checked numerically, or ``None`` (logged) when the
    conversion is impossible, beyond the runtime's cap, or changes an output. A model already at ``target`` or
    newer is returned as it is."""
    current = default_opset(model)
    if current >= target:
        return model
    cap = runtime_opset_cap()
    if target > cap:
        logger.info("not upgrading opset %d -> %d: the installed onnxruntime runs opsets up to %d",
                    current, target, cap)
        return None
    logger.info("upgrading the model from opset %d to %d (checked on random inputs before and after)", current, target)
    original = ir.serde.serialize_model(model)
    try:
        converted = versions.convert_opset(original, target)
    except UnsupportedModelError as error:
        logger.info("not upgrading: %s", error)
        return None
    reason = _difference(original, converted, seed=seed, batch=batch, rtol=rtol, atol=atol)
    if reason is not None:
        logger.warning("not upgrading opset %d -> %d: %s", current, target, reason)
        return None
    upgraded = ir.serde.deserialize_model(converted)
    upgraded.meta.update(model.meta)
    return upgraded


def _difference(
    original: onnx.ModelProto, converted: onnx.ModelProto, *, seed: int, batch: int, rtol: float, atol: float
) -> str | None:
    """Why the two models are not the same function on seeded random inputs (``None`` when they agree)."""
    try:
        before_session = runtime.create_session(original)
        feeds = runtime.random_inputs(before_session, seed=seed, batch=batch)
        before = runtime.run(before_session, feeds)
    except Exception as error:  # onnxruntime raises its own exception types with the reason
        return f"the original model does not run on random inputs, so the conversion cannot be checked ({error})"
    try:
        after = runtime.run(runtime.create_session(converted), feeds)
    except Exception as error:
        return f"the converted model does not run: {error}"
    for name, expected in before.items():
        actual = after.get(name)
        if actual is None or actual.shape != expected.shape or actual.dtype != expected.dtype:
            return f"output {name!r} changed its shape or type"
        if not np.allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True):
            worst = float(np.nanmax(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
            return f"output {name!r} differs by up to {worst:.3g} after the conversion"
    return None


def adopt(model: ir.Model, upgraded: ir.Model) -> None:
    """Make ``model`` the upgraded one in place (for an in-place pass): its graph, IR version and functions."""
    model.graph = upgraded.graph
    model.ir_version = upgraded.ir_version
    model.functions.clear()
    model.functions.update(upgraded.functions)
