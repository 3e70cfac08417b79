"""Sensitivity analysis and automatic fallback: find the quantized layers that break the outputs, put them back to FP32.

**Layers and the switchable graph** are :mod:`qgraph.sensitivity_graph`'s: a layer is a quantized node with the
tensors it owns, and one QDQ graph with a bool input ``e ∈ {0,1}^L`` selects each layer's quantization (``e = 1`` is
the QDQ model, ``e = 0`` the FP32 model, bit for bit). With outputs ``y_o`` (FP32) and ``ŷ_o(e)``, the
noise-to-signal ratio of output ``o`` and the output SQNR are::

    r_o(e) = Σ (y_o − ŷ_o(e))² / Σ y_o²        SQNR(e) = min_o −10·log10 r_o(e)      (float64 sums)

and the sensitivity of layer ``k`` is ``S_k = SQNR(one_hot(k))``.

**Cost model: a search that stays near one calibration pass.** Measuring every ``S_k`` costs ``L`` runs over the
batches (the earlier search: 117 layers, >15 min). Instead the search leans on two facts:

1. *Noise adds up.* Quantization errors of different layers are nearly uncorrelated, so for a set ``G`` of enabled
   layers ``r(G) ≈ Σ_{k∈G} r(k)`` (per output). One run with ``G`` enabled measures the whole group, so a group
   whose noise is small clears all its members at once.
2. *Local error is a prior.* One run of the float model (flags off) on the ranking subset also returns, for every
   quantized activation, its own rounding and clipping error ``ρ_x = Σ(DQ(Q(x)) − x)² / Σ x²`` (two
   ReduceSumSquare outputs per tensor, computed in the graph); weights' ``ρ_W`` come from the parameters. A
   layer's prior is the sum over its tensors. It does not know how the error propagates to the output, so it only
   orders the search. (Measured in the quantized model instead, an activation after a destroyed layer looks
   destroyed too.) A candidate is excluded together with the other owners of its dominant activations (local error
   at least half its largest and ``OUTLIER_ERROR_FACTOR`` times the median activation's): while any owner is
   quantized, so is the activation.

The search is best-first group testing over the candidates sorted by prior: a max-heap of groups (contiguous runs
of that order) keyed by their measured noise, starting from all candidates. The top group is split in two, the
half with the larger prior is measured and the other half's noise inferred as the parent's minus it (measured in
turn when it reaches the top); a single layer at the top is the next most damaging layer and becomes a candidate
for exclusion, with its ``S_k`` measured. After each candidate the remaining noise is predicted as
``r(all) − Σ r(candidates)``; once it is under the bound (with a 0.3 dB margin) the model with the candidates
disabled is measured, and the search continues (the prediction corrected by the measured difference) until the
measurement meets the bound. With ``m`` damaging layers among ``L`` this takes about ``m·log₂ L`` runs instead of
``2·L``, and each of them runs on a *ranking subset*: the first ``ranking_samples`` samples of the first batch
(default 8), enough to order layers whose effects differ by decibels, while the decision and the final number use
all ``batches`` retained batches. onnxruntime's graph optimisations are not used for the switchable graph: they
measure the same thing, but measured on the OCR stand-in (:mod:`qgraph.models.paddle_recognizer`) the optimised
session ran it slower (2.8 s against 2.0 s per batch of 16: its layout changes around every ``Where``).

**The common case first.** Most models meet the bound fully quantized, and then only that one number is needed: the
fully quantized QDQ graph runs on the retained batches in an optimised session (onnxruntime fuses the Q/DQ pairs into
its integer kernels, as the written model runs), against the FP32 outputs that the calibration's probe runs returned
for those batches (:attr:`~qgraph.calibrate.driver.CalibrationResult.outputs`; an optimised FP32 session computes
them when they are missing); when this SQNR is at least the bound plus ``RANKING_MARGIN_DB`` the search ends there,
without the switchable graph (on ResNet-18 at 224×224, batch 16: about a third of an FP32 pass over two batches,
against 4.2 s for the set-up below). Otherwise, or with ``full_table``, the search below runs, on the same FP32
outputs.

**Verification.** The driver re-plans with the candidates excluded (:mod:`qgraph.ptq`: a tensor that stays annotated
keeps its range, a scale group keeps the union of its former ranges, a tensor annotated for the first time is
calibrated on the retained batches) and this module measures the real QDQ graph on all retained batches. While it
misses the bound, the margin grows by the miss and the search finds more candidates.

**Budget.** The whole search — switchable graph, runs and verifications — keeps to ``budget_seconds`` (default:
``AUTO_BUDGET_SECONDS + AUTO_BUDGET_CALIBRATION_FACTOR ×`` the calibration time). When it runs out, the search stops
where it is and keeps the best plan found so far: the best verified one, or, when the search did not reach the
bound, the candidates found plus the noisiest unexplored groups as a whole (predicted to meet it, at most an eighth
of the layers), verified once;
a warning says so and the result records it (``budget_exhausted``). A progress bar shows each step.

With ``full_table`` (a report) the ``S_k`` of every layer is measured on the ranking subset, within the budget;
a layer left unmeasured gets the SQNR of the smallest measured group that holds it (a lower bound on its own,
marked ``measured=False``).

Layers without a name (or sharing one) cannot be excluded by name and are never candidates.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import time
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qgraph.calibrate.driver import BatchAxes, batch_samples, first_samples
from qgraph.errors import QGraphError, require_at_least
from qgraph.output_comparison import OutputComparison, noise_ratios, optimized_comparison, ratio_db
from qgraph.progress import Progress
from qgraph.quant.plan import QuantPlan

# Layer and copy_model are not used here: they stay importable from qgraph.sensitivity, their home before the split.
from qgraph.sensitivity_graph import (  # noqa: F401
    ENABLE_INPUT,
    Layer,
    build_qdq,
    build_switchable_model,
    copy_model,
    find_layers,
)

logger = logging.getLogger(__name__)

#: Default bound on the output SQNR (dB). A model whose quantization works keeps its outputs well above it (int8:
#: 29 dB for the small ResNet, 34 dB for the test CNN; even 4-bit per-tensor weights give 11–13 dB on them, see
#: tools/bench_sensitivity.py), while a layer that destroys the output brings it to about 0 dB. 10 dB (noise power a
#: tenth of the signal's, ~32% RMS error: the outputs are mostly noise below it) sits between the two, so the default
#: changes nothing on healthy models and rescues a model that one layer breaks. Ask for more (``--min-sqnr 25``) to
#: trade coverage for accuracy.
DEFAULT_MIN_SQNR_DB = 10.0
#: Calibration batches kept for the analysis (the decision and the final SQNR).
DEFAULT_SENSITIVITY_BATCHES = 2
#: Samples of the first batch that the ranking runs on.
DEFAULT_RANKING_SAMPLES = 8
#: The automatic search budget: this many seconds plus this factor times the calibration time.
AUTO_BUDGET_SECONDS = 20.0
AUTO_BUDGET_CALIBRATION_FACTOR = 2.0
#: Largest accepted bound: int8 cannot reach it, so a higher value only means "everything FP32".
MAXIMUM_MIN_SQNR_DB = 100.0
#: Safety margin (dB) of the ranking subset's measurement over the bound before a plan is verified.
RANKING_MARGIN_DB = 0.3
#: An activation whose local error is this many times the median activation's is an outlier (its range is
#: dominated by a few values): its other owners are excluded with a candidate that it dominates.
OUTLIER_ERROR_FACTOR = 10.0
#: When the budget runs out, unexplored groups go to FP32 as a whole only up to this fraction (1/n) of the layers.
COARSE_FRACTION = 8
#: Verifications of real QDQ plans at most.
MAXIMUM_VERIFICATIONS = 4


def _option_number(value: float | str, option: str, expected: str) -> float:
    """``value`` as a float; QGraphError naming ``option`` and the ``expected`` form when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise QGraphError(f"{option} must be {expected}, got {value!r}") from None


