"""Shared pieces of ``tools/bench_ptq.py``: reference models, seeded image streams, sessions, timing and tables.

Both quantizers are driven from here with the same inputs: qgraph through :func:`qgraph.pipeline.optimize`
(the entry point ``qgraph optimize`` runs) and onnxruntime's ``quantize_static`` through a ``CalibrationDataReader``
over the same batches. Nothing here prints except :func:`print_table`.
"""

from __future__ import annotations

import collections
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from qgraph.calibrate.observers.histogram import DEFAULT_PERCENTILE

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

logger = logging.getLogger("bench_ptq")

IMAGENET_SHAPE = (3, 224, 224)


# ----------------------------------------------------------------------------------------------------- models
def build_reference_model(name: str) -> onnx.ModelProto:
    """The FP32 reference layout ``name`` (``resnet18``, ``mobilenet_v2``, ``resnet_small``, ``mobilenet_v2_small``)."""
    from models.mobilenet_v2 import build_mobilenet_v2
    from models.resnet import build_resnet

    builders: dict[str, Callable[[], onnx.ModelProto]] = {
        "resnet18": lambda: build_resnet("resnet18"),
        "mobilenet_v2": lambda: build_mobilenet_v2("mobilenet_v2"),
        "resnet_small": lambda: build_resnet("small"),
        "mobilenet_v2_small": lambda: build_mobilenet_v2("small"),
    }
    if name not in builders:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(builders)}")
    return builders[name]()


def input_shape_of(model: onnx.ModelProto) -> tuple[int, ...]:
    """The per-sample input shape (without the batch dimension) of a single-input model."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(int(dim.dim_value) for dim in dims[1:])


# ------------------------------------------------------------------------------------------------------- data
def random_image_batches(
    samples: int, batch_size: int, shape: Sequence[int] = IMAGENET_SHAPE, *, seed: int = 0, input_name: str = "input"
) -> Iterator[dict[str, np.ndarray]]:
    """Seeded standard-normal "images", generated batch by batch (never the whole set in memory)."""
    generator = np.random.default_rng(seed)
    produced = 0
    while produced < samples:
        count = min(batch_size, samples - produced)
        yield {input_name: generator.standard_normal((count, *shape), dtype=np.float32)}
        produced += count


def even_batch_size(samples: int, preferred: int) -> int:
    """The largest batch size ≤ ``preferred`` that divides ``samples``: quantize_static's histogram calibrators stack
    the batches of each tensor and fail on a shorter last batch (inhomogeneous shapes)."""
    return next(size for size in range(min(preferred, samples), 0, -1) if samples % size == 0)


def array_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive batches of in-memory arrays (all of the same length)."""
    length = len(next(iter(arrays.values())))
    for start in range(0, length, batch_size):
        yield {name: array[start : start + batch_size] for name, array in arrays.items()}


class BatchReader:
    """onnxruntime's ``CalibrationDataReader`` protocol over an iterable of feed dictionaries."""

    def __init__(self, batches: Iterable[Mapping[str, np.ndarray]]) -> None:
        self._iterator = iter(batches)

    def get_next(self):
        return next(self._iterator, None)

    def __iter__(self):  # onnxruntime >= 1.16 also iterates the reader
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


# ---------------------------------------------------------------------------------------------------- sessions
def create_session(model: onnx.ModelProto | str | os.PathLike, *, threads: int = 2, spinning: bool = True):
    """An onnxruntime CPU session with full graph optimisation and ``threads`` intra-op threads.

    ``spinning=False`` stops idle intra-op threads from busy-waiting: when several sessions alternate on 2 shared
    cores, a session's spinning pool thread otherwise steals the CPU from the next session's run (measured here: it
    turned MobileNetV2's equal qgraph/quantize_static latencies into a 35 % gap either way, depending on order).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def operator_histogram(model: onnx.ModelProto) -> collections.Counter:
    """How many nodes of each ``domain::op_type`` the main graph holds (default domain written bare)."""
    return collections.Counter(
        f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        for node in model.graph.node
    )


def optimized_operator_histogram(model: onnx.ModelProto, *, threads: int = 2) -> collections.Counter:
    """The operator histogram of the graph onnxruntime actually runs after its own fusions (ORT_ENABLE_ALL)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.optimized_model_filepath = str(path)
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return operator_histogram(onnx.load(str(path)))


