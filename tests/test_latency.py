"""qgraph.latency: alternating rounds, paired and fast-quartile speed-ups that rank a slow model below a fast one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qgraph.errors import QGraphError
from qgraph.latency import LatencyOptions, LatencyTable, describe_table, measure_latency


def matmul_chain(size: int, depth: int) -> onnx.ModelProto:
    """``depth`` MatMuls of a batch×size input with size×size weights: the work grows with size² · depth."""
    weight = numpy_helper.from_array(np.eye(size, dtype=np.float32), "w")
    nodes, current = [], "x"
    for index in range(depth):
        nodes.append(helper.make_node("MatMul", [current, "w"], [f"h{index}"]))
        current = f"h{index}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_model_with_forty_times_the_work_is_measured_slower():
    models = {"small": matmul_chain(256, 1), "large": matmul_chain(256, 40)}
    table = measure_latency(models, LatencyOptions(batch_sizes=(1, 4), rounds=6, warmup=1))
    assert table.reference == "small" and table.batch_sizes == (1, 4) and table.models == ("small", "large")
    for batch_size in (1, 4):
        assert all(len(table.samples[batch_size][name]) == 6 for name in models)
        assert table.speedup("small", batch_size).median == pytest.approx(1.0)
        slow = table.speedup("large", batch_size)
        assert slow.fast_quartile < 0.5 and slow.median < 0.5 and slow.low <= slow.median <= slow.high
        assert table.median_seconds("large", batch_size) > table.median_seconds("small", batch_size)
        assert table.speedup("small", batch_size, reference="large").fast_quartile > 2
    lines = describe_table(table)
    assert len(lines) == 4 and lines[1].startswith("batch 1: large") and "vs small" in lines[1]


def test_speedups_come_from_paired_rounds_and_first_quartiles():
    samples = {1: {"fp32": (2.0, 2.0, 2.0, 8.0), "int8": (1.0, 4.0, 1.0, 1.0)}}
    table = LatencyTable("fp32", samples, threads=2)
    speedup = table.speedup("int8", 1)
    # per-round ratios 2, 0.5, 2, 8: median 2; first quartiles 2.0 and 1.0
    assert speedup.median == pytest.approx(2.0) and speedup.low == pytest.approx(1.625)
    assert speedup.fast_quartile == pytest.approx(2.0)
    assert table.fast_quartile_seconds("int8", 1) == pytest.approx(1.0)


def test_given_feeds_are_used_and_errors_are_clear():
    models = {"a": matmul_chain(8, 1)}
    feeds = {3: {"x": np.ones((3, 8), np.float32)}}
    table = measure_latency(models, LatencyOptions(batch_sizes=(3,), rounds=2, warmup=0), feeds=feeds)
    assert table.batch_sizes == (3,)
    with pytest.raises(QGraphError, match="reference"):
        measure_latency(models, LatencyOptions(rounds=1), reference="b")
    with pytest.raises(QGraphError, match="at least one model"):
        measure_latency({})
    with pytest.raises(QGraphError, match="batch sizes"):
        LatencyOptions(batch_sizes=(0,))
    with pytest.raises(QGraphError, match="threads"):
        LatencyOptions(threads=0)


def test_a_stopping_rule_ends_the_rounds_and_a_pool_builds_and_warms_each_session_once(monkeypatch):
    from qgraph import latency

    built: list[str] = []
    original = latency._session

    def counting(model, threads):
        built.append(model.graph.name + str(len(model.graph.node)))
        return original(model, threads)

    monkeypatch.setattr(latency, "_session", counting)
    models = {"small": matmul_chain(64, 1), "large": matmul_chain(64, 8)}
    asked: list[tuple[int, int, int]] = []

    def stop(batch_size, times, planned):
        asked.append((batch_size, len(times["small"]), planned))
        return len(times["small"]) >= 3

    options = LatencyOptions(batch_sizes=(1, 4), rounds=50, warmup=1, min_rounds=2, largest_first=True)
    pool = latency.SessionPool()
    table = measure_latency(models, options, stop=stop, pool=pool)
    # the largest batch size is measured first, the table keeps the options' order; three rounds each, not fifty
    assert table.batch_sizes == (1, 4)
    assert [size for size, _, _ in asked] == [4, 4, 1, 1] and all(planned == 50 for _, _, planned in asked)
    assert all(len(table.samples[size][name]) == 3 for size in (1, 4) for name in models)
    assert len(built) == 2 and pool.warmed == {(name, size) for name in models for size in (1, 4)}
    # a second measurement through the pool builds no session again; without a rule every round runs
    again = measure_latency({"large": models["large"]}, LatencyOptions(batch_sizes=(4,), rounds=5), pool=pool)
    assert len(built) == 2 and len(again.samples[4]["large"]) == 5
