"""Probe outputs are numpy views of onnxruntime's buffers: they must outlive later runs of the same session."""

from __future__ import annotations

import gc

import numpy as np
from onnx import TensorProto, helper

from qgraph import runtime
from qgraph.calibrate.probes import run_without_copies


def _two_output_model():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [300, 300])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [300, 300]) for name in ("y", "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_outputs_equal_session_run_and_survive_later_runs() -> None:
    session = runtime.create_session(_two_output_model(), optimize=True)
    feeds = {"x": np.linspace(-1, 1, 90_000, dtype=np.float32).reshape(300, 300)}
    first = run_without_copies(session, ["y", "z"], feeds)
    expected = session.run(["y", "z"], feeds)
    for _ in range(4):  # later runs reuse onnxruntime's arena
        later = run_without_copies(session, ["y", "z"], {"x": np.full((300, 300), 7.0, np.float32)})
        del later
        gc.collect()
    for array, reference in zip(first, expected):
        np.testing.assert_array_equal(array, reference)


def test_non_contiguous_and_scalar_feeds() -> None:
    session = runtime.create_session(_two_output_model(), optimize=True)
    wide = np.arange(600 * 300, dtype=np.float32).reshape(300, 600) - 5
    (output,) = run_without_copies(session, ["y"], {"x": wide[:, ::2]})
    np.testing.assert_array_equal(output, np.maximum(wide[:, ::2], 0))
