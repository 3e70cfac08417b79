"""Tuning trials and calibration shards run in this process or as Ray tasks, with the same results.

A trial (:func:`run_trial`) is self-contained: the FP32 model's bytes, the calibration data, the user's
``evaluate`` and the trial's recipe go in; the quantized model's bytes, its score, latency and size come out.
:class:`LocalTrials` runs trials one after another in this process; :class:`RayTrials` runs them as Ray tasks
(``pip install qgraph[ray]``), on a local Ray instance started on demand
(``ray.init(num_cpus=workers, include_dashboard=False)``, logs kept quiet, the workers at normal priority
instead of Ray's nice 15) or on an existing cluster
(``address``). Each trial's onnxruntime sessions use ``threads = cores // workers`` intra-op threads (also given to
the evaluation as the environment variable ``QGRAPH_THREADS``), so that two workers on two cores do not
oversubscribe them.

A round of trials (see :mod:`qgraph.tuning.search`) is a queue taken in its order, collected *in order*: once the
trial at position ``i`` is known to meet the bound, none after it starts (one already running finishes, unread). Run
locally, the round stops at that trial. Either way the outcome is the same prefix of the round, so the search and its
choice do not depend on where the trials ran nor on which finished first. On Ray the trials run on persistent actors
(one per worker: qgraph imported once, the search's context fetched once by reference), and while Ray starts the
first trials run in this process (see :class:`RayTrials`).

Calibration shards (:func:`calibrate_sharded`): the batches are cut into ``workers`` contiguous shards, each worker
observes one (:func:`qgraph.calibrate.driver.observe`), the observer states are merged — exactly: min/max and the
power-of-two histograms merge count for count — and the ranges computed once, equal to a single-process
:func:`qgraph.calibrate.driver.calibrate`. The moving-average observer (``ema``) depends on the batch order and is
refused. :class:`ShardedCalibration` puts it in :func:`qgraph.calibrate.driver.calibrate`'s place (a
``QuantizeOptions.calibrator``): the tuning's sensitivity analysis calibrates that way on Ray.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.calibrate.driver import (
    BatchAxes,
    CalibrationConfig,
    CalibrationResult,
    Observation,
    batch_samples,
    calibrate,
    first_samples,
    merge_observations,
    observe,
    ranges_from_observation,
)
from qgraph.errors import QGraphError
from qgraph.quant.plan import QuantPlan

logger = logging.getLogger(__name__)

#: Seconds to wait for a Ray address to accept a connection before saying it does not answer.
ADDRESS_TIMEOUT_SECONDS = 5.0
#: The local Ray instance's object store (bytes): trials pass models of a few MB.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024
#: The environment variable that tells the evaluation how many intra-op threads it may use.
THREADS_VARIABLE = "QGRAPH_THREADS"


class RayError(QGraphError):
    """Ray is not installed, or the Ray cluster cannot be reached."""


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares (sent to each Ray worker once)."""

    model_bytes: bytes
    calibration_data: Any
    evaluate: Callable[[str | os.PathLike], float]
    #: ``OptimizeOptions`` of the search (target, calibration samples, ...), the trial's recipe applied on top.
    base: Any
    #: Input feeds of one sample, for the latency (None: no latency).
    latency_feeds: Mapping[str, np.ndarray] | None
    latency_runs: int
    qat_epochs: int


@dataclasses.dataclass(frozen=True)
class TrialJob:
    index: int
    configuration: Any  # qgraph.tuning.configuration.TrialConfiguration
    recipe: str


