"""Checks that every qgraph pass must pass, usable by anyone who writes or embeds a pass.

``check_pass`` runs a pass on a model the way the design notes require a pass to be tested: the model is valid
before and after (``onnx.checker`` with ``full_check``), onnxruntime with graph optimisation disabled gives the same
outputs on seeded inputs (relative tolerance for FP32 rewrites), the pass reports ``modified`` honestly, and a
second run changes nothing.

Small models are written in ONNX text; ``if_model_text`` and ``function_model_text`` write the two shapes the pass
tests need again and again (a branch on a boolean input, a call of a local function).
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


#: The header of an ONNX-text model: IR version 8, default opset 17.
TEXT_HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def if_model_text(shape: str, before: str, then_line: str, else_line: str) -> str:
    """``g (float[shape] x, bool condition) => (float[shape] y)`` in ONNX text: the lines ``before``, then
    ``y = If(condition)`` whose one-node branches are ``then_line`` (writing ``then_out``) and ``else_line``
    (writing ``else_out``)."""
    return TEXT_HEADER + f"""
    g (float[{shape}] x, bool condition) => (float[{shape}] y) {{
      {before}
      y = If(condition) <
        then_branch = then_graph () => (float[{shape}] then_out) {{ {then_line} }},
        else_branch = else_graph () => (float[{shape}] else_out) {{ {else_line} }}
      >
    }}
    """


def function_model_text(graph_lines: str, function: str, body: str) -> str:
    """``g (float[2] x) => (float[2] y)`` in ONNX text running ``graph_lines``, which may call ``local.<function>``:
    a function of domain ``local`` (opset 17) from ``input`` to ``output`` whose lines are ``body``."""
    return f"""
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[2] x) => (float[2] y) {{
      {graph_lines}
    }}
    <domain: "local", opset_import: ["" : 17]>
    {function} (input) => (output) {{
      {body}
    }}
    """


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