def validate_min_sqnr(value: float | None) -> float | None:
    """``value`` as a bound in dB, or None (off); refuses NaN, infinities and values outside (0, 100]."""
    if value is None:
        return None
    bound = _option_number(value, "--min-sqnr", "a number of dB or 'off'")
    if not math.isfinite(bound) or not 0.0 < bound <= MAXIMUM_MIN_SQNR_DB:
        raise QGraphError(
            f"--min-sqnr must be a finite bound in (0, {MAXIMUM_MIN_SQNR_DB:g}] dB or 'off', got {value!r}"
        )
    return bound


def validate_search_budget(value: float | None) -> float | None:
    """``value`` as a budget in seconds, or None (automatic); refuses NaN and values that are not positive."""
    if value is None:
        return None
    budget = _option_number(value, "--search-budget", "a number of seconds or 'auto'")
    if math.isnan(budget) or budget <= 0.0:
        raise QGraphError(f"--search-budget must be a positive number of seconds or 'auto', got {value!r}")
    return budget


def automatic_budget(calibration_seconds: float) -> float:
    """The default search budget for a calibration that took ``calibration_seconds``."""
    return AUTO_BUDGET_SECONDS + AUTO_BUDGET_CALIBRATION_FACTOR * max(0.0, calibration_seconds)


