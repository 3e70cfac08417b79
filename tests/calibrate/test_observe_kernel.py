"""The in-graph Observe kernel: the same observer state as observing the activations themselves, value for value."""

from __future__ import annotations

import multiprocessing
import shutil
import sysconfig

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qgraph import runtime
from qgraph.calibrate.driver import CalibrationConfig, calibrate
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.calibrate import observe_kernel
from qgraph.annotate.annotator import annotate
from qgraph.calibrate.blocked_outputs import remove_output_reorders
from qgraph.calibrate.observe_kernel import BatchStatistics, add_observe_nodes, library_path
from qgraph.calibrate.observers.histogram import HistogramObserver
from qgraph.calibrate.observers.minmax import MinMaxObserver
from qgraph.calibrate.observers.moving_average import MovingAverageMinMaxObserver
from qgraph.calibrate.probes import build_probes
from qgraph.quant.spec import QuantSpec
from qgraph.targets import get_target
from models.resnet import build_resnet
from tests.controlflow.models import speech_batches, speech_model

BUILT = library_path() is not None
needs_kernel = pytest.mark.skipif(not BUILT, reason="built without a C compiler (the first test checks that case)")


def test_the_library_is_built_where_a_compiler_is():
    compiler = sysconfig.get_config_var("CC")
    if compiler and shutil.which(compiler.split()[0]):
        assert BUILT, "a C compiler is present but the observer kernel library was not built"


