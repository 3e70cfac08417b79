"""The ONNX node test cases run through qgraph, one case at a time, each classified by what happened.

A case is the ``model.onnx`` plus ``test_data_set_*`` folders that the onnx wheel ships under
``onnx/backend/test/data/node``. For each case:

1. onnxruntime (graph optimisation disabled, one thread) runs the *original* model on every data set, twice, to learn
   whether the runtime can execute it at all and whether it is deterministic;
2. qgraph loads it (``load_model``: checks, opset/IR normalisation, shape inference), runs the canonical pipeline to
   a fixed point (:func:`qgraph.pipeline.optimize`) and saves it;
3. the saved file is checked with ``onnx.checker`` (full check; required only where the original passes it) and run
   in onnxruntime on the same inputs.

A case named ``<case>@constant`` is the same case with its tensor inputs turned into initializers holding the first
data set: constant folding then evaluates every operator ahead of time, and the folded result must match too.

Outcomes:

``passed``
    every output reproduces the case's expected output or the original model's onnxruntime output, with the
    tolerance of onnx's own backend tests (rtol 1e-3, atol 1e-7); for a model with random operators (Bernoulli,
    Random*, training-mode Dropout: their seeds are runtime-specific) or whose outputs differ between two runs,
    only the output types and shapes must agree.
``passed_converted``
    onnxruntime cannot run the original (typically opset 22, newer than the runtime), but qgraph converted it to a
    model the runtime runs and that reproduces the expected outputs.
``not_runnable``
    onnxruntime refuses or fails on the original, and qgraph's result is not runnable either (nothing to compare).
``refused``
    qgraph's loader refused the model with a :class:`~qgraph.errors.QGraphError` (a clear, one-line reason).
``failed``
    qgraph crashed with any other exception, wrote an invalid model, produced a model the runtime cannot run where
    it ran the original, or changed a result.

:func:`run_suite` runs the cases in a few worker processes: a worker that dies (a native crash) or overruns its time
budget is replaced and its case recorded as failed.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

OUTCOMES = ("passed", "passed_converted", "not_runnable", "refused", "failed")
RELATIVE_TOLERANCE = 1e-3
ABSOLUTE_TOLERANCE = 1e-7
CASE_TIMEOUT_SECONDS = 120.0


def node_cases_folder() -> Path:
    import onnx

    return Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "node"


def all_case_names() -> list[str]:
    folder = node_cases_folder()
    return sorted(name for name in os.listdir(folder) if (folder / name / "model.onnx").is_file())


def sample_case_names(names: Sequence[str], every: int) -> list[str]:
    """A deterministic sample: every ``every``-th case of the sorted list (all of them for ``every`` <= 1)."""
    return list(names) if every <= 1 else [name for index, name in enumerate(sorted(names)) if index % every == 0]


@dataclasses.dataclass
class CaseResult:
    name: str
    outcome: str
    reason: str = ""
    seconds: float = 0.0
    #: For refused cases: whether onnxruntime could run the original (a refusal that might be too strict).
    original_runnable: bool | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Reading a case's data and comparing values (tensors, sequences, optionals, maps).


def _read_value(path: str, type_proto):
    import onnx
    from onnx import numpy_helper

    data = Path(path).read_bytes()
    kind = type_proto.WhichOneof("value") if type_proto is not None else "tensor_type"
    if kind == "sequence_type":
        proto = onnx.SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if kind == "optional_type":
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    if kind == "map_type":
        proto = onnx.MapProto()
        proto.ParseFromString(data)
        return numpy_helper.to_dict(proto)
    proto = onnx.TensorProto()
    proto.ParseFromString(data)
    return numpy_helper.to_array(proto)


def _read_data_sets(case_folder: Path, model) -> list[tuple[dict, list]]:
    """(feeds by input name, expected outputs in graph-output order) for every data set of the case."""
    initializer_names = {tensor.name for tensor in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializer_names]
    data_sets = []
    for folder in sorted(glob.glob(os.fspath(case_folder / "test_data_set_*"))):
        input_files = sorted(glob.glob(os.path.join(folder, "input_*.pb")), key=_file_index)
        output_files = sorted(glob.glob(os.path.join(folder, "output_*.pb")), key=_file_index)
        feeds = {}
        for index, path in enumerate(input_files):
            value_info = inputs[index]
            feeds[value_info.name] = _read_value(path, value_info.type)
        expected = [
            _read_value(path, model.graph.output[index].type if index < len(model.graph.output) else None)
            for index, path in enumerate(output_files)
        ]
        data_sets.append((feeds, expected))
    return data_sets


#: Operators whose outputs are random: only types and shapes can be compared (their seeds are runtime-specific).
RANDOM_OPERATORS = frozenset(
    {"Bernoulli", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}
)


def _has_random_operator(model) -> bool:
    def nodes(graph_nodes):
        for node in graph_nodes:
            yield node
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    yield from nodes(attribute.g.node)
                for subgraph in attribute.graphs:
                    yield from nodes(subgraph.node)

    every = list(nodes(model.graph.node)) + [node for function in model.functions for node in nodes(function.node)]
    return any(
        node.op_type in RANDOM_OPERATORS or (node.op_type == "Dropout" and len(node.input) >= 3 and node.input[2])
        for node in every
    )


def _feed_names(model) -> list[str]:
    """The graph inputs a caller feeds (initializers listed as inputs are optional, not part of the interface)."""
    initializer_names = {tensor.name for tensor in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initializer_names]


def _file_index(path: str) -> int:
    return int(Path(path).stem.rsplit("_", 1)[1])


def _difference(actual, expected, *, shapes_only: bool = False) -> str | None:
    """``None`` when ``actual`` reproduces ``expected``, else a short description of the first difference."""
    import numpy as np

    if expected is None or actual is None:
        return None if expected is None and actual is None else f"{type(actual).__name__} vs {type(expected).__name__}"
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            return "map keys differ"
        return _first_difference(((f"[{key!r}]", actual[key], expected[key]) for key in expected), shapes_only)
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            length = len(actual) if isinstance(actual, list) else type(actual).__name__
            return f"sequence length {length} vs {len(expected)}"
        pairs = enumerate(zip(actual, expected))
        return _first_difference(((f"[{index}]", item, wanted) for index, (item, wanted) in pairs), shapes_only)
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape:
        return f"shape {actual.shape} vs {expected.shape}"
    if shapes_only:
        return None
    if expected.dtype.kind in "OSU" or actual.dtype.kind in "OSU":
        same = actual.astype(object).tolist() == expected.astype(object).tolist()
        return None if same else "string values differ"
    if expected.dtype.kind == "b" or expected.dtype.kind in "iu" and actual.dtype.kind in "iub":
        return None if np.array_equal(actual, expected) else "integer/bool values differ"
    try:
        actual64 = actual.astype(np.float64)
        expected64 = expected.astype(np.float64)
    except (TypeError, ValueError):
        return None if np.array_equal(actual, expected) else "values differ"
    if np.allclose(actual64, expected64, rtol=RELATIVE_TOLERANCE, atol=ABSOLUTE_TOLERANCE, equal_nan=True):
        return None
    with np.errstate(invalid="ignore"):
        worst = float(np.nanmax(np.abs(actual64 - expected64))) if actual64.size else 0.0
    return f"values differ (max |diff| {worst:.3g})"


def _outputs_difference(actual: list, expected: list, *, shapes_only: bool = False) -> str | None:
    if len(actual) != len(expected):
        return f"{len(actual)} outputs vs {len(expected)}"
    pairs = enumerate(zip(actual, expected))
    return _first_difference(((f"output {index}:", value, wanted) for index, (value, wanted) in pairs), shapes_only)


def _first_difference(items: Iterable[tuple[str, object, object]], shapes_only: bool) -> str | None:
    """The first difference among ``(label, actual, expected)`` items, prefixed by its label; None when all agree."""
    for label, actual, expected in items:
        found = _difference(actual, expected, shapes_only=shapes_only)
        if found:
            return f"{label} {found}"
    return None


def _run_in_runtime(model_bytes_or_path, feeds: dict, output_names: list[str]) -> list:
    from qgraph import runtime

    session = runtime.create_session(model_bytes_or_path, threads=1)
    accepted = {model_input.name for model_input in session.get_inputs()}
    return session.run(output_names, {name: value for name, value in feeds.items() if name in accepted})


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


# --------------------------------------------------------------------------------------------------------------
# One case.


#: Suffix of a case name for its variant whose tensor inputs are initializers holding the first data set, so that
#: constant folding evaluates every operator ahead of time (``test_add@constant``).
CONSTANT_VARIANT = "@constant"


def constant_variant_names(names: Sequence[str]) -> list[str]:
    return [name + CONSTANT_VARIANT for name in names]


def _with_constant_inputs(model, data_sets: list[tuple[dict, list]]):
    """The model with its tensor inputs turned into initializers holding the first data set's values."""
    import numpy as np
    from onnx import numpy_helper

    feeds, expected = data_sets[0]
    variant = type(model)()
    variant.CopyFrom(model)
    kept_inputs, remaining_feeds = [], {}
    for value in variant.graph.input:
        data = feeds.get(value.name)
        is_tensor = value.type.WhichOneof("value") == "tensor_type" and isinstance(data, np.ndarray)
        tensor = None
        if is_tensor and data.dtype != object:
            try:
                tensor = numpy_helper.from_array(data, value.name)
            except ValueError:  # onnx 1.17 cannot write an odd number of 4-bit values
                tensor = None
        if tensor is not None:
            variant.graph.initializer.append(tensor)
        else:
            kept_inputs.append(value)
            if value.name in feeds:
                remaining_feeds[value.name] = data
    del variant.graph.input[:]
    variant.graph.input.extend(kept_inputs)
    return variant, [(remaining_feeds, expected)]


