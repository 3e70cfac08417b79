"""Batch axes, constants and keys of removed inputs: per-sample feed folders batch along each key's own axis."""

from __future__ import annotations

import logging
import tracemalloc

import numpy as np
import pytest
from onnx import numpy_helper

from qgraph.data import (
    DataLayout,
    InputSpec,
    KeysLeftOut,
    dataset_from_arrays,
    is_state_name,
    open_dataset,
    parse_batch_axis,
    validate_batch,
    validate_dataset,
)
from qgraph.errors import DataError

SAMPLES, SAMPLE_LENGTH, HIDDEN = 10, 6, 4
STATE = DataLayout({"state": 1})


@pytest.fixture
def stream() -> dict[str, np.ndarray]:
    """What a streaming model with a [layers, batch, hidden] state takes for SAMPLES samples, batched."""
    generator = np.random.default_rng(3)
    return {
        "input": generator.standard_normal((SAMPLES, SAMPLE_LENGTH)).astype(np.float32),
        "state": generator.standard_normal((2, SAMPLES, HIDDEN)).astype(np.float32),
        "sr": np.array(16000, np.int64),
    }


@pytest.fixture
def signature() -> tuple[InputSpec, ...]:
    return (
        InputSpec("input", np.dtype(np.float32), ("batch", SAMPLE_LENGTH)),
        InputSpec("state", np.dtype(np.float32), (2, "batch", HIDDEN)),
        InputSpec("sr", np.dtype(np.int64), ()),
    )


def _feed(stream, index: int) -> dict[str, np.ndarray]:
    return {"input": stream["input"][index:index + 1], "state": stream["state"][:, index:index + 1],
            "sr": stream["sr"]}


def _feed_folder(tmp_path, stream, name="feeds", writer=np.savez):
    folder = tmp_path / name
    folder.mkdir()
    for index in range(SAMPLES):
        writer(folder / f"feed_{index:03d}.npz", **_feed(stream, index))
    return folder


def _gathered(batches):
    batches = list(batches)
    return batches, {
        "input": np.concatenate([batch["input"] for batch in batches]),
        "state": np.concatenate([batch["state"] for batch in batches], axis=1),
    }


def _message(call, *arguments, **keywords) -> str:
    with pytest.raises(DataError) as caught:
        call(*arguments, **keywords)
    message = str(caught.value)
    assert "\n" not in message
    return message


# -------------------------------------------------------------------------------------------------- options
def test_command_line_form():
    layout = DataLayout.from_command_line(["state=1", "sr=none", "h0 = 1"], infer_state_axes=True)
    assert dict(layout.batch_axes) == {"state": 1, "sr": None, "h0": 1}
    assert layout.infer_state_axes and layout.removed_inputs == frozenset()
    assert layout.describe() == "--batch-axis state=1 --batch-axis sr=none --batch-axis h0=1 --infer-state-axes"
    assert DataLayout().describe() == "default"
    assert parse_batch_axis("state=1") == ("state", 1)
    assert "KEY=AXIS" in _message(parse_batch_axis, "state")
    assert "non-negative integer or none" in _message(parse_batch_axis, "state=-1")
    assert "given twice (1 and 2)" in _message(DataLayout.from_command_line, ["state=1", "state=2"])


def test_layout_is_a_frozen_hashable_value():
    layout = DataLayout({"state": 1}, removed_inputs=["sr"])
    assert layout == DataLayout({"state": 1}, removed_inputs={"sr"})
    assert hash(layout) == hash(DataLayout({"state": 1}, removed_inputs={"sr"}))
    assert layout != DataLayout({"state": 0}, removed_inputs={"sr"})
    with pytest.raises(TypeError):
        layout.batch_axes["state"] = 2
    with pytest.raises(AttributeError):
        layout.infer_state_axes = True
    assert layout.with_removed_inputs(["mode"]).removed_inputs == {"sr", "mode"}
    assert "non-negative integer" in _message(DataLayout, {"state": -1})
    assert "non-negative integer" in _message(DataLayout, {"state": True})
    assert "collection of input names" in _message(DataLayout, removed_inputs="sr")


@pytest.mark.parametrize("name, expected", [
    ("state", True), ("h0", True), ("c0", True), ("initial_h", True), ("hidden_state", True), ("lstm.state_in", True),
    ("encoder/h_0", True), ("input", False), ("sr", False), ("chunk", False), ("threshold", False), ("shape", False),
])
def test_state_names(name, expected):
    assert is_state_name(name) is expected


