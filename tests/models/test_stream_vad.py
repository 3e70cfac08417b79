"""The streaming VAD stand-in: valid ONNX, a [layers, batch, hidden] state, a sample-rate branch, a state that
streams."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph.ir.fix_inputs import fix_inputs
from qgraph.models.stream_vad import (
    CHUNK_SAMPLES,
    RECURRENT_KINDS,
    STATE_NAMES,
    build_stream_vad,
    stream_feeds,
    synthetic_speech,
    write_feed_folder,
)
from qgraph.passes.infrastructure import PassManager, get_pass
from qgraph.runtime import create_session

HIDDEN = 64


@pytest.fixture(params=RECURRENT_KINDS)
def kind(request) -> str:
    return request.param


def test_model_is_valid_and_shaped_like_an_export(kind):
    model = build_stream_vad(kind)
    onnx.checker.check_model(model, full_check=True)
    state = STATE_NAMES[kind]
    inputs = {value.name: value.type.tensor_type for value in model.graph.input}
    assert list(inputs) == ["input", state, "sr"]
    assert [dim.dim_value or dim.dim_param for dim in inputs[state].shape.dim] == [2, "batch", HIDDEN]
    assert inputs["sr"].elem_type == onnx.TensorProto.INT64 and len(inputs["sr"].shape.dim) == 0
    assert [value.name for value in model.graph.output] == ["output", "stateN"]
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["If"] == 1 and ops["Equal"] == 1 and ops[kind] == (1 if kind == "LSTM" else 2)
    recurrent = [node for node in model.graph.node if node.op_type == kind]
    assert recurrent[0].input[5] == "state_0"  # initial_h: a slice of the state input along axis 0
    if kind == "LSTM":
        assert recurrent[0].input[6] == "state_1"  # initial_c
    assert build_stream_vad(kind).SerializeToString() == model.SerializeToString()  # seeded
    assert build_stream_vad(kind, seed=1).SerializeToString() != model.SerializeToString()


def test_state_batches_on_axis_1(kind):
    """Per-sample feeds stacked along each input's batch axis give the per-sample outputs, batched the same way."""
    model = build_stream_vad(kind)
    feeds = list(stream_feeds(model, synthetic_speech(1.0)))
    state = STATE_NAMES[kind]
    session = create_session(model)
    single = [session.run(None, feed) for feed in feeds]
    batched = session.run(None, {"input": np.concatenate([feed["input"] for feed in feeds]),
                                 state: np.concatenate([feed[state] for feed in feeds], axis=1),
                                 "sr": np.array(16000)})
    np.testing.assert_allclose(batched[0], np.concatenate([outputs[0] for outputs in single]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched[1], np.concatenate([outputs[1] for outputs in single], axis=1), rtol=1e-5,
                               atol=1e-6)


def test_streamed_state_carries_over_and_output_follows_the_signal():
    model = build_stream_vad("LSTM")
    audio = synthetic_speech(8.0)
    feeds = list(stream_feeds(model, audio))
    assert len(feeds) == len(audio) // CHUNK_SAMPLES[16000]
    assert not feeds[0]["state"].any() and feeds[5]["state"].any()
    session = create_session(model)
    np.testing.assert_array_equal(feeds[6]["state"], session.run(["stateN"], feeds[5])[0])
    probabilities = np.concatenate([session.run(["output"], feed)[0] for feed in feeds]).ravel()
    chunks = audio[:len(feeds) * 512].reshape(len(feeds), 512)
    assert probabilities.std() > 0.05
    assert np.corrcoef(probabilities, np.log(np.mean(chunks ** 2, axis=1)))[0, 1] > 0.8


def test_both_sample_rates_run():
    model = build_stream_vad("LSTM")
    session = create_session(model)
    for rate, samples in CHUNK_SAMPLES.items():
        feed = {"input": synthetic_speech(0.1, rate)[None, :samples], "state": np.zeros((2, 1, HIDDEN), np.float32),
                "sr": np.array(rate)}
        output, state = session.run(None, feed)
        assert output.shape == (1, 1) and state.shape == (2, 1, HIDDEN)


def test_fixing_the_sample_rate_inlines_its_branch():
    model = build_stream_vad("LSTM")
    feeds = list(stream_feeds(model, synthetic_speech(0.5)))
    fixed = fix_inputs(ir.serde.deserialize_model(model), {"sr": "16000"})
    folding = PassManager([get_pass(name)() for name in ("LiftConstants", "FoldConstants", "FoldConstantIf",
                                                          "EliminateDeadCode")], fixed_point=True)
    canonical = ir.serde.serialize_model(folding.run(fixed).model)
    assert [value.name for value in canonical.graph.input] == ["input", "state"]
    assert not [node for node in canonical.graph.node if node.op_type in ("If", "Equal")]
    expected = create_session(model).run(None, feeds[3])
    actual = create_session(canonical).run(None, {key: feeds[3][key] for key in ("input", "state")})
    for left, right in zip(expected, actual):
        np.testing.assert_allclose(right, left, rtol=1e-5, atol=1e-6)


def test_feed_folder(tmp_path):
    model = build_stream_vad("GRU")
    count = write_feed_folder(tmp_path / "feeds", stream_feeds(model, synthetic_speech(0.5)))
    files = sorted((tmp_path / "feeds").iterdir())
    assert count == len(files) == 15 and files[0].name == "feed_00000.npz"
    with np.load(files[1]) as feed:
        assert set(feed) == {"input", "h0", "sr"}
        assert feed["h0"].shape == (2, 1, HIDDEN) and feed["sr"].shape == ()