def run_case(name: str, work_folder: Path, passes: Sequence[str] | None = None) -> CaseResult:
    """Run one node test case through qgraph and classify it; never raises.

    ``passes`` replaces the canonical pipeline (``()`` checks load and save alone).
    """
    start = time.perf_counter()
    try:
        result = _run_case(name, work_folder, passes)
    except Exception as error:  # a bug in this harness must not stop the suite; record it
        result = CaseResult(name, "failed", f"harness error {_first_line(error)}\n{traceback.format_exc()}")
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def _run_case(name: str, work_folder: Path, passes: Sequence[str] | None) -> CaseResult:
    import onnx

    from qgraph.errors import QGraphError
    from qgraph.ir import load_model
    from qgraph.pipeline import OptimizeOptions, optimize

    case_name = name.removesuffix(CONSTANT_VARIANT)
    case_folder = node_cases_folder() / case_name
    model_path = case_folder / "model.onnx"
    original = onnx.load(os.fspath(model_path))
    output_names = [value.name for value in original.graph.output]
    data_sets = _read_data_sets(case_folder, original)
    case_work = work_folder / name
    case_work.mkdir(parents=True, exist_ok=True)
    if name.endswith(CONSTANT_VARIANT):
        original, data_sets = _with_constant_inputs(original, data_sets)
        model_path = case_work / "original.onnx"
        onnx.save(original, os.fspath(model_path))

    # 1. The original in onnxruntime: runnable? deterministic?
    original_outputs: list[list] | None = []
    original_error = ""
    deterministic = not _has_random_operator(original)
    try:
        for feeds, _ in data_sets:
            first = _run_in_runtime(os.fspath(model_path), feeds, output_names)
            second = _run_in_runtime(os.fspath(model_path), feeds, output_names)
            if _outputs_difference(first, second) is not None:
                deterministic = False
            original_outputs.append(first)
    except Exception as error:
        original_outputs, original_error = None, _first_line(error)
    runnable = original_outputs is not None

    try:
        onnx.checker.check_model(original, full_check=True)
        original_valid = True
    except Exception:
        original_valid = False

    # 2. qgraph: load (refusals are expected here), canonicalize, save.
    try:
        model = load_model(model_path)
    except QGraphError as error:
        return CaseResult(name, "refused", _first_line(error), original_runnable=runnable)
    except Exception as error:
        return CaseResult(name, "failed", f"load crashed: {_first_line(error)}")
    saved_path = case_work / "model.onnx"
    try:
        options = OptimizeOptions(passes=tuple(passes) if passes is not None else None)
        optimize(model, saved_path, options, input_path=model_path)
    except Exception as error:
        stage = "pipeline refused" if isinstance(error, QGraphError) else "pipeline crashed"
        return CaseResult(name, "failed", f"{stage}: {_first_line(error)}")

    # 3. The saved model: valid, runnable, same results.
    try:
        saved = onnx.load(os.fspath(saved_path))
        if original_valid:
            onnx.checker.check_model(saved, full_check=True)
    except Exception as error:
        return CaseResult(name, "failed", f"invalid saved model: {_first_line(error)}")
    saved_output_names = [value.name for value in saved.graph.output]
    if saved_output_names != output_names:
        return CaseResult(name, "failed", f"graph outputs changed: {output_names} -> {saved_output_names}")
    input_names, saved_input_names = _feed_names(original), _feed_names(saved)
    if saved_input_names != input_names:
        return CaseResult(name, "failed", f"graph inputs changed: {input_names} -> {saved_input_names}")
    try:
        qgraph_outputs = [_run_in_runtime(os.fspath(saved_path), feeds, output_names) for feeds, _ in data_sets]
    except Exception as error:
        if runnable:
            return CaseResult(name, "failed", f"runtime cannot run qgraph's model: {_first_line(error)}")
        return CaseResult(name, "not_runnable", f"original: {original_error}")
    if not runnable:
        # Without the original's outputs, learn determinism (random operators) from qgraph's model itself.
        for index, (feeds, _) in enumerate(data_sets):
            again = _run_in_runtime(os.fspath(saved_path), feeds, output_names)
            if _outputs_difference(again, qgraph_outputs[index]) is not None:
                deterministic = False

    for index, (_, expected) in enumerate(data_sets):
        if not deterministic:
            reference = original_outputs[index] if runnable else expected
            found = _outputs_difference(qgraph_outputs[index], reference, shapes_only=True)
            if found:
                return CaseResult(name, "failed", f"data set {index} (nondeterministic model): {found}")
            continue
        versus_expected = _outputs_difference(qgraph_outputs[index], expected)
        if versus_expected is None:
            continue
        if runnable and _outputs_difference(qgraph_outputs[index], original_outputs[index]) is None:
            continue
        return CaseResult(name, "failed", f"data set {index}: {versus_expected}")
    shutil.rmtree(case_work, ignore_errors=True)
    note = "" if deterministic else "nondeterministic: types and shapes compared; "
    if runnable:
        return CaseResult(name, "passed", note)
    return CaseResult(name, "passed_converted", f"{note}original: {original_error}")