@dataclasses.dataclass(frozen=True)
class SensitivityOptions:
    """How the fallback search runs (the PTQ driver builds it from :class:`qgraph.ptq.QuantizeOptions`)."""

    min_sqnr: float = DEFAULT_MIN_SQNR_DB
    #: Retained calibration batches: the decision and the final output SQNR are measured on them.
    batches: int = DEFAULT_SENSITIVITY_BATCHES
    #: Samples (of the first batch) the ranking runs on.
    ranking_samples: int = DEFAULT_RANKING_SAMPLES
    #: Seconds the whole search may take; None: :func:`automatic_budget` of the calibration time.
    budget_seconds: float | None = None
    #: Measure every layer's single-layer SQNR (for a report), even when the bound is met.
    full_table: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        validate_min_sqnr(self.min_sqnr)
        validate_search_budget(self.budget_seconds)
        require_at_least("sensitivity_batches", self.batches, 1)
        require_at_least("ranking_samples", self.ranking_samples, 1)


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    node: str
    op_type: str
    tensors: tuple[str, ...]
    #: Output SQNR (dB) of the model with only this layer quantized (on the ranking subset); when not ``measured``,
    #: the SQNR of the smallest measured group holding the layer, a lower bound.
    output_sqnr_db: float
    fell_back: bool
    measured: bool = True


@dataclasses.dataclass(frozen=True)
class SensitivityResult:
    min_sqnr_db: float
    #: Output SQNR (dB) of the fully quantized model (before any fallback).
    output_sqnr_db: float
    #: Output SQNR (dB) of the model as finally quantized (after fallback).
    final_output_sqnr_db: float
    #: Per-layer sensitivity in graph order (the layers the search measured, or all with a table; empty when the
    #: bound was met and no table was asked for).
    layers: tuple[LayerSensitivity, ...]
    #: Nodes put back to FP32, most damaging first.
    fell_back: tuple[str, ...]
    batches: int
    seconds: float
    #: Model runs of the search (the switchable graph and the verifications), and verifications of real plans.
    runs: int = 0
    verifications: int = 0
    budget_seconds: float | None = None
    #: The search stopped at its budget and kept the best plan found so far.
    budget_exhausted: bool = False

    @property
    def bound_met(self) -> bool:
        return self.final_output_sqnr_db >= self.min_sqnr_db

    def reason(self, node: str) -> str:
        row = next((layer for layer in self.layers if layer.node == node), None)
        if row is None or not row.measured:
            alone = "its group of layers" if row is not None else "the search"
            detail = (f"{alone} brought output SQNR to {row.output_sqnr_db:.1f} dB" if row is not None
                      else f"{alone} ran out of budget before measuring it alone")
        else:
            detail = f"alone it brought output SQNR to {row.output_sqnr_db:.1f} dB"
        return (
            f"fell back to FP32: {detail} (bound {self.min_sqnr_db:g} dB; "
            f"fully quantized {self.output_sqnr_db:.1f} dB)"
        )


@dataclasses.dataclass(frozen=True)
class SearchOutcome:
    """What :func:`search` chose: the plan to write, its parameters, what the driver sent with it, the result."""

    plan: QuantPlan
    parameters: Mapping[str, object]
    #: The third value the driver sent with the chosen plan (None when the plan is the original one).
    extra: object
    result: SensitivityResult


#: What the driver sends back for a set of nodes to keep FP32: (plan, parameters, anything it keeps with them).
Replanned = tuple[QuantPlan, Mapping[str, object], object]
#: :func:`search`: yields sets of nodes to keep FP32, is sent the driver's plan for each, returns the outcome.
Search = Generator[frozenset[str], Replanned, SearchOutcome]