# ------------------------------------------------------------------------------------ per-sample feed folders
@pytest.mark.parametrize("writer", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
def test_per_sample_folder_batches_each_key_on_its_axis(tmp_path, stream, writer):
    dataset = open_dataset(_feed_folder(tmp_path, stream, writer=writer), layout=STATE)
    assert dataset.num_samples == SAMPLES
    assert dataset.input_names == ("input", "state", "sr")
    assert dataset.array_info("state").shape == (2, SAMPLES, HIDDEN)
    assert dataset.array_info("state").batch_axis == 1
    assert dataset.array_info("sr").batch_axis is None and dataset.array_info("sr").num_samples is None
    batches, gathered = _gathered(dataset.iter_batches(4))
    assert [batch["state"].shape for batch in batches] == [(2, 4, HIDDEN), (2, 4, HIDDEN), (2, 2, HIDDEN)]
    assert all(batch["sr"].shape == () and batch["sr"] == 16000 for batch in batches)
    assert all(type(batch["state"]) is np.ndarray and batch["state"].flags.c_contiguous for batch in batches)
    np.testing.assert_array_equal(gathered["input"], stream["input"])
    np.testing.assert_array_equal(gathered["state"], stream["state"])
    # shuffling permutes the samples of every key alike, along each key's own axis
    order = np.random.default_rng(5).permutation(SAMPLES)
    _, shuffled = _gathered(dataset.iter_batches(3, shuffle=True, seed=5))
    np.testing.assert_array_equal(shuffled["input"], stream["input"][order])
    np.testing.assert_array_equal(shuffled["state"], stream["state"][:, order])
    limited = list(dataset.iter_batches(4, limit=6))
    assert [batch["state"].shape[1] for batch in limited] == [4, 2]
    assert [batch["input"].shape[0] for batch in limited] == [4, 2]


def test_batched_file_and_per_sample_folder_yield_the_same_batches(tmp_path, stream):
    np.savez(tmp_path / "batched.npz", **stream)
    batched = open_dataset(tmp_path / "batched.npz", layout=STATE)
    per_sample = open_dataset(_feed_folder(tmp_path, stream), layout=STATE)
    for left, right in zip(batched.iter_batches(3), per_sample.iter_batches(3), strict=True):
        assert left.keys() == right.keys()
        for key in left:
            np.testing.assert_array_equal(left[key], right[key])


def test_onnx_test_data_sets_per_sample(tmp_path, stream):
    for index in range(SAMPLES):
        folder = tmp_path / "model" / f"test_data_set_{index}"
        folder.mkdir(parents=True)
        for number, (key, value) in enumerate(_feed(stream, index).items()):
            (folder / f"input_{number}.pb").write_bytes(numpy_helper.from_array(value, key).SerializeToString())
    dataset = open_dataset(tmp_path / "model", layout=STATE)
    assert dataset.num_samples == SAMPLES
    _, gathered = _gathered(dataset.iter_batches(4))
    np.testing.assert_array_equal(gathered["state"], stream["state"])


def test_states_inferred_by_name_only_when_asked(tmp_path, stream):
    folder = _feed_folder(tmp_path, stream)
    message = _message(open_dataset, folder)
    assert "key 'state' has 2 samples but key 'input' has 1" in message
    assert "--batch-axis state=1" in message and "--infer-state-axes" in message
    inferred = open_dataset(folder, layout=DataLayout(infer_state_axes=True))
    assert inferred.array_info("state").batch_axis == 1
    assert inferred.num_samples == SAMPLES
    # an explicit axis wins over the name; a rank-2 state is not a [layers, batch, hidden] state
    explicit = dataset_from_arrays({"input": stream["input"], "state": stream["state"].transpose(1, 0, 2)},
                                   layout=DataLayout({"state": 0}, infer_state_axes=True))
    assert explicit.array_info("state").batch_axis == 0
    flat = dataset_from_arrays({"input": stream["input"], "state": stream["state"][0]},
                               layout=DataLayout(infer_state_axes=True))
    assert flat.array_info("state").batch_axis == 0


def test_batch_axis_given_explicitly_gets_no_hint(stream):
    arrays = dict(stream, state=stream["state"][:, :3])
    message = _message(dataset_from_arrays, arrays, layout=STATE)
    assert "key 'state' has 3 samples but key 'input' has 10" in message
    assert "counted along axis 1 of (2, 3, 4) and axis 0 of (10, 6)" in message
    assert "--batch-axis" not in message


# ------------------------------------------------------------------------------------------- contradictions
def test_batch_axis_beyond_rank(stream):
    message = _message(dataset_from_arrays, stream, layout=DataLayout({"state": 3}))
    assert "--batch-axis state=3 is beyond the last axis of key 'state' (shape (2, 10, 4), axes 0 to 2)" in message


def test_batch_axis_of_a_scalar(stream):
    message = _message(dataset_from_arrays, stream, layout=DataLayout({"state": 1, "sr": 0}))
    assert "key 'sr' is a scalar" in message and "--batch-axis sr=0" in message


def test_batch_axis_naming_no_key(stream):
    message = _message(dataset_from_arrays, stream, layout=DataLayout({"stat": 1}))
    assert "--batch-axis stat=1 names no key of the data; keys are input, state, sr" in message


def test_constants_must_agree_across_shards(tmp_path, stream):
    folder = _feed_folder(tmp_path, stream)
    np.savez(folder / "feed_004.npz", **dict(_feed(stream, 4), sr=np.array(8000)))
    message = _message(open_dataset, folder, layout=STATE)
    assert "feed_004.npz: key 'sr' is a constant" in message and "8000 here and 16000" in message


def test_per_sample_shapes_must_agree_across_shards(tmp_path, stream):
    folder = _feed_folder(tmp_path, stream)
    np.savez(folder / "feed_007.npz", **dict(_feed(stream, 7), state=np.zeros((3, 1, HIDDEN), np.float32)))
    message = _message(open_dataset, folder, layout=STATE)
    assert "feed_007.npz: key 'state' is float32[3, N, 4] but float32[2, N, 4]" in message


def test_a_key_without_a_batch_axis_is_a_constant(stream):
    window = np.hanning(SAMPLE_LENGTH).astype(np.float32)
    dataset = dataset_from_arrays(dict(stream, window=window), layout=DataLayout({"state": 1, "window": None}))
    assert dataset.num_samples == SAMPLES
    for batch in dataset.iter_batches(4, shuffle=True):
        np.testing.assert_array_equal(batch["window"], window)


def test_only_constants_is_no_data():
    message = _message(dataset_from_arrays, {"sr": np.array(16000)})
    assert "no key counts samples: sr are constants" in message


# ------------------------------------------------------------------------------ keys of removed inputs
def test_keys_of_removed_inputs_are_left_out_and_named_once(tmp_path, stream, signature, caplog):
    layout = STATE.with_removed_inputs(["sr"])
    fixed = signature[:2]  # --fix-input sr=16000 made sr a constant of the model
    folder = _feed_folder(tmp_path, stream)
    # the key that used to be refused is never read: a per-sample sr of shape (1,) no longer contradicts anything
    for index in range(SAMPLES):
        np.savez(folder / f"feed_{index:03d}.npz", **dict(_feed(stream, index), sr=np.array([16000])))
    dataset = open_dataset(folder, layout=layout)
    assert dataset.input_names == ("input", "state") and dataset.skipped_keys == ("sr",)
    with caplog.at_level(logging.INFO, logger="qgraph.data.validate"):
        checked = validate_dataset(dataset, fixed)
    ignoring = [record.getMessage() for record in caplog.records if "ignoring" in record.getMessage()]
    assert ignoring == [f"{folder}: ignoring key(s) sr: no longer inputs of the model (fixed with --fix-input)"]
    assert set(next(checked.iter_batches(4))) == {"input", "state"}
    # without removed_inputs, the same key is an error, as any key that is not an input
    assert "key 'sr': not an input of the model" in _message(validate_dataset, open_dataset(folder, layout=STATE),
                                                            fixed)


def test_validate_applies_the_layout_to_datasets_opened_without_it(stream, signature, caplog):
    layout = STATE.with_removed_inputs(["sr"])
    # a ShardedDataset opened with another layout is re-read with this one
    opened = dataset_from_arrays(stream, layout=STATE)
    with pytest.raises(DataError, match="key 'sr': not an input"):
        validate_dataset(opened, signature[:2])
    reread = validate_dataset(opened, signature[:2], layout=layout)
    assert reread.layout == layout and reread.skipped_keys == ("sr",)
    assert set(next(reread.iter_batches(8))) == {"input", "state"}

    class Wrapped:  # any other dataset keeps its own batch axes; the keys of removed inputs are left out
        def __init__(self, inner):
            self.inner = inner
        num_samples = property(lambda self: self.inner.num_samples)
        input_names = property(lambda self: self.inner.input_names)
        label_key = property(lambda self: self.inner.label_key)

        def array_info(self, key):
            return self.inner.array_info(key)

        def labels(self):
            return self.inner.labels()

        def iter_batches(self, *arguments, **keywords):
            return self.inner.iter_batches(*arguments, **keywords)

    with caplog.at_level(logging.INFO, logger="qgraph.data.validate"):
        checked = validate_dataset(Wrapped(opened), signature[:2], layout=layout)
    assert isinstance(checked, KeysLeftOut) and checked.input_names == ("input", "state")
    assert "ignoring key(s) sr" in caplog.text
    assert set(next(checked.iter_batches(4))) == {"input", "state"}


def test_a_removed_key_the_model_still_takes_is_explained(stream, signature):
    dataset = dataset_from_arrays(stream, layout=STATE.with_removed_inputs(["sr"]))
    message = _message(validate_dataset, dataset, signature)
    assert "input 'sr': missing from the data" in message and "which the model still takes" in message


# -------------------------------------------------------------------------------------- model signature
def test_validation_maps_the_batch_axis_to_the_model(stream, signature, caplog):
    dataset = dataset_from_arrays(stream, layout=STATE)
    with caplog.at_level(logging.INFO, logger="qgraph.data.validate"):
        assert validate_dataset(dataset, signature) is dataset
    assert "'state' holds its samples along axis 1; 'sr' is a constant fed with every batch" in caplog.text
    wide = dataset_from_arrays(dict(stream, state=np.zeros((3, SAMPLES, HIDDEN), np.float32)), layout=STATE)
    assert "dimension 0 is 3, expected 2" in _message(validate_dataset, wide, signature)
    fixed_batch = (signature[0], InputSpec("state", np.dtype(np.float32), (2, 1, HIDDEN)), signature[2])
    validate_dataset(dataset, fixed_batch, batch_size=1)
    message = _message(validate_dataset, dataset, fixed_batch, batch_size=4)
    assert "fixes the batch dimension to 1 (axis 1, the data's batch axis)" in message
    wrong_rate = dataset_from_arrays(dict(stream, sr=np.array([16000] * SAMPLES)), layout=STATE)
    assert "expected rank 0" in _message(validate_dataset, wrong_rate, signature)


def test_non_finite_values_located_along_the_batch_axis(stream, signature):
    stream["state"][1, 7, 2] = np.nan
    message = _message(validate_dataset, dataset_from_arrays(stream, layout=STATE), signature, scan_batch_size=3)
    assert "input 'state': holds 1 NaN and 0 Inf values" in message and "first in sample 7" in message
    specs = (*signature[:2], InputSpec("gain", np.dtype(np.float32), ()))
    arrays = {"input": stream["input"], "state": np.zeros_like(stream["state"]), "gain": np.array(np.inf, np.float32)}
    message = _message(validate_dataset, dataset_from_arrays(arrays, layout=STATE), specs, scan_batch_size=3)
    assert "'gain': holds 0 NaN and 1 Inf values" in message and "a constant fed with every batch" in message


def test_validate_batch_takes_scalars_and_batch_axes(stream, signature):
    checked = validate_batch(stream, signature, layout=STATE)
    assert checked["sr"].shape == () and checked["state"].shape == (2, SAMPLES, HIDDEN)
    removed = validate_batch(stream, signature[:2], layout=STATE.with_removed_inputs(["sr"]))
    assert set(removed) == {"input", "state"}
    assert "key 'state' has 2 samples" in _message(validate_batch, stream, signature)


# ------------------------------------------------------------------------------------------------- memory
def _peak_while_reading(folder, batch_size: int, shuffle: bool) -> int:
    dataset = open_dataset(folder, layout=STATE)
    next(dataset.iter_batches(batch_size, shuffle=shuffle))  # what the first batch imports or caches is not data
    tracemalloc.start()
    try:
        for batch in dataset.iter_batches(batch_size, shuffle=shuffle):
            assert sum(1 for shard in dataset._shards if shard._opened) <= 1
            del batch
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_samples(tmp_path):
    generator = np.random.default_rng(0)
    peaks = {}
    for count in (25, 250):
        folder = tmp_path / f"feeds_{count}"
        folder.mkdir()
        for index in range(count):
            np.savez(folder / f"feed_{index:04d}.npz", input=generator.standard_normal((1, 2048)).astype(np.float32),
                     state=generator.standard_normal((2, 1, 256)).astype(np.float32), sr=np.array(16000))
        peaks[count] = [_peak_while_reading(folder, 8, shuffle) for shuffle in (False, True)]
    batch_bytes = 8 * (2048 + 2 * 256) * 4
    whole_set = 250 * (2048 + 2 * 256) * 4
    # in order: one batch being gathered and the one just yielded, whatever the count
    assert peaks[250][0] < 1.1 * peaks[25][0] and peaks[250][0] < 3 * batch_bytes, peaks
    # shuffled: the permutation (8 bytes a sample) and a few index arrays besides
    assert peaks[250][1] < 3 * batch_bytes + 64 * 250 + 64 * 1024 < whole_set / 2, peaks