# --------------------------------------------------------------------------------------------------------------
# Many cases, in worker processes.


def _worker(connection, work_folder: str, passes) -> None:
    import onnxruntime

    logging.disable(logging.WARNING)  # passes log refusals at INFO/WARNING; the suite only records outcomes
    onnxruntime.set_default_logger_severity(4)
    # Kernels that fail on an original model log errors natively, whatever the severity; their failure is recorded.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    while True:
        name = connection.recv()
        if name is None:
            return
        connection.send(run_case(name, Path(work_folder), passes).as_dict())


class _Worker:
    """One worker process and the case it is running."""

    def __init__(self, context, work_folder: str, passes) -> None:
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, work_folder, passes), daemon=True)
        self.process.start()
        child.close()
        self.case: str | None = None
        self.since = 0.0

    def give(self, name: str) -> None:
        self.case, self.since = name, time.monotonic()
        self.connection.send(name)

    def stop(self, *, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.connection.send(None)
            except OSError:
                pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


def run_suite(
    names: Iterable[str],
    *,
    workers: int = 2,
    timeout: float = CASE_TIMEOUT_SECONDS,
    passes: Sequence[str] | None = None,
) -> list[CaseResult]:
    """Run ``names`` in ``workers`` processes; a crashed or hung worker fails its case and is replaced."""
    from multiprocessing.connection import wait

    names = list(names)
    pending = list(reversed(names))
    context = multiprocessing.get_context("spawn")
    work_folder = tempfile.mkdtemp(prefix="qgraph-peer-")
    finished: dict[str, CaseResult] = {}
    pool = [_Worker(context, work_folder, passes) for _ in range(max(1, workers))]
    try:
        while len(finished) < len(names):
            for worker in pool:
                if worker.case is None and pending:
                    worker.give(pending.pop())
            busy = {worker.connection: worker for worker in pool if worker.case is not None}
            for connection in wait(list(busy), timeout=1.0):
                worker = busy[connection]
                try:
                    payload = connection.recv()
                except (EOFError, OSError):
                    continue  # the process died; handled below
                finished[worker.case] = CaseResult(**payload)
                worker.case = None
            now = time.monotonic()
            for index, worker in enumerate(pool):
                if worker.case is None:
                    continue
                if not worker.process.is_alive():
                    reason = f"worker process died (exit code {worker.process.exitcode}: native crash)"
                elif now - worker.since > timeout:
                    reason = f"timed out after {timeout:.0f} s"
                else:
                    continue
                finished[worker.case] = CaseResult(worker.case, "failed", reason)
                worker.stop(kill=True)
                pool[index] = _Worker(context, work_folder, passes)
    finally:
        for worker in pool:
            worker.stop()
        shutil.rmtree(work_folder, ignore_errors=True)
    return [finished[name] for name in names]


def summarize(results: Sequence[CaseResult]) -> dict:
    counts = Counter(result.outcome for result in results)
    return {outcome: counts.get(outcome, 0) for outcome in OUTCOMES} | {"total": len(results)}


def format_table(results: Sequence[CaseResult], seconds: float | None = None) -> str:
    counts = summarize(results)
    labels = {
        "passed": "passed",
        "passed_converted": "passed after opset conversion (runtime cannot run the original)",
        "not_runnable": "not runnable by the runtime (original fails)",
        "refused": "refused by qgraph (clear error)",
        "failed": "failed",
    }
    lines = [f"{'outcome':<66} {'cases':>6}", "-" * 73]
    lines += [f"{labels[outcome]:<66} {counts[outcome]:>6}" for outcome in OUTCOMES]
    lines += ["-" * 73, f"{'total':<66} {counts['total']:>6}"]
    if seconds is not None:
        lines.append(f"{'wall time (s)':<66} {seconds:>6.1f}")
    return "\n".join(lines)