def retain_batches(batches: Iterable[Mapping[str, np.ndarray]], count: int, kept: list) -> Iterator:
    """Yield ``batches`` unchanged, appending copies of the first ``count`` to ``kept`` (calibration streams once)."""
    for index, batch in enumerate(batches):
        if index < count:
            kept.append({name: np.array(array) for name, array in batch.items()})
        yield batch


@dataclasses.dataclass
class _Group:
    """A run ``order[start:end]`` of candidates and its noise ratios (measured, or inferred from its parent)."""

    start: int
    end: int
    ratios: np.ndarray
    measured: bool

    @property
    def size(self) -> int:
        return self.end - self.start


class _Clock:
    """The search's budget: seconds left, and what a step has cost so far."""

    def __init__(self, started: float, budget: float) -> None:
        self.started = started
        self.budget = budget
        self.exhausted = False

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def allows(self, seconds: float) -> bool:
        if seconds <= self.left():
            return True
        self.exhausted = True
        return False


class _Reference:
    """The FP32 model's float outputs on the retained batches: given (the calibration's probe runs returned them), or
    computed in an optimised session, which is made only when asked for (:attr:`comparison`)."""

    def __init__(self, model: ir.Model, batches: Sequence[Mapping[str, np.ndarray]], threads: int | None,
                 given: Sequence[Mapping[str, np.ndarray]] = ()) -> None:
        self.model = model
        self.batches = batches
        self.threads = threads
        self._comparison: OutputComparison | None = None
        self.output_names: list[str] | None = None
        started = time.perf_counter()
        names = _float_outputs(model)
        if names is not None and len(given) >= len(batches) and all(
                name in outputs for outputs in given[:len(batches)] for name in names):
            self.output_names = names
            self.outputs = [[np.asarray(outputs[name]) for name in names] for outputs in given[:len(batches)]]
            self.feeds = [dict(batch) for batch in batches]
            self.given = True
        else:
            self.output_names = list(self.comparison.output_names)
            self.outputs = self.comparison.outputs()
            self.feeds = self.comparison.feeds
            self.given = False
        self.seconds = time.perf_counter() - started

    @property
    def comparison(self) -> OutputComparison:
        """The FP32 model's optimised session on the retained batches (made on first use)."""
        if self._comparison is None:
            self._comparison = optimized_comparison(ir.serde.serialize_model(self.model), self.batches,
                                                     self.threads, self.output_names)
        return self._comparison


_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16})


def _float_outputs(model: ir.Model) -> list[str] | None:
    """The names of the model's float outputs (what :class:`OutputComparison` compares), None when an output's type
    is not stated."""
    if any(value.dtype is None for value in model.graph.outputs):
        return None
    return [value.name for value in model.graph.outputs if value.dtype in _FLOAT_TYPES]


def quick_output_sqnr(model: ir.Model, plan: QuantPlan, parameters: Mapping[str, object], reference: _Reference,
                      threads: int | None = None) -> float:
    """The fully quantized model's output SQNR on the retained batches, from its QDQ graph in an optimised session
    (onnxruntime fuses the Q/DQ pairs into its integer kernels, as the written model runs): the search's first
    question, answered in about a third of an FP32 pass over the retained batches, without the switchable graph."""
    qdq = ir.serde.serialize_model(build_qdq(model, plan, parameters))
    comparison = optimized_comparison(qdq, reference.feeds, threads, output_names=reference.output_names)
    return comparison.sqnr(reference.outputs)


