"""The streamed weight-only flow (models with external data): same result as the in-memory flow, bad input refused."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from qgraph.cli import cli as cli_main
from qgraph.errors import ModelLoadError, QGraphError
from qgraph.ir import load_model
from qgraph.models.decoder import DecoderConfig, build_decoder, prefill_feeds, random_weights
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.weight_only.options import WeightOnlyOptions
from qgraph.weight_only.streaming import _write_segment, has_external_data, segments

CONFIG = DecoderConfig(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, vocab_size=512,
                       tie_embeddings=False, opset=21)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("streaming")
    proto = build_decoder(CONFIG, random_weights(CONFIG))
    onnx.save(proto, os.fspath(folder / "inline.onnx"))  # first: saving with external data edits the proto
    onnx.save(proto, os.fspath(folder / "external.onnx"), save_as_external_data=True, location="external.onnx.data",
              size_threshold=1024)
    return folder


def _batches():
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (16, 24))
    return [{"input_ids": ids[start:start + 8]} for start in range(0, 16, 8)]


def _initializers(path):
    proto = onnx.load(os.fspath(path))
    return proto, {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in proto.graph.initializer}


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_streamed_equals_in_memory(models, tmp_path, algorithm):
    options = WeightOnlyOptions(algorithm=algorithm, block_size=32)
    streamed_model = load_model(models / "external.onnx")
    assert has_external_data(streamed_model)
    streamed = optimize(streamed_model, tmp_path / "streamed.onnx", OptimizeOptions(weight_only=options),
                        calibration_data=_batches())
    in_memory = optimize(models / "inline.onnx", tmp_path / "in_memory.onnx",
                         OptimizeOptions(weight_only=options), calibration_data=_batches())
    # the streamed result is written with external data, the layers rewritten one at a time
    assert (tmp_path / "streamed.onnx.data").stat().st_size > 0
    assert not (tmp_path / "in_memory.onnx.data").exists()
    assert any(isinstance(value.const_value, ir.ExternalTensor) for value in streamed.model.graph.initializers.values()
               if value.name.endswith("_packed"))
    streamed_proto, streamed_arrays = _initializers(tmp_path / "streamed.onnx")
    memory_proto, memory_arrays = _initializers(tmp_path / "in_memory.onnx")
    assert [node.op_type for node in streamed_proto.graph.node] == [node.op_type for node in memory_proto.graph.node]
    assert sum(node.op_type == "MatMulNBits" for node in streamed_proto.graph.node) == 7 * CONFIG.num_layers + 1
    assert sorted(streamed_arrays) == sorted(memory_arrays)
    for name, array in memory_arrays.items():
        np.testing.assert_array_equal(streamed_arrays[name], array, err_msg=name)
    reports = [(layer.name, layer.relative_error) for layer in streamed.weight_only.layers]
    assert reports == [(layer.name, layer.relative_error) for layer in in_memory.weight_only.layers]

    from qgraph import runtime

    feeds = prefill_feeds(CONFIG, np.arange(10)[None] % CONFIG.vocab_size)
    outputs = [runtime.run(runtime.create_session(tmp_path / name), feeds)["logits"]
               for name in ("streamed.onnx", "in_memory.onnx")]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_segments_bound_weights_and_name_boundaries(models):
    model = load_model(models / "external.onnx")
    layer_bytes = 4 * (4 * 128 * 128 + 3 * 128 * 256)
    cuts = segments(model.graph, segment_bytes=layer_bytes)
    assert len(cuts) > CONFIG.num_layers
    assert sum(len(cut.nodes) for cut in cuts) == model.graph.num_nodes()
    for index, cut in enumerate(cuts):
        produced = {value.name for node in cut.nodes for value in node.outputs}
        assert not set(cut.inputs) & produced
        later = {value.name for other in cuts[index + 1:] for node in other.nodes for value in node.inputs
                 if value is not None}
        assert set(cut.outputs) == produced & later
    assert "input_ids" in cuts[0].inputs


def test_segment_files_reference_the_weights_instead_of_copying_them(models, tmp_path):
    model = load_model(models / "external.onnx")
    cut = segments(model.graph)[0]
    feeds = prefill_feeds(CONFIG, np.arange(4)[None])
    path = _write_segment(model, cut, cut.outputs, feeds, tmp_path)
    proto = onnx.load(os.fspath(path), load_external_data=False)
    external = [tensor for tensor in proto.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(not tensor.raw_data for tensor in external)
    assert path.stat().st_size < 100_000  # references only
    links = {entry.value for tensor in external for entry in tensor.external_data if entry.key == "location"}
    # a hard link (or a symbolic one across file systems) to the model's own data file: the same file, not a copy
    assert links and all(os.path.samefile(tmp_path / link, models / "external.onnx.data") for link in links)


def test_streamed_refuses_awq_and_sequential(models):
    for options in (WeightOnlyOptions(algorithm="awq"), WeightOnlyOptions(algorithm="gptq", sequential=True)):
        with pytest.raises(QGraphError, match="not streamed"):
            optimize(load_model(models / "external.onnx"), None, OptimizeOptions(weight_only=options),
                     calibration_data=_batches())


def test_missing_external_data_is_a_clear_error(models, tmp_path):
    shutil.copy(models / "external.onnx", tmp_path / "model.onnx")  # the .data file stays behind
    with pytest.raises(ModelLoadError, match="external data file 'external.onnx.data' .* is missing"):
        load_model(tmp_path / "model.onnx")
    result = CliRunner().invoke(cli_main, ["optimize", os.fspath(tmp_path / "model.onnx"), "-o",
                                           os.fspath(tmp_path / "out.onnx"), "--weight-only"])
    assert result.exit_code != 0
    assert "is missing" in result.output and "Traceback" not in result.output


def test_external_data_outside_the_folder_is_refused(models, tmp_path):
    proto = onnx.load(os.fspath(models / "external.onnx"), load_external_data=False)
    (tmp_path / "inner").mkdir()
    shutil.copy(models / "external.onnx.data", tmp_path / "external.onnx.data")
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../external.onnx.data"
    onnx.save(proto, os.fspath(tmp_path / "inner" / "model.onnx"))
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(tmp_path / "inner" / "model.onnx")
    result = CliRunner().invoke(cli_main, ["optimize", os.fspath(tmp_path / "inner" / "model.onnx"), "-o",
                                           os.fspath(tmp_path / "out.onnx"), "--weight-only"])
    assert result.exit_code != 0
    assert "outside the model's folder" in result.output and "Traceback" not in result.output