def _session(tensors: dict[str, int], threads: int):
    """x -> Relu -> y, with Observe nodes on the tensors named (bins each); x is fed flat."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["values"])], [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    outputs = add_observe_nodes(model, tensors, threads=threads)
    onnx.checker.check_model(model)
    session = runtime.create_session(model, custom_operators=library_path(), threads=2, spinning=False)

    def run(batch: np.ndarray) -> dict[str, BatchStatistics]:
        names = [name for tensor in tensors for name in (outputs[tensor].counts, outputs[tensor].summary)]
        values = iter(session.run(names, {"x": batch.reshape(-1)}))
        return {tensor: BatchStatistics.from_outputs(next(values), next(values)) for tensor in tensors}

    return run


def _batches() -> list[np.ndarray]:
    generator = np.random.default_rng(0)
    large = generator.standard_normal(300_001).astype(np.float32)  # over several of the kernel's thread slices
    with_nan = large.copy()
    with_nan[::7] = np.nan
    with_nan[3] = np.inf
    return [
        generator.standard_normal((3, 1000)).astype(np.float32) * 0.1,  # signed from the start
        np.abs(generator.standard_normal((5, 70_000))).astype(np.float32) * 3,  # fits the layout: one pass
        large * 40,  # the range grows
        np.array([np.nan, 1.0, np.inf, -2e3], dtype=np.float32),
        np.zeros(10, dtype=np.float32),
        np.full(100_000, np.nan, dtype=np.float32),  # nothing finite
        np.zeros(0, dtype=np.float32),
        with_nan,  # non-finite values spread over every block
        large * 1e-30,  # tiny values: the double-precision path
    ]


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("bins", [16, 2048])
def test_histogram_statistics_give_the_observers_state_exactly(bins: int, threads: int) -> None:
    run = _session({"x": bins, "y": bins}, threads)
    for first in ("x", "y"):  # a signed tensor (x) and a non-negative one (y, the ReLU output)
        direct, from_kernel = HistogramObserver(bins=bins), HistogramObserver(bins=bins)
        for batch in _batches():
            direct.update(batch if first == "x" else np.maximum(batch, 0, where=~np.isnan(batch), out=batch.copy()))
            from_kernel.update_statistics(run(batch)[first])
        assert np.array_equal(from_kernel.counts, direct.counts)
        assert (from_kernel.exponent, from_kernel.signed_layout) == (direct.exponent, direct.signed_layout)
        assert (from_kernel.minimum, from_kernel.maximum, from_kernel.count) == (direct.minimum, direct.maximum,
                                                                                 direct.count)
        for method in ("entropy", "percentile", "mse"):
            assert from_kernel.compute_range(method) == direct.compute_range(method)


@needs_kernel
def test_extremes_only_statistics_give_min_max_and_moving_average_states() -> None:
    run = _session({"x": 0}, threads=2)
    observers = [MinMaxObserver(), MinMaxObserver(), MovingAverageMinMaxObserver(), MovingAverageMinMaxObserver()]
    for batch in _batches():
        statistics = run(batch)["x"]
        assert statistics.counts is None
        observers[0].update(batch)
        observers[1].update_statistics(statistics)
        observers[2].update(batch)
        observers[3].update_statistics(statistics)
    assert observers[0].state_dict() == observers[1].state_dict()
    assert observers[2].compute_range() == observers[3].compute_range()
    assert observers[2].batches == observers[3].batches


def test_per_channel_observers_need_the_tensor_itself() -> None:
    observer = MinMaxObserver(QuantSpec(axis=1))
    assert observer.kernel_bins() is None
    with pytest.raises(TypeError, match="per-channel"):
        observer.update_statistics(BatchStatistics(0.0, 1.0, 4))
    assert HistogramObserver(bins=64).kernel_bins() == 64
    with pytest.raises(ValueError, match="64 bins"):
        HistogramObserver(bins=64).update_statistics(BatchStatistics(0.0, 1.0, 4, np.zeros(16, np.int64), 1))


def test_a_failed_batch_is_refused() -> None:
    with pytest.raises(RuntimeError, match="Observe kernel failed"):
        BatchStatistics.from_outputs(np.zeros(0, np.int64), np.array([0, 0, 0, 0, -1.0]))


def _small_resnet() -> tuple[ir.Model, object]:
    model = optimize(ir.serde.deserialize_model(build_resnet("small")), None, OptimizeOptions()).model
    return model, annotate(model, get_target("ort-cpu").rules())


def _image_batches() -> list[dict[str, np.ndarray]]:
    generator = np.random.default_rng(1)
    return [{"input": generator.standard_normal((8, 1, 28, 28)).astype(np.float32)} for _ in range(3)]


@needs_kernel
@pytest.mark.parametrize("method", ["minmax", "ema", "entropy", "percentile", "mse"])
def test_calibrated_ranges_are_identical_with_the_kernel(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, plan = _small_resnet()
    config = CalibrationConfig(method=method, threads=2)
    with_kernel = calibrate(model, plan, _image_batches(), config)
    monkeypatch.setattr(observe_kernel, "library_path", lambda: None)
    without = calibrate(model, plan, _image_batches(), config)
    assert with_kernel.ranges == without.ranges


@needs_kernel
def test_the_probe_returns_statistics_and_only_what_else_is_needed() -> None:
    model, plan = _small_resnet()
    tensors = list(plan.activations)
    probe = build_probes(model, tensors, threads=2, in_graph={tensor: 128 for tensor in tensors[1:]})
    assert set(probe.statistics) == set(tensors[1:]) - {"input"}
    assert not set(probe.fetched) & set(probe.statistics)
    observed = dict(probe.run(_image_batches()[0]))
    assert isinstance(observed["input"], np.ndarray)  # a graph input comes from the feeds
    assert all(isinstance(observed[tensor], BatchStatistics) for tensor in probe.statistics)


@needs_kernel
def test_if_branches_are_observed_in_their_own_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    model = optimize(ir.serde.deserialize_model(speech_model(control="mode")), None, OptimizeOptions()).model
    plan = annotate(model, get_target("ort-cpu").rules())
    batches = speech_batches(4, mode=[True, False])
    config = CalibrationConfig(method="entropy", threads=2)
    probe = build_probes(model, list(plan.activations), threads=2, in_graph={t: 2048 for t in plan.activations})
    assert any(child.probe.statistics for child in probe.children)
    with_kernel = calibrate(model, plan, batches, config)
    monkeypatch.setattr(observe_kernel, "library_path", lambda: None)
    assert calibrate(model, plan, batches, config).ranges == with_kernel.ranges


def _optimized_conv_probe() -> bytes:
    """Two Conv+Relu with 32 channels, each Relu output observed by an Observe node, optimised by onnxruntime."""
    import os
    import tempfile

    generator = np.random.default_rng(0)
    nodes, initializers = [], []
    previous, channels = "x", 16
    for index in range(2):
        weight = generator.standard_normal((32, channels, 3, 3)).astype(np.float32) * 0.2
        initializers.append(onnx.numpy_helper.from_array(weight, f"w{index}"))
        nodes.append(helper.make_node("Conv", [previous, f"w{index}"], [f"c{index}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"]))
        previous, channels = f"r{index}", 32
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 8, 8])],
        [helper.make_tensor_value_info("r1", TensorProto.FLOAT, None)], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    add_observe_nodes(model, {"r0": 64, "r1": 64}, threads=1)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        runtime.create_session(model, optimize=True, optimized_model_path=path, custom_operators=library_path())
        with open(path, "rb") as file:
            return file.read()


@needs_kernel
def test_the_wire_edit_feeds_observe_nodes_the_blocked_tensors_and_orders_them() -> None:
    optimized = onnx.load_from_string(_optimized_conv_probe())
    reorders = {node.output[0]: node.input[0] for node in optimized.graph.node if node.op_type == "ReorderOutput"}
    if "r0" not in reorders:
        pytest.skip("onnxruntime does not use the blocked layout on this CPU")
    edited_bytes, blocked = remove_output_reorders(_optimized_conv_probe(), frozenset())
    assert blocked == []  # nothing the probe fetches changed
    edited = onnx.load_from_string(edited_bytes)
    observers = [node for node in edited.graph.node if node.domain == observe_kernel.DOMAIN]
    # r0 feeds only its Observe node: read blocked; r1 is also the graph output, so its reorder stays
    assert observers[-1].input[0] == reorders["r0"] and observers[0].input[0] == "r1"
    assert [node.op_type for node in edited.graph.node][-2:] == ["Observe", "Observe"]
    assert sum(node.op_type == "ReorderOutput" for node in edited.graph.node) == 1
    # the edited probe gives the statistics the optimised one gives
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 16, 8, 8)).astype(np.float32)}
    sessions = [runtime.create_session(model, custom_operators=library_path()) for model in
                (optimized.SerializeToString(), edited_bytes)]
    names = [output.name for output in optimized.graph.output]
    first, second = (dict(zip(names, session.run(names, feeds))) for session in sessions)
    assert all(np.array_equal(first[name], second[name]) for name in names)


def _observe_in_child(queue) -> None:
    run = _session({"x": 2048}, threads=2)
    queue.put(run(np.arange(200_000, dtype=np.float32))["x"].count)


@needs_kernel
def test_a_forked_child_can_observe_after_the_parent_started_its_threads() -> None:
    _session({"x": 2048}, threads=2)(np.arange(200_000, dtype=np.float32))  # the parent's pool now has a helper
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_observe_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in the observer kernel")
    assert queue.get(timeout=5) == 200_000


def test_fillers_take_exactly_their_size_and_parsers_skip_them() -> None:
    from qgraph.calibrate.probe_edit import _filler

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [], [])
    body = graph.SerializeToString()
    assert _filler(1) is None and _filler(-3) is None and _filler(0) == b""
    for size in [*range(2, 300), 16_383, 16_384, 16_385, 16_386, 16_387]:
        filler = _filler(size)
        assert len(filler) == size
        parsed = onnx.GraphProto.FromString(body + filler)
        assert [node.op_type for node in parsed.node] == ["Relu"]


@needs_kernel
def test_the_in_place_patches_make_the_same_model_as_the_rewrite() -> None:
    from qgraph.calibrate.probe_edit import plan_edit

    optimized = _optimized_conv_probe()
    edit = plan_edit(optimized, frozenset())
    patches = edit.patches()
    rewritten = onnx.load_from_string(edit.rewritten())
    edit.release()
    assert patches, "the edit fits in place"
    patched = bytearray(optimized)
    for offset, patch in patches:
        patched[offset:offset + len(patch)] = patch
    assert len(patched) == len(optimized)
    in_place = onnx.load_from_string(bytes(patched))
    assert list(in_place.graph.node) == list(rewritten.graph.node)
    assert list(in_place.graph.output) == list(rewritten.graph.output)
    assert [tensor.name for tensor in in_place.graph.initializer] == [t.name for t in rewritten.graph.initializer]
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 16, 8, 8)).astype(np.float32)}
    names = [output.name for output in rewritten.graph.output]
    results = [runtime.create_session(bytes(model), custom_operators=library_path()).run(names, feeds)
               for model in (patched, rewritten.SerializeToString())]
    assert all(np.array_equal(first, second) for first, second in zip(*results))


@needs_kernel
def test_a_tensor_the_kernel_cannot_read_is_returned_instead(caplog: pytest.LogCaptureFixture) -> None:
    """A double tensor whose type the model does not state: onnxruntime refuses the Observe node, the probe falls back."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["wide"], to=TensorProto.DOUBLE), helper.make_node("Relu", ["wide"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["n", 4])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert model.graph.node(0).outputs[0].dtype is None  # no value_info: the kernel is tried
    with caplog.at_level("WARNING"):
        probe = build_probes(model, ["wide"], threads=1, in_graph={"wide": 64})
    assert "returns them instead" in caplog.text
    assert not probe.statistics and probe.fetched == ["wide"]
    (tensor, value), = probe.run({"x": np.arange(8, dtype=np.float32).reshape(2, 4)})
    assert tensor == "wide" and value.dtype == np.float64 and value.max() == 7.0