class _Search:
    """The switchable graph, its measurements on the ranking subset, and the best-first group testing."""

    def __init__(self, model: ir.Model, plan: QuantPlan, parameters: Mapping[str, object],
                 batches: Sequence[Mapping[str, np.ndarray]], options: SensitivityOptions, clock: _Clock,
                 bar: Progress, batch_axes: BatchAxes | None = None, *, reference: _Reference) -> None:
        self.model = model
        self.options = options
        self.clock = clock
        self.bar = bar
        self.layers = find_layers(model, plan)
        self.runs = 0
        self.verifications = 0
        count = len(self.layers)
        self.output_names = reference.output_names
        self.reference = reference.outputs
        reference_seconds = reference.seconds
        reference = reference.comparison  # the ranking subset's reference runs in it
        self.batch_axes = batch_axes
        self.ranking_feeds = [first_samples(batches[0], options.ranking_samples, batch_axes)]
        reference.feeds = [{name: feeds[name] for name in reference.feeds[0]} for feeds in self.ranking_feeds]
        self.ranking_reference = reference.outputs()
        self.runs += 1
        bar.update(note="switchable graph")
        probes: dict[str, tuple[str, str]] = {}
        started = time.perf_counter()
        switchable = build_switchable_model(model, plan, parameters, self.layers, probes=probes)
        self.build_seconds = time.perf_counter() - started
        self.comparison = optimized_comparison(switchable, batches, options.threads, self.output_names)
        self.ranking_inputs = [{name: feeds[name] for name in self.comparison.feeds[0]}
                               for feeds in self.ranking_feeds]
        # the fully quantized model on every retained batch; its first run also returns the local errors
        bar.update(note="fully quantized")
        started = time.perf_counter()
        enabled = {ENABLE_INPUT: np.ones(count, bool)}
        probe_names = [name for pair in probes.values() for name in pair]
        outputs, seconds = [], []
        for feeds in self.comparison.feeds:
            outputs.append(self.comparison.run(feeds, enabled)[0])
            seconds.append(time.perf_counter() - started)
            started = time.perf_counter()
        self.runs += len(batches)
        # the first run warms the session up and computes the probes: the others tell what a batch costs
        self.batch_seconds = float(np.median(seconds[1:] if len(seconds) > 1 else seconds))
        self.whole_ratios = noise_ratios(self.reference, outputs)
        self.whole_db = ratio_db(self.whole_ratios)
        logger.debug("search set-up: reference %.1f s, switchable graph %.1f s, fully quantized %.1f s per batch",
                     reference_seconds, self.build_seconds, self.batch_seconds)
        # each activation's own error, in the float model (flags off): an upstream layer's damage does not count
        _, probe_values = self.comparison.run(self.ranking_inputs[0], {ENABLE_INPUT: np.zeros(count, bool)},
                                              probe_names)
        self.runs += 1
        powers = dict(zip(probe_names, (float(value) for value in probe_values)))
        self.local = {tensor: powers[error] / powers[signal] if powers[signal] > 0 else 0.0
                      for tensor, (error, signal) in probes.items()}
        activation_errors = list(self.local.values())
        self.typical_error = float(np.median(activation_errors)) if activation_errors else 0.0
        self.local.update(_weight_errors(model, plan, parameters))
        self.measured_seconds: list[float] = []
        self.verify_seconds: float | None = None
        self.singles: dict[int, np.ndarray] = {}
        self.group_bounds: dict[int, np.ndarray] = {}
        names = [layer.node for layer in self.layers]
        eligible = [index for index, layer in enumerate(self.layers)
                    if layer.tensors and layer.node and names.count(layer.node) == 1]
        self.prior = {index: sum(self.local.get(tensor, 0.0) for tensor in self.layers[index].tensors)
                      for index in eligible}
        self.order = sorted(eligible, key=lambda index: (-self.prior[index], index))
        self.ranking_whole: np.ndarray | None = None
        self.heap: list[tuple[float, int, _Group]] = []
        self.pushed = 0
        self.candidates: list[int] = []

    # -- measurements on the ranking subset ---------------------------------------------------------------------
    def run_seconds(self) -> float:
        """The expected cost of one ranking measurement."""
        if self.measured_seconds:
            return float(np.median(self.measured_seconds[-8:]))
        fraction = min(1.0, self.options.ranking_samples
                       / max(1, batch_samples(self.comparison.feeds[0], self.batch_axes)))
        return self.batch_seconds * fraction

    def measure(self, enabled: np.ndarray, note: str) -> np.ndarray | None:
        """Noise ratios on the ranking subset with ``enabled`` layers quantized (None: no budget left)."""
        if not self.clock.allows(self.run_seconds() + self.reserve()):
            return None
        started = time.perf_counter()
        outputs = [self.comparison.run(feeds, {ENABLE_INPUT: enabled})[0] for feeds in self.ranking_inputs]
        self.measured_seconds.append(time.perf_counter() - started)
        self.runs += len(self.ranking_inputs)
        self.bar.update(note=note)
        return noise_ratios(self.ranking_reference, outputs)

    def reserve(self) -> float:
        """Seconds kept back for one verification of a real QDQ plan: as long as the last one, or as building the
        switchable graph and running it on every retained batch (a QDQ graph costs about as much)."""
        if self.verify_seconds is not None:
            return self.verify_seconds
        return self.build_seconds + self.batch_seconds * len(self.comparison.feeds)

    def only(self, members: Iterable[int]) -> np.ndarray:
        enabled = np.zeros(len(self.layers), bool)
        enabled[list(members)] = True
        return enabled

    def without(self, members: Iterable[int]) -> np.ndarray:
        enabled = np.ones(len(self.layers), bool)
        enabled[list(members)] = False
        return enabled

    # -- best-first group testing --------------------------------------------------------------------------------
    def push(self, group: _Group) -> None:
        self.pushed += 1
        heapq.heappush(self.heap, (-float(np.max(group.ratios)), self.pushed, group))
        if group.measured:  # groups only shrink as the search descends: the latest measured one is the smallest
            for index in self.order[group.start:group.end]:
                self.group_bounds[index] = group.ratios

    def start(self) -> None:
        """The fully quantized model and the group of all candidates on the ranking subset: the search's root."""
        self.ranking_whole = self.measure(self.without(()), "fully quantized, ranking subset")
        if not self.order or self.ranking_whole is None:
            return
        if len(self.order) == len(self.layers):
            root = _Group(0, len(self.order), self.ranking_whole, True)
        else:
            ratios = self.measure(self.only(self.order), "measuring the candidates")
            if ratios is None:
                return
            root = _Group(0, len(self.order), ratios, True)
        self.push(root)

    def next_candidate(self) -> int | None:
        """The next most damaging layer (its single-layer ratios measured), or None (none left, or no budget)."""
        while self.heap:
            _, _, group = self.heap[0]
            if not group.measured:
                ratios = self.measure(self.only(self.order[group.start:group.end]), self._note())
                if ratios is None:
                    return None
                heapq.heappop(self.heap)
                self.push(_Group(group.start, group.end, ratios, True))
                continue
            if group.size == 1:
                heapq.heappop(self.heap)
                index = self.order[group.start]
                self.singles[index] = group.ratios
                return index
            middle = group.start + group.size // 2
            ratios = self.measure(self.only(self.order[group.start:middle]), self._note())
            if ratios is None:
                return None
            heapq.heappop(self.heap)
            self.push(_Group(group.start, middle, ratios, True))
            self.push(_Group(middle, group.end, np.maximum(group.ratios - ratios, 0.0), False))
        return None

    def _note(self) -> str:
        return f"{len(self.candidates)} candidates, {self.runs} runs, {max(0.0, self.clock.left()):.0f} s left"

    def find(self, target: np.ndarray) -> bool:
        """Add candidates until the ranking subset's measurement with them disabled is under ``target`` ratios.

        Returns whether it got there (False: no candidate or no budget left)."""
        if self.ranking_whole is None:
            return False
        correction = np.zeros_like(self.ranking_whole)
        while True:
            predicted = self.ranking_whole - sum((self.singles[index] for index in self.candidates
                                                  if index in self.singles),
                                                 np.zeros_like(self.ranking_whole)) + correction
            if self.candidates and np.all(predicted <= target):
                measured = self.measure(self.without(self.candidates), self._note())
                if measured is None:
                    return False
                if np.all(measured <= target):
                    return True
                correction = correction + (measured - predicted)
            index = self.next_candidate()
            if index is None:
                return False
            coupled = [other for other in self.co_owners(index) if other not in self.candidates]
            self.candidates.extend([index, *coupled])
            logger.debug("candidate %s (prior %.2e): alone %.1f dB%s", self.layers[index].node, self.prior[index],
                         ratio_db(self.singles[index]),
                         f", with {', '.join(self.layers[other].node for other in coupled)}" if coupled else "")

    def co_owners(self, index: int) -> list[int]:
        """The other candidates that own the dominant activations of layer ``index`` (local error at least half its
        largest): a shared activation stays quantized while any owner is, so excluding ``index`` alone would leave
        its worst error in place."""
        tensors = self.layers[index].tensors
        largest = max((self.local.get(tensor, 0.0) for tensor in tensors), default=0.0)
        floor = max(0.5 * largest, OUTLIER_ERROR_FACTOR * self.typical_error)
        dominant = {tensor for tensor in self.layers[index].inputs + self.layers[index].outputs
                    if largest > 0 and self.local.get(tensor, 0.0) >= floor}
        return [other for other in self.order if other != index and dominant & set(self.layers[other].inputs
                                                                                   + self.layers[other].outputs)]

    def coarse_completion(self, target: np.ndarray) -> list[int]:
        """The candidates plus the noisiest unexplored groups as a whole, until the prediction meets ``target``."""
        chosen = list(self.candidates)
        if self.ranking_whole is None:
            return chosen
        remaining = self.ranking_whole - sum((self.singles[index] for index in chosen if index in self.singles),
                                             np.zeros_like(target))
        limit = max(1, len(self.order) // COARSE_FRACTION)
        for _, _, group in sorted(self.heap, key=lambda entry: entry[0]):
            if np.all(remaining <= target):
                break
            if len(chosen) + group.size > limit:
                return list(self.candidates)  # more than that in FP32 would cost more than the bound is worth
            chosen.extend(self.order[group.start:group.end])
            remaining = remaining - group.ratios
        return chosen if np.all(remaining <= target) else list(self.candidates)

    def table(self, fell_back: Sequence[str], everything: bool) -> tuple[LayerSensitivity, ...]:
        """The per-layer rows: measured singles, and with ``everything`` all layers (measured within the budget)."""
        if everything:
            for index in range(len(self.layers)):
                if index in self.singles:
                    continue
                ratios = self.measure(self.only([index]), f"table: layer {index + 1}/{len(self.layers)}")
                if ratios is None:
                    break
                self.singles[index] = ratios
        rows = []
        for index, layer in enumerate(self.layers):
            if index in self.singles:
                rows.append(LayerSensitivity(layer.node, layer.op_type, layer.tensors, ratio_db(self.singles[index]),
                                             layer.node in fell_back))
            elif everything or layer.node in fell_back:
                bound = self.group_bounds.get(index, self.whole_ratios)
                rows.append(LayerSensitivity(layer.node, layer.op_type, layer.tensors, ratio_db(bound),
                                             layer.node in fell_back, measured=False))
        return tuple(rows)


def _weight_errors(model: ir.Model, plan: QuantPlan, parameters: Mapping[str, object]) -> dict[str, float]:
    """``Σ(DQ(Q(W)) − W)² / Σ W²`` of every planned weight, from its parameters (numpy)."""
    from qgraph.quant.numerics import fake_quantize

    initializers = {name: value for graph in model.graphs() for name, value in graph.initializers.items()}
    errors = {}
    for weight in plan.weights:
        params = parameters.get(weight.name)
        if params is None or weight.name not in initializers:
            continue
        array = initializers[weight.name].const_value.numpy().astype(np.float64)
        power = float(np.sum(np.square(array)))
        if power == 0.0:
            continue
        error = fake_quantize(array, params) - array
        errors[weight.name] = float(np.sum(np.square(error))) / power
    return errors


def search(
    model: ir.Model,
    plan: QuantPlan,
    parameters: Mapping[str, object],
    batches: Sequence[Mapping[str, np.ndarray]],
    options: SensitivityOptions,
    *,
    calibration_seconds: float = 0.0,
    batch_axes: BatchAxes | None = None,
    reference_outputs: Sequence[Mapping[str, np.ndarray]] = (),
) -> Search:
    """Measure ``plan`` against ``options.min_sqnr`` and, when it misses, fall back within the budget.

    ``reference_outputs``: the FP32 model's outputs (name -> array) on the first of ``batches`` when the caller has
    them (the calibration's probe runs, :attr:`qgraph.calibrate.driver.CalibrationResult.outputs`); otherwise an
    optimised session computes them.

    A generator: each set of nodes it yields is a fallback to verify, and the driver sends back its plan with those
    nodes in FP32 (see the module docstring) as ``(plan, parameters, extra)``; the search measures it as a real QDQ
    graph. The :class:`SearchOutcome` (the chosen plan, its parameters and extra) is the generator's return value.
    No callback: the data flows down as values and the driver does its own re-planning.
    """
    started = time.perf_counter()
    if not batches:
        raise QGraphError("sensitivity analysis needs at least one calibration batch")
    budget = options.budget_seconds if options.budget_seconds is not None else automatic_budget(calibration_seconds)
    clock = _Clock(started, budget)
    bound = options.min_sqnr
    with Progress(None, "sensitivity search", unit="steps") as bar:
        bar.update(note="reference")
        reference = _Reference(model, batches, options.threads, reference_outputs)
        if not options.full_table:  # the common case first: the fully quantized model meets the bound
            bar.update(note="fully quantized")
            quick_db = quick_output_sqnr(model, plan, parameters, reference, options.threads)
            if quick_db >= bound + RANKING_MARGIN_DB:
                logger.info("output SQNR of the fully quantized model: %.1f dB (bound %g dB)", quick_db, bound)
                runs = len(batches) * (1 if reference.given else 2)
                result = SensitivityResult(bound, quick_db, quick_db, (), (), len(batches),
                                           time.perf_counter() - started, runs, 0, budget, False)
                return SearchOutcome(plan, parameters, None, result)
            logger.debug("fully quantized (fused kernels): %.1f dB, within %.1f dB of the bound or below: searching",
                         quick_db, RANKING_MARGIN_DB)
        state = _Search(model, plan, parameters, batches, options, clock, bar, batch_axes, reference=reference)
        state.runs += len(batches) * ((0 if reference.given else 1) + (0 if options.full_table else 1))
        logger.info("output SQNR of the fully quantized model: %.1f dB (bound %g dB)", state.whole_db, bound)
        needed = state.whole_db < bound
        chosen = (plan, parameters, None, 0, state.whole_db)
        fallen: tuple[str, ...] = ()
        if needed:
            chosen = yield from _fall_back(state, plan, parameters, batches, bound)
            fallen = tuple(state.layers[index].node for index in chosen[3])
        rows = state.table(fallen, options.full_table) if (needed or options.full_table) else ()
    final_plan, final_parameters, extra, excluded, final_db = chosen
    if clock.exhausted:
        logger.warning("the sensitivity search reached its budget of %.0f s after %d runs: keeping the best plan "
                       "found so far (%d layers in FP32, output SQNR %.1f dB, bound %g dB); --search-budget "
                       "SECONDS gives it more time", budget, state.runs, len(fallen), final_db, bound)
    result = SensitivityResult(bound, state.whole_db, final_db, rows, fallen, len(batches),
                               time.perf_counter() - started, state.runs, state.verifications, budget,
                               clock.exhausted)
    if needed:
        if final_db < bound:
            logger.warning("output SQNR %.1f dB is still below the bound of %g dB after the fallback", final_db, bound)
        reasons = dict(final_plan.fp32_nodes)
        for node in fallen:
            reasons[node] = result.reason(node)
        final_plan = dataclasses.replace(final_plan, fp32_nodes=reasons)
        logger.info("%d layers fell back to FP32 (%s): output SQNR %.1f -> %.1f dB in %.1f s (%d runs)",
                    len(fallen), ", ".join(fallen), state.whole_db, final_db, result.seconds, state.runs)
    return SearchOutcome(final_plan, final_parameters, extra, result)


def _fall_back(state: _Search, plan: QuantPlan, parameters: Mapping[str, object],
               batches: Sequence[Mapping[str, np.ndarray]], bound: float):
    """Find candidates, verify real plans, widen the margin by each miss; the best verified plan wins."""
    best = (plan, parameters, None, (), state.whole_db)
    margin_db = RANKING_MARGIN_DB
    state.start()
    for _ in range(MAXIMUM_VERIFICATIONS):
        target = np.full_like(state.whole_ratios, 10.0 ** (-(bound + margin_db) / 10.0))
        reached = state.find(target)
        excluded = list(state.candidates)
        if not reached and state.clock.exhausted:
            excluded = state.coarse_completion(target)
        if not excluded or (best[3] and set(excluded) == set(best[3])):
            break
        started = time.perf_counter()
        names = frozenset(state.layers[index].node for index in excluded)
        new_plan, new_parameters, extra = yield names
        state.bar.update(note=f"verifying {len(excluded)} layers in FP32")
        qdq = ir.serde.serialize_model(build_qdq(state.model, new_plan, new_parameters))
        measured = OutputComparison(qdq, batches, threads=state.options.threads,
                                    output_names=state.output_names).sqnr(state.reference)
        state.runs += len(batches)
        state.verifications += 1
        state.verify_seconds = time.perf_counter() - started
        logger.info("with %d layers in FP32 the output SQNR is %.1f dB", len(excluded), measured)
        if measured > best[4] or (measured >= bound and (best[4] < bound or len(excluded) < len(best[3]))):
            best = (new_plan, new_parameters, extra, tuple(excluded), measured)
        if measured >= bound or len(excluded) >= len(state.order) or state.clock.exhausted:
            break
        margin_db += bound - measured + RANKING_MARGIN_DB
    return best

