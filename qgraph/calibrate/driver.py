"""CALIBRATE: stream the user's batches through onnxruntime once and observe every annotated activation.

A *probe* model is the model made to yield what the observers need in one session run: every annotated activation
is a graph output, observed after the run; If branches get probe models of their own, run on the batches that took
them (:mod:`qgraph.calibrate.probes`). Memory is one batch of activations plus the observers' fixed-size state,
whatever the number of samples (onnxruntime's ``quantize_static`` keeps every batch's activations until the end, which
grows linearly).

Scheduling: onnxruntime runs a batch on all its threads, then the activations returned run through their observers on as
many worker threads, the tensors dealt out largest first to the least loaded worker (the native observer loops and
numpy's reductions release the GIL), then the range searches likewise. The phases alternate rather than overlap:
onnxruntime keeps every core busy, and an observer thread beside its threads takes a core from one of them, whose
parallel loops then wait for the descheduled thread. Graph inputs are observed straight from the feeds; the output of a
layout operator (Reshape, Transpose, …) takes its input's range, since it holds the same values. Tensors that must share
parameters (a scale group) are observed separately and their ranges merged afterwards as the union of the ranges.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.calibrate.observers.factory import OBSERVER_METHODS as METHODS
from qgraph.calibrate.observers.histogram import DEFAULT_PERCENTILE, HistogramObserver
from qgraph.calibrate.probes import build_probes
from qgraph.errors import DataError
from qgraph.ir.values import is_constant, is_op
from qgraph.progress import Progress
from qgraph.quant.plan import QuantPlan

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    method: str = "minmax"
    #: Stop after this many samples (None: the whole set).
    samples: int | None = None
    batch_size: int = 16
    percentile: float = DEFAULT_PERCENTILE
    bins: int = 2048
    ema_momentum: float = 0.9
    threads: int | None = None
    #: Check a histogram method's ranges at the model's output against min-max ranges before they are used, and
    #: fall back where they are much worse (see :mod:`qgraph.range_check`).
    range_check: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DataError(f"unknown calibration method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.samples is not None and self.samples <= 0:
            raise DataError(f"--calib-samples must be positive, got {self.samples}")


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    ranges: Mapping[str, tuple[float, float]]
    samples: int
    batches: int
    #: From the first batch to the ranges, the probe's construction excluded.
    seconds: float
    #: The part of ``seconds`` spent deriving the ranges from the observers, after the last batch.
    range_seconds: float = 0.0
    #: Per tensor observed by a histogram method (entropy, percentile, mse): the exact observed [minimum, maximum],
    #: i.e. its min-max range, which the same observer gives for free (layout aliases included, groups not merged).
    extremes: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    #: Per such tensor: the expected squared quantization error summed over its observed values (see
    #: :func:`qgraph.calibrate.observers.histogram_ranges.expected_squared_error`) with the method's range and with
    #: its extremes, ``(method, minmax)``: how much worse than min-max the method's range is on the tensor itself.
    range_errors: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    #: With ``keep_outputs=n``: the model's outputs (name -> array) on each of the first ``n`` batches, from the
    #: probe runs that observed them (the FP32 reference that the sensitivity search compares against, for free);
    #: fewer when a batch was cut to ``samples``, and an output the probe returns in a blocked layout is left out.
    outputs: tuple[Mapping[str, np.ndarray], ...] = ()


def build_probe(model: ir.Model, tensors: Iterable[str]) -> onnx.ModelProto:
    """The model as a proto with each of ``tensors`` added as a graph output (type taken from shape inference)."""
    proto = ir.serde.serialize_model(model)
    existing = {output.name for output in proto.graph.output}
    known = {info.name: info for info in proto.graph.value_info}
    known.update({info.name: info for info in proto.graph.input})
    for name in tensors:
        if name in existing:
            continue
        if name in known:
            proto.graph.output.append(known[name])
        else:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return proto


#: Operators whose output range is fixed by the operator itself.
BOUNDED_OPERATORS = frozenset({"Clip", "Sigmoid", "HardSigmoid"})


def bounded_tensors(model: ir.Model) -> frozenset[str]:
    """Outputs of operators that bound them on purpose (Clip with constant bounds, e.g. ReLU6; Sigmoid).

    Their values pile up at the bounds by design, so a histogram method would see the pile as an outlier and
    clip it (entropy chose [0, 1.09] for ReLU6 outputs of a trained MobileNetV2, costing 3.4 points of top-1):
    these tensors are calibrated by min-max, which the bounds already keep tight.
    """
    from qgraph.ir.traversal import iterate_graphs

    bounded = set()
    for graph in iterate_graphs(model):
        for node in graph:
            if not is_op(node, *BOUNDED_OPERATORS):
                continue
            if node.op_type == "Clip":
                bounds = [value for value in node.inputs[1:] if value is not None]
                if len(bounds) < 2 or not all(is_constant(value) for value in bounds):
                    continue
            bounded.update(output.name for output in node.outputs if output is not None)
    return frozenset(bounded)


def _observer_factory(
    config: CalibrationConfig, plan: QuantPlan, bounded: frozenset[str] = frozenset()
) -> Callable[[str], object]:
    from qgraph.calibrate.observers import create_observer

    def make(tensor: str):
        spec = plan.activation_spec_of(tensor)
        method = plan.activation_methods.get(tensor, config.method)
        if tensor in bounded and method in ("entropy", "percentile", "mse"):
            return create_observer("minmax", spec)
        options: dict = {}
        if method in ("entropy", "percentile", "mse"):
            options["bins"] = config.bins
        if method == "percentile":
            options["percentile"] = config.percentile
        if method == "ema":
            options["momentum"] = config.ema_momentum
        return create_observer(method, spec, **options)

    return make


#: Input name -> the axis along which its arrays hold the batch's samples; None: a constant (no samples).
BatchAxes = Mapping[str, int | None]


def _axis_of(key: str, array, batch_axes: BatchAxes | None) -> int | None:
    """The axis that counts ``key``'s samples: ``batch_axes[key]`` when given, else 0 (None for a scalar)."""
    if batch_axes is not None and key in batch_axes:
        return batch_axes[key]
    return 0 if np.ndim(array) > 0 else None