# ------------------------------------------------------------------------------------------------- quantizers
def canonical_float_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """qgraph's canonical FP32 model (BatchNorm folded, constants lifted): what both quantizers start from."""
    import onnx_ir as ir

    from qgraph.pipeline import OptimizeOptions, optimize

    result = optimize(ir.serde.deserialize_model(model), None, OptimizeOptions())
    return ir.serde.serialize_model(result.model)


def qgraph_quantize(
    model: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    method: str = "minmax",
    output_format: str = "qoperator",
    per_channel: bool = True,
    batch_size: int = 16,
    samples: int | None = None,
    threads: int | None = 2,
):
    """qgraph PTQ of a FP32 model (canonicalize, annotate, calibrate, QDQ, lower) for ort-cpu; the OptimizeResult."""
    import onnx_ir as ir

    from qgraph.calibrate.driver import CalibrationConfig
    from qgraph.pipeline import OptimizeOptions, optimize
    from qgraph.ptq import QuantizeOptions
    from qgraph.targets import TargetOptions

    options = OptimizeOptions(
        quantization=QuantizeOptions(
            target="ort-cpu",
            target_options=TargetOptions(format=output_format, per_channel=per_channel),
            calibration=CalibrationConfig(method=method, samples=samples, batch_size=batch_size, threads=threads),
        )
    )
    return optimize(ir.serde.deserialize_model(model), None, options, calibration_data=batches)


#: quantize_static settings used for every comparison (stated in the tables).
ORT_SETTINGS = "QOperator, per_channel=True, reduce_range=True, activations QUInt8, weights QInt8"

#: qgraph method → onnxruntime CalibrationMethod (onnxruntime has no MSE calibration).
_ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def ort_quantize_static(
    model: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    method: str = "minmax",
    quant_format: str = "qoperator",
    per_channel: bool = True,
    reduce_range: bool = True,
    percentile: float = DEFAULT_PERCENTILE,
    preprocess: bool = True,
) -> onnx.ModelProto:
    """onnxruntime's ``quantize_static`` on ``model`` with ``batches`` (QUInt8 activations, QInt8 weights).

    ``preprocess`` first runs onnxruntime's documented ``quant_pre_process`` (shape inference and its basic graph
    optimisation, which folds BatchNorm), as onnxruntime's quantization guide recommends.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in _ORT_METHODS:
        raise SystemExit(f"quantize_static has no method {method!r}")
    extra = {"CalibPercentile": percentile} if method == "percentile" else {}
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "float.onnx"
        target = Path(folder) / "quantized.onnx"
        onnx.save(model, str(source))
        if preprocess:
            prepared = Path(folder) / "prepared.onnx"
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
            source = prepared
        quantize_static(
            str(source),
            str(target),
            BatchReader(batches),
            quant_format=QuantFormat.QOperator if quant_format == "qoperator" else QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, _ORT_METHODS[method]),
            extra_options=extra,
        )
        return onnx.load(str(target))


# ------------------------------------------------------------------------------------------- timing and tables
def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(function: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def timed_with_cpu(function: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process over all its threads, value)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    value = function()
    return time.perf_counter() - start, time.process_time() - cpu_start, value


def load_average() -> str:
    try:
        return " ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "?"


def alternate_latency(
    sessions: Mapping[str, object], feeds: Mapping[str, np.ndarray], *, iterations: int, warmup: int = 5, seed: int = 0
) -> dict[str, list[float]]:
    """Per-run latency (seconds) of each session, one run of each per round in a seeded random order, so that
    machine load and the previous run's after-effects hit all sessions alike."""
    import random

    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, dict(feeds))
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    shuffler = random.Random(seed)
    for _ in range(iterations):
        order = list(sessions)
        shuffler.shuffle(order)
        for name in order:
            session = sessions[name]
            start = time.perf_counter()
            session.run(None, dict(feeds))
            samples[name].append(time.perf_counter() - start)
    return samples


def format_value(value: object, digits: int = 2) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "—"
        return f"{value:.3g}" if 0 < abs(value) < 0.1 else f"{value:.{digits}f}"
    return str(value)


def print_table(
    title: str, headers: Sequence[str], rows: Iterable[Sequence[object]], *, notes: Sequence[str] = ()
) -> None:
    """A Markdown table on stdout (tools may print; the library never does)."""
    cells = [[format_value(value) for value in row] for row in rows]
    widths = [max(len(header), *(len(row[index]) for row in cells)) if cells else len(header)
              for index, header in enumerate(headers)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(header.ljust(width) for header, width in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in cells:
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |")
    for note in notes:
        print(f"\n{note}")
    sys.stdout.flush()


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM from /proc, else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
