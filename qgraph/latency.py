"""Latency of ONNX models in onnxruntime on this machine, measured side by side so that the ratios hold.

A latency choice (:mod:`qgraph.speed_choice`) compares an integer model with its FP32 model on the machine that
quantizes. Shared or virtual machines drift: the same session ran 1.2× slower minutes later here, and another
process on the same cores can double a run (docs/runtime-facts.md). Absolute times therefore mean little; ratios
taken in the same moment do. The measurement:

- one session per model (``ORT_ENABLE_ALL``, ``threads`` intra-op threads, idle threads not spinning: a spinning
  pool of one session takes the cores from the next session's run);
- ``warmup`` runs of every model first (first-touch page faults, onnxruntime's lazily packed weights);
- ``rounds`` rounds, each running every model once in a seeded shuffled order, per batch size;
- per model the median time of its runs, and per model the *paired* ratio ``t_reference / t_model`` of each round
  (both runs of a round saw about the same machine): its median and quartiles. A speed-up ``r`` means the model
  runs ``r`` times as fast as the reference; ``r < 1`` is slower;
- and the *fast-quartile* speed-up ``q25(t_reference) / q25(t_model)``, the ratio of the first quartiles of the
  two models' times. Another process on the same cores adds to some runs and never takes away, so the faster runs
  are the ones closest to the model's own speed: with the load average at 8 on two cores the paired medians of one
  model pair here scattered over 1.5–3.1× between batch sizes, the fast quartiles did not. Decisions use it.

A time budget (``budget_seconds``) bounds what a measurement costs: the first round of each batch size is timed and
the number of rounds set so that all rounds of that batch size fit in its share of the budget, never fewer than
``min_rounds`` nor more than ``rounds`` (the warm-up runs and the sessions' creation come on top).

A *stopping rule* (``stop``) ends a batch size's rounds earlier, once what the caller wants to know is settled: after
every round from ``min_rounds`` on it is given the batch size, each model's run times so far and the rounds planned
(see :func:`qgraph.speed_choice.stopping_rule`: every ordering the choice asks about is clear by a margin). The
rounds it spares could not change the answer: a model at 2.8× FP32 needs no fifty rounds to show it is faster.

A *session pool* (:class:`SessionPool`) keeps the sessions of one caller's measurements, each built and warmed up
once per batch size: a choice that times FP32 and its best candidate again in every table pays their sessions and
warm-up runs once.

Inputs are seeded random tensors matching each model's input signature, with every symbolic dimension set to the
batch size (see :func:`qgraph.runtime.random_inputs`); integer inputs hold small values.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from qgraph import runtime
from qgraph.errors import QGraphError

logger = logging.getLogger(__name__)

ModelSource = onnx.ModelProto | bytes | str | os.PathLike


@dataclasses.dataclass(frozen=True)
class LatencyOptions:
    """How latency is measured; the defaults suit a batch-1 CNN on two cores (a few seconds per model)."""

    threads: int = 2
    batch_sizes: tuple[int, ...] = (1,)
    rounds: int = 20
    warmup: int = 3
    seed: int = 0
    #: Seconds that the rounds of one measurement may take, shared equally by the batch sizes; None: all ``rounds``.
    budget_seconds: float | None = None
    #: Rounds run whatever the budget says (the quartiles need a few).
    min_rounds: int = 3
    #: Measure the largest batch size first (the table keeps the order of ``batch_sizes``): its few costly rounds can
    #: settle a stopping rule's question for the cheap batch sizes after it.
    largest_first: bool = False

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise QGraphError(f"threads must be at least 1, got {self.threads}")
        if not self.batch_sizes or any(size < 1 for size in self.batch_sizes):
            raise QGraphError(f"batch sizes must be positive, got {self.batch_sizes}")
        if self.rounds < 1 or self.warmup < 0:
            raise QGraphError(f"rounds must be at least 1 and warmup not negative, got {self.rounds}, {self.warmup}")
        if self.budget_seconds is not None and self.budget_seconds <= 0:
            raise QGraphError(f"the latency budget must be positive seconds or None, got {self.budget_seconds}")
        if not 1 <= self.min_rounds:
            raise QGraphError(f"min_rounds must be at least 1, got {self.min_rounds}")

    def rounds_within_budget(self, round_seconds: float) -> int:
        """Rounds of one batch size when one round (every model once) takes ``round_seconds``."""
        if self.budget_seconds is None:
            return self.rounds
        share = self.budget_seconds / len(self.batch_sizes)
        affordable = int(share / max(round_seconds, 1e-9))
        return max(min(self.rounds, affordable), min(self.min_rounds, self.rounds))


@dataclasses.dataclass(frozen=True)
class Speedup:
    """Paired speed-up of a model over the reference: median and quartiles of ``t_reference / t_model``."""

    median: float
    low: float
    high: float
    #: q25(t_reference) / q25(t_model): the ratio of the two models' faster runs
    fast_quartile: float

    def describe(self) -> str:
        return f"{self.fast_quartile:.2f}× (paired {self.median:.2f}× [{self.low:.2f}–{self.high:.2f}])"


@dataclasses.dataclass(frozen=True)
class LatencyTable:
    """Run times of several models at several batch sizes, measured in alternating rounds."""

    reference: str
    #: batch size -> model name -> seconds of each round's run
    samples: Mapping[int, Mapping[str, tuple[float, ...]]]
    threads: int

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(self.samples)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(next(iter(self.samples.values())))

    def median_seconds(self, model: str, batch_size: int) -> float:
        return float(np.median(self.samples[batch_size][model]))

    def speedup(self, model: str, batch_size: int, *, reference: str | None = None) -> Speedup:
        """``model``'s speed-up over ``reference`` (the table's reference by default), paired round by round."""
        by_model = self.samples[batch_size]
        reference_times, model_times = np.asarray(by_model[reference or self.reference]), np.asarray(by_model[model])
        low, middle, high = np.percentile(reference_times / model_times, [25, 50, 75])
        fast_quartile = np.percentile(reference_times, 25) / np.percentile(model_times, 25)
        return Speedup(float(middle), float(low), float(high), float(fast_quartile))

    def fast_quartile_seconds(self, model: str, batch_size: int) -> float:
        return float(np.percentile(self.samples[batch_size][model], 25))


def _session(model: ModelSource, threads: int):
    return runtime.create_session(model, optimize=True, threads=threads, spinning=False)


#: A stopping rule: given a batch size, each model's run times so far at it and the rounds planned for it, whether
#: its rounds can end now (asked after every round from ``min_rounds`` on).
StoppingRule = Callable[[int, Mapping[str, Sequence[float]], int], bool]


class SessionPool:
    """Sessions kept across measurements under the models' names, each warmed up once per batch size.

    A name stands for one model: a pooled session is reused whatever model is passed again under its name."""

    def __init__(self) -> None:
        self.sessions: dict[str, object] = {}
        self.warmed: set[tuple[str, int]] = set()

    def session(self, name: str, model: ModelSource, threads: int):
        if name not in self.sessions:
            self.sessions[name] = _session(model, threads)
        return self.sessions[name]


def measure_latency(
    models: Mapping[str, ModelSource],
    options: LatencyOptions | None = None,
    *,
    reference: str | None = None,
    feeds: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    stop: StoppingRule | None = None,
    pool: SessionPool | None = None,
) -> LatencyTable:
    """Latency of each of ``models`` (name -> model) at each of ``options.batch_sizes``, in alternating rounds.

    ``reference`` (the first model by default) is what speed-ups are taken against. ``feeds`` (batch size -> input
    feeds) replaces the seeded random inputs; all models must take the same inputs. ``stop`` ends a batch size's
    rounds once it says so (from ``min_rounds`` on); ``pool`` keeps the sessions for later measurements.
    """
    options = options or LatencyOptions()
    if not models:
        raise QGraphError("measure_latency needs at least one model")
    reference = reference or next(iter(models))
    if reference not in models:
        raise QGraphError(f"the reference {reference!r} is not one of the models measured")
    pool = pool if pool is not None else SessionPool()
    sessions = {name: pool.session(name, model, options.threads) for name, model in models.items()}
    shuffler = random.Random(options.seed)
    samples: dict[int, dict[str, tuple[float, ...]]] = {}
    order = sorted(options.batch_sizes, reverse=True) if options.largest_first else options.batch_sizes
    for batch_size in order:
        batch_feeds = dict(feeds[batch_size]) if feeds is not None else runtime.random_inputs(
            sessions[reference], seed=options.seed, batch=batch_size)
        for name, session in sessions.items():
            if (name, batch_size) in pool.warmed:
                continue
            for _ in range(options.warmup):
                session.run(None, batch_feeds)
            pool.warmed.add((name, batch_size))
        times: dict[str, list[float]] = {name: [] for name in sessions}
        rounds = options.rounds
        completed = 0
        while completed < rounds:
            order = list(sessions)
            shuffler.shuffle(order)
            for name in order:
                start = time.perf_counter()
                sessions[name].run(None, batch_feeds)
                times[name].append(time.perf_counter() - start)
            completed += 1
            if completed == 1:  # the first round tells what a round costs
                rounds = options.rounds_within_budget(sum(values[0] for values in times.values()))
            if stop is not None and completed >= options.min_rounds and stop(batch_size, times, rounds):
                if completed < rounds:
                    logger.debug("batch %d: settled after %d of %d rounds", batch_size, completed, rounds)
                break
        samples[batch_size] = {name: tuple(values) for name, values in times.items()}
        logger.info("batch %d: %s (%d rounds)", batch_size, ", ".join(
            f"{name} {np.median(values) * 1e3:.2f} ms" for name, values in times.items()), completed)
    return LatencyTable(reference, {size: samples[size] for size in options.batch_sizes}, options.threads)


def describe_table(table: LatencyTable, names: Sequence[str] | None = None) -> list[str]:
    """One line per model and batch size: median milliseconds and the paired speed-up over the reference."""
    lines = []
    for batch_size in table.batch_sizes:
        for name in names or table.models:
            lines.append(f"batch {batch_size}: {name} {table.median_seconds(name, batch_size) * 1e3:.2f} ms, "
                         f"{table.speedup(name, batch_size).describe()} vs {table.reference}")
    return lines