def batch_samples(feeds: Mapping[str, np.ndarray], batch_axes: BatchAxes | None = None) -> int:
    """Samples in one batch: the length of the first key that counts samples along its batch axis.

    ``batch_axes`` (from the data's :class:`~qgraph.data.layout.DataLayout`) names each key's axis; a key it does not
    name counts along axis 0, a scalar counts none. A batch of constants only (an If's flag) counts one sample; an
    empty batch none. Without ``batch_axes`` a ``[layers, batch, hidden]`` state given before the batch-first input
    would count its layers, which is why the pipeline passes the dataset's axes down.
    """
    for key, array in feeds.items():
        axis = _axis_of(key, array, batch_axes)
        if axis is not None:
            return int(np.shape(array)[axis])
    return 1 if feeds else 0


def first_samples(feeds: Mapping[str, np.ndarray], count: int,
                  batch_axes: BatchAxes | None = None) -> dict[str, np.ndarray]:
    """The first ``count`` samples of a batch, each key cut along its own batch axis (constants as they are)."""
    kept = {}
    for key, array in feeds.items():
        axis = _axis_of(key, array, batch_axes)
        kept[key] = array if axis is None else array[(slice(None),) * axis + (slice(0, count),)]
    return kept


def calibrate(
    model: ir.Model,
    plan: QuantPlan,
    batches: Iterable[Mapping[str, np.ndarray]],
    config: CalibrationConfig | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    batch_axes: BatchAxes | None = None,
    keep_outputs: int = 0,
) -> CalibrationResult:
    """Observe every activation of ``plan`` over ``batches``; ``progress`` receives the samples of each batch.

    ``batch_axes`` says along which axis each input holds a batch's samples (see :func:`batch_samples`): it counts
    the samples and cuts the last batch at ``config.samples``. ``keep_outputs``: return the model's outputs on
    that many first batches too (:attr:`CalibrationResult.outputs`).
    """
    config = config or CalibrationConfig()
    tensors, aliases, observers, probe = _observation_setup(model, plan, config)
    input_names = list(probe.inputs)
    seen: set[str] = set()
    outputs: list[dict[str, np.ndarray]] = []
    start = time.perf_counter()
    workers = observer_threads(config.threads)
    with contextlib.ExitStack() as stack:
        if progress is None:  # a caller that counts the samples itself draws its own bar (the command line does)
            progress = stack.enter_context(Progress(config.samples, "calibrating", unit="samples")).update
        executor = stack.enter_context(
            concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qgraph-observe"))
        samples, batches_seen = _stream(probe, input_names, batches, config, executor, workers, observers, seen,
                                        progress, batch_axes, outputs if keep_outputs > 0 else None, keep_outputs)
        if samples == 0:
            raise DataError("the calibration set is empty: no sample reached the model")
        unseen = [tensor for tensor in tensors if tensor not in seen]
        if unseen:
            logger.warning(
                "%d tensor(s) inside If branches that no calibration batch took stay float: %s",
                len(unseen), ", ".join(unseen[:8]) + (" ..." if len(unseen) > 8 else ""),
            )
        ranges_start = time.perf_counter()
        observed = {tensor: observers[tensor] for tensor in tensors if tensor in seen}
        ranges, extremes, errors = _derive_ranges(observed, aliases, plan, executor)
    end = time.perf_counter()
    seconds = end - start
    logger.info("calibrated %d tensors on %d samples in %.1fs (%s)", len(plan.activations), samples, seconds,
                config.method)
    return CalibrationResult(ranges, samples, batches_seen, seconds, end - ranges_start, extremes, errors,
                             tuple(outputs))


def _derive_ranges(observers: Mapping[str, object], aliases: Mapping[str, str], plan: QuantPlan,
                   executor: concurrent.futures.Executor | None = None):
    """Each observed tensor's range, and for the histogram methods its extremes and range errors (the range
    check's inputs), aliases taking their source's; ranges of a scale-sharing group merged.

    The histogram methods' range searches take milliseconds per tensor: ``executor`` spreads them over threads.
    """
    mapper = executor.map if executor is not None else map
    names = list(observers)
    computed = mapper(lambda tensor: observers[tensor].compute_range(), names)
    ranges = {tensor: tuple(float(bound) for bound in bounds) for tensor, bounds in zip(names, computed)}
    histograms = [tensor for tensor in names if isinstance(observers[tensor], HistogramObserver)]
    errors = dict(zip(histograms, mapper(lambda tensor: observers[tensor].range_errors(ranges[tensor]), histograms)))
    extremes = {tensor: observers[tensor].extremes() for tensor in histograms}
    for alias, source in aliases.items():
        if source in ranges:
            ranges[alias] = ranges[source]
        if source in extremes:
            extremes[alias], errors[alias] = extremes[source], errors[source]
    return merge_group_ranges(ranges, plan), extremes, errors


def _observation_setup(model: ir.Model, plan: QuantPlan, config: CalibrationConfig):
    """The tensors to observe, the aliases that take another's range, a fresh observer per tensor, and the probe."""
    bounded = bounded_tensors(model)
    aliases = value_aliases(model, plan, config, bounded)
    tensors = [tensor for tensor in plan.activations if tensor not in aliases]
    # per-tensor observers see a multiset of values: those tensors may come back in onnxruntime's blocked layout
    order_free = [tensor for tensor in tensors if plan.activation_spec_of(tensor).axis is None]
    make_observer = _observer_factory(config, plan, bounded)
    observers = {tensor: make_observer(tensor) for tensor in tensors}
    probe = build_probes(model, tensors, threads=config.threads, spinning=False, order_free=order_free)
    return tensors, aliases, observers, probe


@dataclasses.dataclass(frozen=True)
class Observation:
    """What observing one shard of the calibration batches left: each observed tensor's observer state
    (``Observer.state_dict()``, plain values and numpy arrays), and the samples and batches seen.

    Observations of disjoint shards merge exactly (:func:`merge_observations`: every observer's ``merge`` equals the
    observer of the union, count for count), so calibration can be split over processes or machines and the ranges
    computed once from the merged states (:func:`ranges_from_observation`), equal to :func:`calibrate`'s.
    """

    states: Mapping[str, dict]
    samples: int
    batches: int
    #: With ``keep_outputs=n``: the model's outputs on the shard's first ``n`` batches (as
    #: :attr:`CalibrationResult.outputs`).
    outputs: tuple[Mapping[str, np.ndarray], ...] = ()


def observe(model: ir.Model, plan: QuantPlan, batches: Iterable[Mapping[str, np.ndarray]],
            config: CalibrationConfig | None = None, *, batch_axes: BatchAxes | None = None,
            keep_outputs: int = 0) -> Observation:
    """Observe ``batches`` (one shard of the calibration set; ``config.samples`` cuts it) without deriving ranges;
    ``keep_outputs``: keep the model's outputs on that many first batches too."""
    config = config or CalibrationConfig()
    tensors, _, observers, probe = _observation_setup(model, plan, config)
    seen: set[str] = set()
    outputs: list[dict[str, np.ndarray]] = []
    workers = observer_threads(config.threads)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qgraph-observe") as executor:
        samples, batches_seen = _stream(probe, list(probe.inputs), batches, config, executor, workers, observers,
                                        seen, None, batch_axes, outputs if keep_outputs > 0 else None, keep_outputs)
    states = {tensor: observers[tensor].state_dict() for tensor in tensors if tensor in seen}
    return Observation(states, samples, batches_seen, tuple(outputs))


def merge_observations(observations: Iterable[Observation]) -> Observation:
    """One observation equal to that of all the shards' batches together (states merged tensor by tensor), the
    shards taken in the order of their batches: the kept outputs run on from one shard into the next as long as
    each shard kept an output for every batch it saw."""
    from qgraph.calibrate.observers import observer_from_state

    merged: dict[str, object] = {}
    samples = batches = 0
    outputs: list[Mapping[str, np.ndarray]] = []
    contiguous = True
    for observation in observations:
        for tensor, state in observation.states.items():
            observer = observer_from_state(state)
            merged[tensor] = observer if tensor not in merged else merged[tensor].merge(observer)
        samples += observation.samples
        batches += observation.batches
        if contiguous:
            outputs.extend(observation.outputs)
            contiguous = len(observation.outputs) == observation.batches
    return Observation({tensor: observer.state_dict() for tensor, observer in merged.items()}, samples, batches,
                       tuple(outputs))


def ranges_from_observation(model: ir.Model, plan: QuantPlan, observation: Observation,
                            config: CalibrationConfig | None = None) -> CalibrationResult:
    """The ranges of ``plan``'s activations from a (merged) observation, as :func:`calibrate` derives them."""
    from qgraph.calibrate.observers import observer_from_state

    config = config or CalibrationConfig()
    if observation.samples == 0:
        raise DataError("the calibration set is empty: no sample reached the model")
    start = time.perf_counter()
    aliases = value_aliases(model, plan, config, bounded_tensors(model))
    observers = {tensor: observer_from_state(state) for tensor, state in observation.states.items()}
    ranges, extremes, errors = _derive_ranges(observers, aliases, plan)
    seconds = time.perf_counter() - start
    return CalibrationResult(ranges, observation.samples, observation.batches, seconds, seconds, extremes, errors,
                             observation.outputs)


def _stream(
    probe,
    input_names: list[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    config: CalibrationConfig,
    executor: concurrent.futures.Executor,
    workers: int,
    observers: Mapping[str, object],
    seen: set[str],
    progress: Callable[[int], None] | None,
    batch_axes: BatchAxes | None = None,
    outputs: list[dict[str, np.ndarray]] | None = None,
    keep_outputs: int = 0,
) -> tuple[int, int]:
    """Each batch through the probe, then its activations through the observers; returns (samples, batches).

    ``seen`` collects the tensors observed (If branches run only on the batches that take them). ``outputs``
    receives the model's outputs on the first ``keep_outputs`` batches, as long as none is cut.
    """
    samples = batches_seen = 0
    for batch in batches:
        feeds = {name: batch[name] for name in input_names}
        # each input counts its samples along its own batch axis; a scalar control input (an If's flag) has none
        count = batch_samples(feeds, batch_axes)
        whole = True
        if config.samples is not None and samples + count > config.samples:
            keep = config.samples - samples
            feeds = first_samples(feeds, keep, batch_axes)
            count, whole = keep, False
        if count <= 0:
            break
        _check_finite(feeds, batches_seen)
        # graph inputs come straight from the feeds; If branches run only when the batch took them
        if outputs is not None and whole and len(outputs) == batches_seen < keep_outputs:
            outputs.append({})
            activations = probe.run(feeds, outputs[-1])
        else:
            activations = probe.run(feeds)
        seen.update(tensor for tensor, _ in activations)
        _observe_in_parallel(executor, workers, observers, activations)
        del activations
        samples += count
        batches_seen += 1
        if progress is not None:
            progress(count)
        if config.samples is not None and samples >= config.samples:
            break
    return samples, batches_seen


#: Operators that only rearrange their input: the output holds the same values (the same multiset every batch).
LAYOUT_OPERATORS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def value_aliases(
    model: ir.Model, plan: QuantPlan, config: CalibrationConfig, bounded: frozenset[str] = frozenset()
) -> dict[str, str]:
    """Annotated main-graph tensors whose observation would repeat another's: ``{alias: source}``.

    The output of a layout operator holds exactly its input's values in every batch, so an observer of the same kind
    (same spec, method and boundedness) reaches the same state on either: the output is not observed, it takes the
    source's range. Chains resolve to their first tensor. Transformers reshape and transpose around every attention.
    """
    annotated = set(plan.activations)

    def observer_kind(tensor: str) -> tuple:
        return plan.activation_spec_of(tensor), plan.activation_methods.get(tensor, config.method), tensor in bounded

    aliases: dict[str, str] = {}
    for node in model.graph:  # topological order: a chain's source is resolved before its later links
        if not is_op(node, *LAYOUT_OPERATORS):
            continue
        if not node.inputs or node.inputs[0] is None or not node.outputs:
            continue
        source, output = node.inputs[0].name, node.outputs[0].name
        root = aliases.get(source, source)
        if output in annotated and root in annotated and observer_kind(output) == observer_kind(root):
            aliases[output] = root
    return aliases


def observer_threads(threads: int | None) -> int:
    """Worker threads for the observers: as many as onnxruntime's intra-op threads (default: the CPU count)."""
    return max(1, threads if threads is not None else (os.cpu_count() or 1))


def _observe(observers: Mapping[str, object], activations: Iterable[tuple[str, np.ndarray]]) -> None:
    for tensor, value in activations:
        observers[tensor].update(value)


def _observe_in_parallel(
    executor: concurrent.futures.Executor,
    workers: int,
    observers: Mapping[str, object],
    activations: list[tuple[str, np.ndarray]],
) -> None:
    """Update every observer once, the tensors dealt largest first to the least loaded of ``workers`` threads.

    Each observer is updated by one thread only, so observers need no locks; an observer's error is re-raised here.
    """
    if workers == 1 or len(activations) < 2:
        _observe(observers, activations)
        return
    shares: list[list[tuple[str, np.ndarray]]] = [[] for _ in range(workers)]
    loads = [0] * workers
    owner: dict[str, int] = {}  # a tensor seen twice stays with one thread
    for tensor, array in sorted(activations, key=lambda item: -np.size(item[1])):
        worker = owner.setdefault(tensor, loads.index(min(loads)))
        shares[worker].append((tensor, array))
        loads[worker] += np.size(array)
    futures = [executor.submit(_observe, observers, share) for share in shares if share]
    for future in futures:
        future.result()


def _check_finite(feeds: Mapping[str, np.ndarray], batch_index: int) -> None:
    for name, array in feeds.items():
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            count = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise DataError(f"calibration input {name!r} holds {count} NaN/Inf values in batch {batch_index}")


def merge_group_ranges(ranges: Mapping[str, tuple[float, float]], plan: QuantPlan) -> dict[str, tuple[float, float]]:
    """Each tensor of a scale group gets the union of the group's ranges."""
    merged = dict(ranges)
    for group in plan.groups:
        members = [name for name in group if name in ranges]
        if not members:
            continue
        low = min(ranges[name][0] for name in members)
        high = max(ranges[name][1] for name in members)
        for name in members:
            merged[name] = (low, high)
    return merged