@dataclasses.dataclass(frozen=True)
class TrialOutcome:
    index: int
    model_bytes: bytes
    score: float
    latency_ms: float | None
    seconds: float
    worker: str
    #: Why the configuration could not be built (then no model and a NaN score), else None.
    error: str | None = None


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_trial(context: TrialContext, job: TrialJob, threads: int) -> TrialOutcome:
    """Quantize the model with ``job``'s recipe, score it with ``context.evaluate`` and time it (``threads``
    intra-op threads for onnxruntime, and ``QGRAPH_THREADS`` for the evaluation)."""
    from qgraph.pipeline import optimize
    from qgraph.qat.options import QATOptions

    started = time.perf_counter()
    base = context.base
    quantization = dataclasses.replace(base.quantization, calibration=dataclasses.replace(
        base.quantization.calibration, threads=threads))
    previous = os.environ.get(THREADS_VARIABLE)
    os.environ[THREADS_VARIABLE] = str(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="qgraph-trial-") as folder:
            folder_path = Path(folder)
            source, recipe, output = folder_path / "model.onnx", folder_path / "recipe.toml", folder_path / "trial.onnx"
            source.write_bytes(context.model_bytes)
            recipe.write_text(job.recipe)
            options = dataclasses.replace(base, quantization=job.configuration.quantization(quantization, recipe))
            train_data = None
            if job.configuration.qat:
                options = dataclasses.replace(options, qat=QATOptions(
                    loss="distill", epochs=context.qat_epochs, threads=threads, patience=None))
                train_data = context.calibration_data
            try:
                optimize(source, output, options, calibration_data=context.calibration_data, train_data=train_data)
            except QGraphError as error:  # this configuration cannot be built (nothing left to quantize, say)
                return TrialOutcome(job.index, b"", math.nan, None, time.perf_counter() - started,
                                    f"{socket.gethostname()}:{os.getpid()}", str(error))
            score = float(context.evaluate(output))
            latency = trial_latency(output, context.latency_feeds, context.latency_runs, threads)
            model_bytes = output.read_bytes()
    finally:
        if previous is None:
            os.environ.pop(THREADS_VARIABLE, None)
        else:
            os.environ[THREADS_VARIABLE] = previous
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return TrialOutcome(job.index, model_bytes, score, latency, time.perf_counter() - started, worker)


def trial_latency(path: Path, feeds: Mapping[str, np.ndarray] | None, runs: int, threads: int) -> float | None:
    """Median batch-1 milliseconds of the model at ``path`` (None without feeds or runs)."""
    if runs <= 0 or feeds is None:
        return None
    from qgraph.latency import LatencyOptions, measure_latency

    table = measure_latency({"model": onnx.load(path)}, LatencyOptions(threads=threads, rounds=runs), feeds={1: feeds})
    return table.median_seconds("model", 1) * 1e3


class LocalTrials:
    """Trials one after another in this process, onnxruntime on all the cores."""

    workers = 1
    kind = "one process"

    def __init__(self) -> None:
        self.threads = cpu_count()

    def run_round(self, context: TrialContext, jobs: Sequence[TrialJob],
                  stop: Callable[[TrialOutcome], bool] | None = None) -> list[TrialOutcome]:
        outcomes = []
        for job in jobs:
            outcomes.append(run_trial(context, job, self.threads))
            if stop is not None and stop(outcomes[-1]):
                break
        return outcomes

    def map(self, function: Callable, arguments: Sequence[tuple]) -> list:
        return [function(*argument, self.threads) for argument in arguments]

    def start(self) -> None:
        pass

    def calibrator(self) -> None:
        """Calibration stays :func:`qgraph.calibrate.driver.calibrate` in one process."""
        return None

    def close(self) -> None:
        pass


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayError("Ray is not installed: `pip install qgraph[ray]` (or `pip install ray`) runs trials on Ray; "
                       "without --ray-address and with --tune-workers 1 the trials run in this process") from None
    return ray


