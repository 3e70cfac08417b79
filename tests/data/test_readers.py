"""Readers round-trip data written here; batching, limit and shuffle; every bad-data case raises DataError."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.data import (
    InputSpec,
    dataset_from_arrays,
    input_signature,
    open_dataset,
    validate_batch,
    validate_dataset,
)
from qgraph.data.storage import npz_shard
from qgraph.errors import DataError, QGraphError
from qgraph.runtime import create_session

SAMPLES = 10


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    generator = np.random.default_rng(7)
    return {
        "image": generator.standard_normal((SAMPLES, 3, 4, 4)).astype(np.float32),
        "mask": generator.integers(0, 2, (SAMPLES, 5)).astype(np.int64),
        "label": np.arange(SAMPLES, dtype=np.int64) % 3,
    }


@pytest.fixture
def two_input_model() -> onnx.ModelProto:
    """image (batch, 3, 4, 4) float32 and mask (batch, 5) int64 → a float output."""
    nodes = [
        helper.make_node("ReduceSum", ["image"], ["image_sum"], keepdims=0, axes=[1, 2, 3]),
        helper.make_node("Cast", ["mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["mask_float"], ["mask_sum"], keepdims=0, axes=[1]),
        helper.make_node("Add", ["image_sum", "mask_sum"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "two_inputs",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 4, 4]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", 5])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=8)


def _collect(batches):
    batches = list(batches)
    return batches, {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def _write_npy_directory(directory, arrays):
    directory.mkdir()
    for key, value in arrays.items():
        np.save(directory / f"{key}.npy", value)
    return directory


def _write_test_data_set(directory, arrays, names=True):
    directory.mkdir()
    for index, key in enumerate(["image", "mask"]):
        tensor = numpy_helper.from_array(arrays[key], key if names else "")
        (directory / f"input_{index}.pb").write_bytes(tensor.SerializeToString())
    (directory / "output_0.pb").write_bytes(numpy_helper.from_array(np.zeros(SAMPLES, np.float32)).SerializeToString())
    return directory


# --------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("writer", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
def test_npz_round_trip_with_labels(tmp_path, arrays, writer):
    writer(tmp_path / "data.npz", **arrays)
    dataset = open_dataset(tmp_path / "data.npz", label_key="label")
    assert dataset.num_samples == SAMPLES
    assert dataset.input_names == ("image", "mask")
    assert dataset.label_key == "label"
    assert dataset.array_info("image").shape == (SAMPLES, 3, 4, 4)
    assert dataset.array_info("mask").dtype == np.int64
    _, gathered = _collect(dataset.iter_batches(4))
    for key in arrays:
        np.testing.assert_array_equal(gathered[key], arrays[key])
    np.testing.assert_array_equal(dataset.labels(), arrays["label"])
    without_labels = next(dataset.iter_batches(4, include_labels=False))
    assert set(without_labels) == {"image", "mask"}


def test_stored_npz_members_are_memory_mapped(tmp_path, arrays):
    np.savez(tmp_path / "stored.npz", **arrays)
    np.savez_compressed(tmp_path / "compressed.npz", **arrays)
    stored, compressed = npz_shard(tmp_path / "stored.npz"), npz_shard(tmp_path / "compressed.npz")
    assert isinstance(stored.array("image"), np.memmap)
    assert not isinstance(compressed.array("image"), np.memmap)
    np.testing.assert_array_equal(stored.array("image"), arrays["image"])
    # Batches are plain arrays, detached from the file.
    batch = next(open_dataset(tmp_path / "stored.npz", label_key="label").iter_batches(3))
    assert type(batch["image"]) is np.ndarray


def _resident_bytes() -> int:
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_walking_a_large_npz_keeps_one_batch_resident(tmp_path):
    images = np.ones((256, 64, 1024), np.float32)  # 64 MB
    np.savez(tmp_path / "large.npz", input=images)
    del images
    dataset = open_dataset(tmp_path / "large.npz")
    before = _resident_bytes()
    total = 0.0
    for batch in dataset.iter_batches(16):
        total += float(batch["input"][0, 0, 0])
        shard = dataset._current
        grown = _resident_bytes() - before
        assert grown < 24 * 2 ** 20, f"{grown / 2 ** 20:.0f} MB resident after {total:.0f} samples"
    assert shard is not None and total == 16.0


def test_npy_directory_round_trip_memory_mapped(tmp_path, arrays):
    directory = _write_npy_directory(tmp_path / "set", arrays)
    dataset = open_dataset(directory, label_key="label")
    assert set(dataset.input_names) == {"image", "mask"}
    assert isinstance(dataset._shards[0].array("image"), np.memmap)
    _, gathered = _collect(dataset.iter_batches(3))
    for key in arrays:
        np.testing.assert_array_equal(gathered[key], arrays[key])


def test_directory_of_npz_shards_concatenates_in_name_order(tmp_path, arrays):
    directory = tmp_path / "shards"
    directory.mkdir()
    np.savez(directory / "part0.npz", **{key: value[:4] for key, value in arrays.items()})
    np.savez_compressed(directory / "part1.npz", **{key: value[4:] for key, value in arrays.items()})
    dataset = open_dataset(directory, label_key="label")
    assert dataset.num_samples == SAMPLES
    _, gathered = _collect(dataset.iter_batches(3))  # batches straddle the shard boundary
    np.testing.assert_array_equal(gathered["image"], arrays["image"])
    _, shuffled = _collect(dataset.iter_batches(3, shuffle=True, seed=5))
    order = np.random.default_rng(5).permutation(SAMPLES)
    np.testing.assert_array_equal(shuffled["image"], arrays["image"][order])
    np.testing.assert_array_equal(shuffled["label"], arrays["label"][order])


def test_test_data_set_round_trip_by_order(tmp_path, arrays, two_input_model):
    directory = _write_test_data_set(tmp_path / "test_data_set_0", arrays, names=False)
    names = [spec.name for spec in input_signature(two_input_model)]
    dataset = open_dataset(directory, input_names=names)
    assert dataset.input_names == ("image", "mask")
    _, gathered = _collect(dataset.iter_batches(4))
    np.testing.assert_array_equal(gathered["image"], arrays["image"])
    np.testing.assert_array_equal(gathered["mask"], arrays["mask"])
    # Without names, unnamed TensorProtos become input_0, input_1.
    assert open_dataset(directory).input_names == ("input_0", "input_1")


def test_parent_of_test_data_sets_concatenates_them(tmp_path, arrays, two_input_model):
    parent = tmp_path / "model"
    parent.mkdir()
    for number, part in enumerate([slice(0, 6), slice(6, SAMPLES)]):
        _write_test_data_set(parent / f"test_data_set_{number}", {key: value[part] for key, value in arrays.items()})
    dataset = open_dataset(parent)
    assert dataset.input_names == ("image", "mask")  # names stored in the TensorProtos
    assert dataset.num_samples == SAMPLES
    validate_dataset(dataset, two_input_model)
    _, gathered = _collect(dataset.iter_batches(4))
    np.testing.assert_array_equal(gathered["mask"], arrays["mask"])


def test_batches_feed_onnxruntime(tmp_path, arrays, two_input_model):
    np.savez(tmp_path / "data.npz", **arrays)
    dataset = validate_dataset(open_dataset(tmp_path / "data.npz", label_key="label"), two_input_model,
                               num_classes=3)
    session = create_session(two_input_model)
    outputs = [session.run(None, batch)[0] for batch in dataset.iter_batches(4, include_labels=False)]
    expected = arrays["image"].sum(axis=(1, 2, 3)) + arrays["mask"].sum(axis=1)
    np.testing.assert_allclose(np.concatenate(outputs), expected, rtol=1e-5)


# ------------------------------------------------------------------------------------------ batching and order
def test_batch_sizes_limit_and_last_partial_batch(arrays):
    dataset = dataset_from_arrays(arrays, label_key="label")
    assert [len(batch["image"]) for batch in dataset.iter_batches(4)] == [4, 4, 2]
    assert [len(batch["image"]) for batch in dataset.iter_batches(4, limit=5)] == [4, 1]
    assert [len(batch["image"]) for batch in dataset.iter_batches(20)] == [SAMPLES]
    assert list(dataset.iter_batches(4, limit=0)) == []
    limited = np.concatenate([batch["label"] for batch in dataset.iter_batches(3, limit=7)])
    np.testing.assert_array_equal(limited, arrays["label"][:7])


def test_shuffle_is_deterministic_per_seed_and_a_permutation(arrays):
    dataset = dataset_from_arrays(arrays)
    first = np.concatenate([batch["image"] for batch in dataset.iter_batches(3, shuffle=True, seed=1)])
    again = np.concatenate([batch["image"] for batch in dataset.iter_batches(3, shuffle=True, seed=1)])
    other = np.concatenate([batch["image"] for batch in dataset.iter_batches(3, shuffle=True, seed=2)])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, arrays["image"])
    np.testing.assert_array_equal(np.sort(first.reshape(SAMPLES, -1), axis=0),
                                  np.sort(arrays["image"].reshape(SAMPLES, -1), axis=0))
    limited = list(dataset.iter_batches(4, limit=6, shuffle=True, seed=1))
    assert [len(batch["image"]) for batch in limited] == [4, 2]
    np.testing.assert_array_equal(np.concatenate([batch["image"] for batch in limited]), first[:6])


@pytest.mark.parametrize("batch_size, limit", [(0, None), (-1, None), (2, -1), (1.5, None)])
def test_bad_batch_size_or_limit(arrays, batch_size, limit):
    with pytest.raises(DataError):
        next(dataset_from_arrays(arrays).iter_batches(batch_size, limit=limit))


# ------------------------------------------------------------------------------------------ signature sources
def test_signature_from_model_and_session_agree(two_input_model):
    from_model = input_signature(two_input_model)
    from_session = input_signature(create_session(two_input_model))
    assert from_model == from_session == (
        InputSpec("image", np.dtype(np.float32), ("batch", 3, 4, 4)),
        InputSpec("mask", np.dtype(np.int64), ("batch", 5)),
    )


# -------------------------------------------------------------------------------------------------- bad data
def _expect_error(match_key: str, dataset, model, **options):
    with pytest.raises(DataError) as caught:
        validate_dataset(dataset, model, **options)
    message = str(caught.value)
    assert f"'{match_key}'" in message, message
    assert "\n" not in message
    assert isinstance(caught.value, QGraphError)
    return message


def test_missing_key(arrays, two_input_model):
    del arrays["mask"]
    message = _expect_error("mask", dataset_from_arrays(arrays, label_key="label"), two_input_model)
    assert "missing" in message


def test_unexpected_key(arrays, two_input_model):
    arrays["extra"] = np.zeros((SAMPLES, 2), np.float32)
    message = _expect_error("extra", dataset_from_arrays(arrays, label_key="label"), two_input_model)
    assert "not an input" in message


def test_label_key_not_declared_is_unexpected(arrays, two_input_model):
    message = _expect_error("label", dataset_from_arrays(arrays), two_input_model)
    assert "label key" in message


def test_wrong_rank(arrays, two_input_model):
    arrays["image"] = arrays["image"].reshape(SAMPLES, 48)
    message = _expect_error("image", dataset_from_arrays(arrays, label_key="label"), two_input_model)
    assert "rank 4" in message and "rank 2" in message and "(batch, 3, 4, 4)" in message


def test_wrong_fixed_dimension(arrays, two_input_model):
    arrays["image"] = np.zeros((SAMPLES, 1, 4, 4), np.float32)
    message = _expect_error("image", dataset_from_arrays(arrays, label_key="label"), two_input_model)
    assert "dimension 1 is 1, expected 3" in message


def test_fixed_batch_dimension_needs_matching_batch_size(arrays):
    specs = [InputSpec("image", np.dtype(np.float32), (1, 3, 4, 4)), InputSpec("mask", np.dtype(np.int64), (1, 5))]
    dataset = dataset_from_arrays(arrays, label_key="label")
    validate_dataset(dataset, specs, batch_size=1)
    message = _expect_error("image", dataset, specs, batch_size=4)
    assert "batch dimension to 1" in message


def test_float64_refused_unless_cast_requested(arrays, two_input_model, caplog):
    arrays["image"] = arrays["image"].astype(np.float64)
    dataset = dataset_from_arrays(arrays, label_key="label")
    message = _expect_error("image", dataset, two_input_model)
    assert "float32" in message and "float64" in message and "cast_float64" in message
    with caplog.at_level(logging.WARNING, logger="qgraph.data.validate"):
        cast = validate_dataset(dataset, two_input_model, cast_float64=True)
    assert "casting" in caplog.text
    assert cast.array_info("image").dtype == np.float32
    batch = next(cast.iter_batches(4))
    assert batch["image"].dtype == np.float32 and batch["mask"].dtype == np.int64
    np.testing.assert_allclose(batch["image"], arrays["image"][:4].astype(np.float32))


def test_other_dtypes_are_never_cast(arrays, two_input_model):
    arrays["mask"] = arrays["mask"].astype(np.int32)
    message = _expect_error("mask", dataset_from_arrays(arrays, label_key="label"), two_input_model,
                            cast_float64=True)
    assert "expected dtype int64, got int32" in message


def test_nan_and_inf_counted_per_key(tmp_path, arrays, two_input_model):
    arrays["image"][3, 0, 0, 0] = np.nan
    arrays["image"][7, 1, 2, 3] = np.nan
    arrays["image"][8, 2, 2, 2] = np.inf
    np.savez(tmp_path / "bad.npz", **arrays)
    dataset = open_dataset(tmp_path / "bad.npz", label_key="label")
    message = _expect_error("image", dataset, two_input_model, scan_batch_size=4)
    assert "2 NaN and 1 Inf" in message and "sample 3" in message
    validate_dataset(dataset, two_input_model, check_values=False)  # the scan can be skipped


def test_float64_values_beyond_float32_range_are_reported_after_cast(arrays, two_input_model):
    arrays["image"] = arrays["image"].astype(np.float64)
    arrays["image"][2, 0, 0, 0] = 1e300
    message = _expect_error("image", dataset_from_arrays(arrays, label_key="label"), two_input_model,
                            cast_float64=True)
    assert "1 Inf" in message


def test_empty_dataset(tmp_path, arrays, two_input_model):
    np.savez(tmp_path / "empty.npz", **{key: value[:0] for key, value in arrays.items()})
    with pytest.raises(DataError, match="empty"):
        validate_dataset(open_dataset(tmp_path / "empty.npz", label_key="label"), two_input_model)


def test_labels_missing_when_classes_given(arrays, two_input_model):
    del arrays["label"]
    with pytest.raises(DataError, match="labels are required"):
        validate_dataset(dataset_from_arrays(arrays), two_input_model, num_classes=3)


def test_label_key_absent_from_file(tmp_path, arrays):
    del arrays["label"]
    np.savez(tmp_path / "data.npz", **arrays)
    with pytest.raises(DataError, match="label key 'label' not found"):
        open_dataset(tmp_path / "data.npz", label_key="label")


def test_labels_out_of_range(arrays, two_input_model):
    arrays["label"][4] = 3
    arrays["label"][5] = -1
    message = _expect_error("label", dataset_from_arrays(arrays, label_key="label"), two_input_model, num_classes=3)
    assert "[0, 2]" in message and "2 out of range" in message


def test_labels_must_be_integers(arrays, two_input_model):
    arrays["label"] = arrays["label"].astype(np.float32)
    message = _expect_error("label", dataset_from_arrays(arrays, label_key="label"), two_input_model, num_classes=3)
    assert "integer" in message


def test_label_count_differs_from_samples(tmp_path, arrays):
    arrays["label"] = arrays["label"][:-1]
    np.savez(tmp_path / "data.npz", **arrays)
    with pytest.raises(DataError, match="'label' has 9 samples but key 'image' has 10"):
        open_dataset(tmp_path / "data.npz", label_key="label")
    with pytest.raises(DataError, match="'label'"):
        validate_batch(arrays, [InputSpec("image", np.dtype(np.float32), ("batch", 3, 4, 4)),
                                InputSpec("mask", np.dtype(np.int64), ("batch", 5))], label_key="label")


def test_validate_batch_accepts_good_batch_and_casts(arrays, two_input_model):
    arrays["image"] = arrays["image"].astype(np.float64)
    checked = validate_batch(arrays, two_input_model, label_key="label", num_classes=3, cast_float64=True)
    assert checked["image"].dtype == np.float32
    np.testing.assert_array_equal(checked["label"], arrays["label"])


@pytest.mark.parametrize("content, message", [
    (b"not a zip file", "not a readable .npz"),
    (None, "no such file"),
])
def test_unreadable_paths(tmp_path, content, message):
    path = tmp_path / "data.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        open_dataset(path)


def test_directory_forms_refused(tmp_path, arrays):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .npz, .npy"):
        open_dataset(empty)
    mixed = _write_npy_directory(tmp_path / "mixed", arrays)
    np.savez(mixed / "more.npz", **arrays)
    with pytest.raises(DataError, match="both .npy and .npz"):
        open_dataset(mixed)
    corrupt = tmp_path / "test_data_set_0"
    corrupt.mkdir()
    (corrupt / "input_0.pb").write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(DataError, match="input_0.pb"):
        open_dataset(corrupt)


def test_shards_with_different_keys_or_shapes(tmp_path, arrays):
    directory = tmp_path / "shards"
    directory.mkdir()
    np.savez(directory / "a.npz", **arrays)
    np.savez(directory / "b.npz", image=arrays["image"], label=arrays["label"])
    with pytest.raises(DataError, match="'mask'"):
        open_dataset(directory, label_key="label")
    np.savez(directory / "b.npz", image=arrays["image"][:, :2], mask=arrays["mask"], label=arrays["label"])
    with pytest.raises(DataError, match="key 'image'"):
        open_dataset(directory, label_key="label")
