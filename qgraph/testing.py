"""Checks that every qgraph pass must pass, usable by anyone who writes or embeds a pass.

``check_pass`` runs a pass on a model the way the design notes require a pass to be tested: the model is valid
before and after (``onnx.checker`` with ``full_check``), onnxruntime with graph optimisation disabled gives the same
outputs on seeded inputs (relative tolerance for FP32 rewrites), the pass reports ``modified`` honestly, and a
second run changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from qgraph import runtime


@dataclasses.dataclass(frozen=True)
class PassCheck:
    model: ir.Model
    proto: onnx.ModelProto
    modified: bool
    outputs_before: dict[str, np.ndarray]
    outputs_after: dict[str, np.ndarray]


def to_ir(model: onnx.ModelProto | str) -> ir.Model:
    """An onnx-ir model from a proto or from ONNX text (``onnx.parser`` syntax)."""
    if isinstance(model, str):
        model = onnx.parser.parse_model(model)
    return ir.serde.deserialize_model(model)


def op_types(model: ir.Model | onnx.ModelProto) -> list[str]:
    """Operator types of the main graph in order."""
    if isinstance(model, onnx.ModelProto):
        return [node.op_type for node in model.graph.node]
    return [node.op_type for node in model.graph]


def run_model(model: ir.Model | onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return runtime.run(runtime.create_session(proto), feeds)


def check_pass(
    model: onnx.ModelProto | str,
    pass_instance,
    *,
    expect_modified: bool = True,
    feeds: Mapping[str, np.ndarray] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    seed: int = 0,
) -> PassCheck:
    """Run ``pass_instance`` on ``model`` and assert validity, equivalence, honesty and idempotence."""
    proto = onnx.parser.parse_model(model) if isinstance(model, str) else model
    onnx.checker.check_model(proto, full_check=True)
    session = runtime.create_session(proto)
    feeds = dict(feeds) if feeds is not None else runtime.random_inputs(session, seed=seed)
    before = runtime.run(session, feeds)

    ir_model = ir.serde.deserialize_model(proto)
    result = pass_instance(ir_model)
    assert result.modified == expect_modified, f"modified={result.modified}, expected {expect_modified}"
    after_proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(after_proto, full_check=True)
    after = run_model(after_proto, feeds)
    assert set(after) == set(before), f"outputs changed names: {sorted(before)} -> {sorted(after)}"
    for name, expected in before.items():
        np.testing.assert_allclose(after[name], expected, rtol=rtol, atol=atol, err_msg=f"output {name}")

    again = pass_instance(result.model)
    assert not again.modified, f"{type(pass_instance).__name__} is not idempotent: a second run modified the model"
    return PassCheck(result.model, after_proto, result.modified, before, after)