def check_address(address: str, timeout: float = ADDRESS_TIMEOUT_SECONDS) -> None:
    """Refuse an address (``HOST:PORT``, ``ray://HOST:PORT``) that accepts no connection within ``timeout``;
    ``auto`` (the cluster that ``ray start`` left on this machine) is left to Ray."""
    if address == "auto":
        return
    text = address.split("://", 1)[-1].rstrip("/")
    host, separator, port = text.rpartition(":")
    if not separator or not port.isdigit():
        raise RayError(f"--ray-address {address!r}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as error:
        raise RayError(f"--ray-address {address}: the Ray cluster does not answer (no connection to {host}:{port} "
                       f"within {timeout:g} s: {error})") from None


class RayTrials:
    """Trials on ``workers`` persistent Ray actors (one per worker, one CPU each). Construction checks that Ray is
    installed and that the address answers; :meth:`start` connects (or starts the local instance, 6 s or more on a
    busy 2-core machine) and starts the actors, which import qgraph and onnxruntime once. Ray's own processes die
    with the thread that started them, so :meth:`start` must run on a thread that outlives the search (the
    caller's), while the search runs on another (see :func:`qgraph.tuning.driver.tune`): until the actors are ready
    the trials run in this process, one at a time with the actors' thread count (so with the same results), and the
    Ray start costs the search only its CPU time. The search's :class:`TrialContext` (the FP32 model, the
    calibration data, the evaluation) goes to the object store once per search and each actor fetches it once, by
    reference. ``close`` shuts down an instance started here.

    A round (:meth:`run_round`) is a queue: each idle worker takes the next trial of the round's order, so both
    workers always have work while trials are left, and the outcomes are taken *in order*. Each trial gets
    ``cores // min(workers, trials of the round)`` threads: a round of one trial (QAT) has the cores to itself.
    Once the trial at position ``i`` is known to meet the bound nothing after it is started; a later trial already
    running is left to finish (stopping a Python process mid-trial would cost a fresh actor, seconds of imports)
    and its outcome dropped; its worker takes new work once it is done."""

    kind = "Ray"
    #: Run trials in this process until the actors are ready.
    head_start = True

    def __init__(self, workers: int, address: str | None = None) -> None:
        self._ray = import_ray()
        if address is not None:
            check_address(address)
        self.workers, self.address = workers, address
        self.threads = max(1, cpu_count() // workers)
        self._actors: list = []
        #: actor -> the reference of the last task given to it (None: none yet): an actor is idle once it is ready.
        self._last_task: dict[int, Any] = {}
        self._context_reference: tuple[int, Any] | None = None
        self._started_here = False
        self._starting = False
        #: Set once the actors are ready, or the start failed (then ``_failure`` says why).
        self._ready = threading.Event()
        self._failure: RayError | None = None
        #: Trials run in this process while Ray starts (one at a time).
        self._local = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qgraph-trial")
        self._local_task: concurrent.futures.Future | None = None

    def start(self) -> None:
        """Connect or start Ray and the actors, and wait until they are ready (raises :class:`RayError`, which the
        search also raises at its next round)."""
        if self._starting:
            return
        self._starting = True
        ray = self._ray
        try:
            if not ray.is_initialized():
                quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
                try:
                    if self.address is None:
                        # loopback only: nothing leaves the machine; the workers at the priority of this process
                        # (Ray's default, nice 15, starves them behind any other load of the machine)
                        ray.init(num_cpus=self.workers, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                                 _node_ip_address="127.0.0.1", _system_config={"worker_niceness": 0}, **quiet)
                        logger.info("started a local Ray instance with %d workers", self.workers)
                    else:
                        ray.init(address=self.address, **quiet)
                        logger.info("connected to the Ray cluster at %s", self.address)
                except Exception as error:
                    where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                    raise RayError(f"could not start or reach {where}: {error}") from None
                self._started_here = True
            worker_class = ray.remote(num_cpus=1)(TrialWorker)
            self._actors = [worker_class.remote() for _ in range(self.workers)]
            self._last_task = {position: None for position in range(self.workers)}
            try:
                ray.get([actor.ready.remote() for actor in self._actors])
            except Exception as error:
                raise RayError(f"the Ray workers could not start: {error}") from None
            logger.info("%d Ray workers ready", self.workers)
        except RayError as error:
            self._failure = error
            raise
        finally:
            self._ready.set()

    def _context(self, context: TrialContext) -> list:
        """The context's object reference, put once per search; wrapped in a list so that Ray passes the reference
        itself (each actor fetches it once) instead of the value with every trial."""
        if self._context_reference is None or self._context_reference[0] != id(context):
            self._context_reference = (id(context), self._ray.put(context))
        return [self._context_reference[1]]

    def _idle_actors(self) -> list[int]:
        busy = [task for task in self._last_task.values() if task is not None]
        done = set(self._ray.wait(busy, num_returns=len(busy), timeout=0)[0]) if busy else set()
        return [position for position, task in self._last_task.items() if task is None or task in done]

    def run_round(self, context: TrialContext, jobs: Sequence[TrialJob],
                  stop: Callable[[TrialOutcome], bool] | None = None) -> list[TrialOutcome]:
        if not self._starting:
            self.start()
        ray = self._ray
        # a round of fewer trials than workers (one QAT trial, the last fallback point) shares the cores among them
        threads = max(1, cpu_count() // max(1, min(self.workers, len(jobs))))
        running: dict[Any, int] = {}  # Ray task -> position in the round
        local: int | None = None  # the position running in this process
        finished: dict[int, TrialOutcome] = {}
        outcomes: list[TrialOutcome] = []
        given = 0
        while len(outcomes) < len(jobs):
            if self._failure is not None:
                raise self._failure
            ready = self._ready.is_set()
            if not ready and self.head_start and self._local_task is None and given < len(jobs):
                self._local_task = self._local.submit(run_trial, context, jobs[given], threads)
                local, given = given, given + 1
            if ready:
                holder = self._context(context)
                for actor in self._idle_actors():
                    if given == len(jobs):
                        break
                    task = self._actors[actor].run.remote(self._context_reference[0], holder, jobs[given], threads)
                    running[task], self._last_task[actor] = given, task
                    given += 1
            progressed = False
            if self._local_task is not None and self._local_task.done():
                if local is not None:
                    finished[local] = self._local_task.result()
                    progressed = True
                self._local_task, local = None, None
            # the round's running trials, and a trial of an earlier round still running (its actor frees up)
            waiting = list(running) + [task for task in self._last_task.values()
                                       if task is not None and task not in running]
            done = ray.wait(waiting, num_returns=len(waiting), timeout=0)[0] if waiting else []
            for task in done:
                if task in running:
                    finished[running.pop(task)] = ray.get(task)
                    progressed = True
            freed = bool(done) and given < len(jobs)
            for position in sorted(finished):  # the next outcomes of the order, as far as they are known
                if position != len(outcomes):
                    break
                outcomes.append(finished.pop(position))
                if stop is not None and stop(outcomes[-1]):
                    return outcomes  # later trials: not started; a running one finishes on its own, unread
            if not progressed and not freed:
                still = [task for task in waiting if task not in done]
                if still and ready and self._local_task is None:
                    ray.wait(still, num_returns=1)
                elif still:
                    ray.wait(still, num_returns=1, timeout=0.05)
                else:
                    time.sleep(0.05)
        return outcomes

    def map(self, function: Callable, arguments: Sequence[tuple]) -> list:
        """``function(*argument, threads)`` for each argument, spread over the actors."""
        if not self._starting:
            self.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure
        tasks = [self._actors[position % self.workers].call.remote(function, argument, self.threads)
                 for position, argument in enumerate(arguments)]
        for position, task in enumerate(tasks):
            self._last_task[position % self.workers] = task
        return self._ray.get(tasks)

    def calibrator(self) -> ShardedCalibration | None:
        """Calibration sharded over the actors once they are ready (None before: calibrate in this process)."""
        if not self._ready.is_set() or self._failure is not None or not self._actors:
            return None
        return ShardedCalibration(self)

    def close(self) -> None:
        self._local.shutdown(wait=False)
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors, self._last_task, self._context_reference = [], {}, None
        if self._started_here and self._ray.is_initialized():
            self._ray.shutdown()
            self._started_here = False


class TrialWorker:
    """A Ray actor's state: qgraph and onnxruntime imported once, the current search's context fetched once."""

    def __init__(self) -> None:
        _import_trial_modules()
        self._context: tuple[int, TrialContext] | None = None

    def run(self, key: int, holder: list, job: TrialJob, threads: int) -> TrialOutcome:
        if self._context is None or self._context[0] != key:
            import ray

            self._context = (key, ray.get(holder[0]))
        return run_trial(self._context[1], job, threads)

    def ready(self) -> int:
        return os.getpid()

    def call(self, function: Callable, argument: tuple, threads: int):
        return function(*argument, threads)


def _import_trial_modules() -> int:
    import onnxruntime  # noqa: F401

    import qgraph.pipeline  # noqa: F401
    import qgraph.report  # noqa: F401

    return os.getpid()


def trial_executor(workers: int = 1, address: str | None = None) -> LocalTrials | RayTrials:
    """Where the trials run: Ray when an address is given or ``workers > 1`` (Ray must then be installed for an
    address; without one, a missing Ray runs the trials in this process, with a warning), else this process."""
    if address is not None:
        return RayTrials(workers, address)
    if workers <= 1:
        return LocalTrials()
    try:
        return RayTrials(workers)
    except RayError:
        logger.warning("Ray is not installed: the %d trials that would run at once run one after another in this "
                       "process (same results; `pip install qgraph[ray]` runs them in parallel)", workers)
        return LocalTrials()


@dataclasses.dataclass(frozen=True)
class ShardedCalibration:
    """:func:`qgraph.calibrate.driver.calibrate`, called the same way, with the batches observed in shards on the
    executor's workers (:func:`calibrate_sharded`: the same ranges); the order-dependent moving average (``ema``)
    stays in this process. A :class:`qgraph.ptq.QuantizeOptions` ``calibrator``."""

    executor: Any

    def __call__(self, model: ir.Model, plan: QuantPlan, batches: Iterable[Mapping[str, np.ndarray]],
                 config: CalibrationConfig | None = None, *, progress: Callable[[int], None] | None = None,
                 batch_axes: BatchAxes | None = None, keep_outputs: int = 0) -> CalibrationResult:
        config = config or CalibrationConfig()
        if config.method == "ema" or "ema" in plan.activation_methods.values():
            return calibrate(model, plan, batches, config, progress=progress, batch_axes=batch_axes,
                             keep_outputs=keep_outputs)
        result = calibrate_sharded(model, plan, batches, config, self.executor, batch_axes=batch_axes,
                                   keep_outputs=keep_outputs)
        if progress is not None:
            progress(result.samples)
        return result


def _observe_shard(model_bytes: bytes, plan: QuantPlan, shard: list, config: CalibrationConfig,
                   batch_axes: BatchAxes | None, keep_outputs: int, threads: int) -> Observation:
    model = ir.serde.deserialize_model(onnx.load_from_string(model_bytes))
    return observe(model, plan, shard, dataclasses.replace(config, threads=threads, samples=None),
                   batch_axes=batch_axes, keep_outputs=keep_outputs)


def calibrate_sharded(model: ir.Model, plan: QuantPlan, batches: Iterable[Mapping[str, np.ndarray]],
                      config: CalibrationConfig | None = None, executor: LocalTrials | RayTrials | None = None, *,
                      shards: int | None = None, batch_axes: BatchAxes | None = None,
                      keep_outputs: int = 0) -> CalibrationResult:
    """:func:`~qgraph.calibrate.driver.calibrate` with the batches observed in ``shards`` (default: the
    executor's workers) contiguous shards, each on a worker, the states merged and the ranges computed once;
    ``keep_outputs`` as there (the model's outputs on the first batches, kept by the shards that observe them)."""
    config = config or CalibrationConfig()
    executor = executor or LocalTrials()
    if config.method == "ema" or "ema" in plan.activation_methods.values():
        raise QGraphError("calibration shards merge exactly for minmax, entropy, percentile and mse; the moving "
                          "average (ema) depends on the batch order: calibrate it in one process")
    started = time.perf_counter()
    kept, samples, whole = [], 0, 0
    for batch in batches:  # config.samples cuts the whole set, before it is split
        count = batch_samples(batch, batch_axes)
        if config.samples is not None and samples + count > config.samples:
            batch, count = first_samples(batch, config.samples - samples, batch_axes), config.samples - samples
        else:
            whole += 1
        if count <= 0:
            break
        kept.append(batch)
        samples += count
    keep_outputs = min(keep_outputs, whole)  # as calibrate: no output of a cut batch
    count = max(1, min(shards or executor.workers, len(kept)))
    bounds = np.linspace(0, len(kept), count + 1).round().astype(int)
    model_bytes = ir.serde.serialize_model(model).SerializeToString()
    arguments = [(model_bytes, plan, kept[low:high], config, batch_axes, max(0, keep_outputs - low))
                 for low, high in zip(bounds, bounds[1:])]
    observations = executor.map(_observe_shard, arguments)
    result = ranges_from_observation(model, plan, merge_observations(observations), config)
    result = dataclasses.replace(result, outputs=result.outputs[:keep_outputs])
    logger.info("calibrated %d tensors on %d samples in %d shard(s) (%s) in %.1fs", len(plan.activations),
                result.samples, count, executor.kind, time.perf_counter() - started)
    return dataclasses.replace(result, seconds=time.perf_counter() - started)
