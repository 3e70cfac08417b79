"""Speed choice: the integer model that onnxruntime runs fastest on this machine, and never one slower than FP32.

Whether an integer kernel beats its FP32 counterpart depends on the CPU, the onnxruntime release and the layer: on
an AVX-512 VNNI EPYC with onnxruntime 1.19.2, QLinearConv ran 1x1 convolutions twice as fast as FP32 but stride-1
depthwise 3x3/5x5 convolutions 1.5–3× slower, and the 3-channel stem 2× slower (docs/runtime-facts.md). So the
choice is measured (:mod:`qgraph.latency`), not predicted, among candidates built from one QDQ graph (the plan's
scales stay the same in all of them):

0. first the *lead*: the target's lowering against FP32 alone. When it is at least ``decisive_speedup`` (2×) as fast
   at every batch size, nothing else is timed: the other candidates win a few percent where they win (on ResNet-18,
   2.5–2.8× FP32 at batch 1, none did), and timing them took 1.5 s of a 13.4 s ``qgraph optimize`` over 1,000
   images, where the lead takes 0.8 s. The lead's rounds end after two unless it is near 1×, whether or not it
   is near the decisive threshold: a lead that noise made look decisive only spares the search, the model being
   far faster than FP32 either way. Otherwise:
1. the whole-model formats: QOperator (the target's lowering) and QDQ (onnxruntime fuses the pairs itself);
2. per *region class* (:mod:`qgraph.speed_regions`: ``stem``, ``depthwise``, ``squeeze-excite``, ``small-matmul``,
   each with the elementwise nodes that only it feeds), the fastest format with the class kept FP32
   (:class:`~qgraph.passes.lower.keep_float_nodes.KeepFloatNodes`);
3. per *connected integer region* (:func:`qgraph.speed_regions.find_integer_regions`), each kept FP32 on its own,
   when the model has more than one, the smallest first, at most ``max_regions``; such a region leaves no Q/DQ
   behind, where a region class keeps the pairs at its border;
4. the union of the classes and regions that were faster on their own;
5. when the best so far is still slower than FP32 at some batch size: the *rescue*, every class and region whose
   FP32 trial did not make the model slower at batch 1 kept FP32 together (left out when that covers every integer
   region: that is the FP32 model);
6. when the best is less than ``1 + confirm_band`` times as fast as FP32 at some batch size: a *confirmation*, the
   two timed alone once more, the verdict taken on the first quartiles of all their runs so far (on a machine with
   the load average at 15 on two cores, one table's batch-8 runs put a 1.4×-at-batch-1 MobileNetV3 at 0.79×).

Where the time goes at batch 1 on a model of microseconds (the stream VAD: 23 µs FP32, docs/runtime-facts.md) is
the nodes, not the kernels: every Q, DQ and layout Transpose that an integer region costs at its border takes about
as long as one small kernel, so the integer model with fewer FLOPs runs slower; keeping a region FP32 removes its
nodes along with its integer kernels.

With ``t_c(b)`` the first quartile of candidate ``c``'s run times at batch size ``b`` and
``r_c(b) = t_base(b) / t_c(b)`` its speed-up over the current best (see :mod:`qgraph.latency` for why quartiles),
a class is taken when ``r_c(b) >= 1`` at every measured batch size, the geometric mean over batch sizes is at
least ``1 + margin``, and the candidate won at least three of four rounds (paired ratios' lower quartile ``>= 1``)
at every batch size; the first format (the target's lowering) gives way to another by the same test. The rescue
replaces the best when its smallest speed-up over FP32 is not lower. The result is the chosen candidate if its
speed-up over FP32 is at least ``1 - tolerance`` at every batch size, else the FP32 model with a WARNING
(``keep_float_when_slower``, the default, as :func:`qgraph.ptq.quantize` runs it: never a model slower than FP32)
or, when an integer model was asked for whatever its speed, the fastest integer candidate marked
``slower_than_float``, with the reason either way.

Cost: every measurement is one :func:`qgraph.latency.measure_latency` table (the lead; past it, the formats, with
FP32 only when no
trial table follows, since the trial table times FP32 beside the best format and gives the verdict: FP32, the slowest
model, took half of the format table's time on ResNet-18; then FP32, the
best format and one candidate per region class present and per integer region tried; then, when two or more were
taken, their combination; then, only when still slower than FP32, the rescue; then, only near or below 1×, the
confirmation), each bounded by the latency options' budget, plus one session and one lowering per candidate: the
sessions are pooled (:class:`qgraph.latency.SessionPool`), so FP32 and the best candidate, timed again in each
table, are built and warmed up once.

**Stopping rule.** A table asks a few *questions* (:class:`Question`): is a challenger clearly faster than the best
so far (a format, a region class kept FP32), is the best's speed-up over FP32 beyond ``1 - tolerance`` and
``1 + confirm_band`` (only in the table that gives the verdict), and, at the first batch size, is a trial at least as
fast as the best (the rescue's test, moot once the best is settled above ``1 + confirm_band``). A batch size's rounds
end once every question is :func:`settled`: each paired ratio beyond its thresholds by the factor ``1 + settle_band``
on one side, or a challenger that lost more rounds than the planned rounds allow a three-in-four win (then at every
later batch size too: the largest batch size is measured first, and its two costly rounds often end the question
for batch 1's many cheap ones). Settled questions get the same answer with more rounds, within the band; near a
threshold every planned round runs, and the rescue and the confirmation tables always run theirs. On ResNet-18
(224×224, random weights, batch 16 then batch 1) both tables stopped batch 1 after 4 rounds where the budget
planned 18–34, batch 16 keeping its 2 (here QDQ and the FP32 stem lost at batch 16, which settled them for batch 1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.errors import QGraphError, require_at_least
from qgraph.latency import LatencyOptions, LatencyTable, SessionPool, StoppingRule, measure_latency
from qgraph.speed_regions import REGION_CLASSES, find_integer_regions, find_regions

logger = logging.getLogger(__name__)

FLOAT = "fp32"
QOPERATOR = "qoperator"
QDQ = "qdq"


@dataclasses.dataclass(frozen=True)
class SpeedChoiceOptions:
    latency: LatencyOptions = dataclasses.field(default_factory=lambda: LatencyOptions(batch_sizes=(1,)))
    #: Region classes to try FP32 (a subset of REGION_CLASSES); empty: whole-model formats only.
    region_classes: tuple[str, ...] = REGION_CLASSES
    #: Formats to try (the target's lowering and/or explicit QDQ).
    formats: tuple[str, ...] = (QOPERATOR, QDQ)
    #: A region class must make the model at least this much faster (geometric mean over batch sizes).
    margin: float = 0.03
    #: The chosen integer model may be this much slower than FP32 before FP32 is returned instead (noise).
    tolerance: float = 0.0
    #: MatMul/Gemm weights with at most this many elements form the ``small-matmul`` class.
    small_matmul_weights: int = 16384
    #: When the fastest integer candidate is still slower than FP32: return the FP32 model (True), or that
    #: integer candidate marked ``slower_than_float`` (False).
    keep_float_when_slower: bool = True
    #: Connected integer regions (:func:`find_integer_regions`) tried FP32 one by one when the model has more than
    #: one, the smallest first: at most this many (0: none).
    max_regions: int = 6
    #: A chosen integer candidate less than ``1 + confirm_band`` times as fast as FP32 (or slower) is timed once more
    #: beside FP32 alone, and the verdict taken on every run of the two (noise decides near 1×).
    confirm_band: float = 0.1
    #: The stopping rule (:func:`stopping_rule`): a batch size's rounds end once every question of the table is
    #: settled, each paired ratio beyond its thresholds by this factor (None: every planned round is run).
    settle_band: float | None = 0.05
    #: Rounds a batch size runs at least before the stopping rule may end it.
    settle_rounds: int = 4
    #: When the target's lowering is at least this many times as fast as FP32 at every batch size (the first table,
    #: the two alone), no other candidate is timed: the formats and region trials win a few percent where they win,
    #: and timing them cost ResNet-18 1.5 s of a 13.4 s command (None: always time every candidate).
    decisive_speedup: float | None = 2.0

    def __post_init__(self) -> None:
        unknown = set(self.region_classes) - set(REGION_CLASSES)
        if unknown:
            raise QGraphError(f"unknown region classes {sorted(unknown)}; choose from {', '.join(REGION_CLASSES)}")
        if not self.formats or set(self.formats) - {QOPERATOR, QDQ}:
            raise QGraphError(f"formats must be among {QOPERATOR}, {QDQ}, got {self.formats}")
        if self.margin < 0 or not 0 <= self.tolerance < 1:
            raise QGraphError(f"margin must be >= 0 and tolerance in [0, 1), got {self.margin}, {self.tolerance}")
        require_at_least("confirm_band", self.confirm_band, 0)
        if self.settle_band is not None:
            require_at_least("settle_band", self.settle_band, 0)
        require_at_least("settle_rounds", self.settle_rounds, 1)
        if self.decisive_speedup is not None:
            require_at_least("decisive_speedup", self.decisive_speedup, 1 + self.confirm_band)
        require_at_least("max_regions", self.max_regions, 0)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to run the model: a format and the region classes kept FP32 (``format`` FLOAT: the FP32 model)."""

    format: str
    float_classes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        if self.format == FLOAT or not self.float_classes:
            return self.format
        return f"{self.format}+fp32[{','.join(self.float_classes)}]"


@dataclasses.dataclass(frozen=True)
class SpeedChoice:
    """The chosen model and why; ``tables`` are the latency measurements the decision was made on, in order."""

    model: onnx.ModelProto
    candidate: Candidate
    float_nodes: frozenset[str]
    reason: str
    #: speed-up over FP32 per batch size (fast quartiles) of the chosen candidate
    speedup: Mapping[int, float]
    tables: tuple[LatencyTable, ...]
    #: region class -> number of nodes found in the model (empty after a decisive lead: no region was looked for)
    regions: Mapping[str, int]
    #: The chosen integer model is slower than FP32 (only with ``keep_float_when_slower=False``).
    slower_than_float: bool = False

    def describe(self) -> str:
        """One line: the candidate, its speed-up over FP32 per batch size, and a warning when it is slower."""
        sizes = "/".join(str(size) for size in self.speedup)
        ratios = "/".join(f"{value:.2f}x" for value in self.speedup.values())
        text = f"{self.candidate.name} at {ratios} FP32 (batch {sizes})"
        if self.float_nodes:
            text += f", {len(self.float_nodes)} nodes kept FP32 for speed"
        if self.slower_than_float:
            text = f"WARNING: the integer model runs SLOWER than FP32 on this machine: {text}"
        elif self.candidate.format == FLOAT:
            text = (f"WARNING: FP32 kept, at {ratios} FP32 (batch {sizes}): every integer candidate ran slower on "
                    f"this machine ({self.reason})")
        return text


# --------------------------------------------------------------------------------------------- candidates
Lowering = Callable[[ir.Model], None]
Measure = Callable[..., LatencyTable]


def build_candidate(qdq_model: onnx.ModelProto, output_format: str, float_nodes: frozenset[str],
                    lower: Lowering | None, lower_explicit: Lowering | None = None) -> onnx.ModelProto:
    """The QDQ model with ``float_nodes`` kept FP32, lowered as :func:`qgraph.ptq.quantize` lowers (the target's
    passes, then dead-code elimination): by ``lower`` when the format is QOperator, by ``lower_explicit`` (the
    rewrites that explicit QDQ keeps, such as embedding lookups; None: none) when it is QDQ."""
    from qgraph.passes.infrastructure import PassManager, get_pass

    model = ir.serde.deserialize_model(qdq_model)
    if float_nodes:
        PassManager([get_pass("KeepFloatNodes")(nodes=float_nodes)]).run(model)
    if output_format == QOPERATOR:
        if lower is None:
            raise QGraphError("a QOperator candidate needs the target's lowering")
        lower(model)
    elif lower_explicit is not None:
        lower_explicit(model)
    PassManager([get_pass("EliminateDeadCode")()]).run(model)
    return ir.serde.serialize_model(model)


def target_lowering(target, output_format: str | None = None) -> Lowering:
    """The lowering that :func:`qgraph.ptq.quantize` runs for ``target`` (a :class:`qgraph.targets.Target`), or for
    the same target writing ``output_format`` (QOperator or explicit QDQ)."""
    from qgraph.passes.infrastructure import PassManager
    from qgraph.targets import get_target

    if output_format is not None and output_format != target.options.format:
        target = get_target(target.name, dataclasses.replace(target.options, format=output_format))

    def lower(model: ir.Model) -> None:
        PassManager(target.lowering_pipeline(), fixed_point=True).run(model)

    return lower


# ----------------------------------------------------------------------------------------------- choosing
def _geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(value) for value in values) / len(values))


def _speedups(table: LatencyTable, name: str, reference: str) -> dict[int, float]:
    """Fast-quartile speed-up of ``name`` over ``reference`` per batch size (see :mod:`qgraph.latency`)."""
    return {size: table.speedup(name, size, reference=reference).fast_quartile for size in table.batch_sizes}


def _clearly_faster(table: LatencyTable, name: str, than: str, margin: float) -> bool:
    """``name`` beats ``than`` beyond the noise: its fast-quartile speed-up is at least 1 at every batch size and
    ``1 + margin`` in geometric mean, and it won at least three rounds in four (the paired ratios' lower quartile is
    at least 1) at every batch size, so that timing noise on a model of microseconds does not flip the choice."""
    gains = _speedups(table, name, than)
    if min(gains.values()) < 1.0 or _geometric_mean(list(gains.values())) < 1 + margin:
        return False
    return all(table.speedup(name, size, reference=than).low >= 1.0 for size in table.batch_sizes)


def _selected_integer_regions(model: ir.Model, classes: Mapping[str, frozenset[str]],
                               limit: int) -> tuple[dict[str, frozenset[str]], frozenset[str]]:
    """The connected integer regions to try FP32 one by one (none when the model has only one: that is the FP32
    model), the smallest first, at most ``limit``, leaving out those equal to a region class; and every node of
    every integer region (a set of float nodes covering it is the FP32 model)."""
    found = find_integer_regions(model)
    every = frozenset().union(*found.values()) if found else frozenset()
    if len(found) < 2 or limit == 0:
        return {}, every
    known = set(classes.values())
    ordered = sorted((name for name in found if found[name] not in known), key=lambda name: len(found[name]))
    return {name: found[name] for name in ordered[:limit]}, every


@dataclasses.dataclass(frozen=True)
class Question:
    """What a table is asked about ``model`` against ``reference``: is its speed-up (``t_reference / t_model``) at
    least each of ``thresholds``; a ``challenger`` is asked whether it is clearly faster (:func:`_clearly_faster`:
    it must also win three rounds in four)."""

    model: str
    reference: str
    thresholds: tuple[float, ...] = ()
    challenger: bool = False
    #: A question that makes this one moot once it is settled above all its thresholds.
    unless: Question | None = None


def _ratios(question: Question, times: Mapping[str, Sequence[float]]) -> np.ndarray:
    return np.asarray(times[question.reference], float) / np.asarray(times[question.model], float)


def settled(question: Question, times: Mapping[str, Sequence[float]], planned: int, band: float) -> bool:
    """Whether more rounds cannot change the answer to ``question``, from the run times so far.

    A threshold ``θ`` is settled when every round's paired ratio ``r_i`` lies beyond it by the factor ``1 + band``
    on one side (all ``r_i ≥ θ·(1 + band)`` or all ``r_i ≤ θ / (1 + band)``). A challenger is settled as well once
    it has lost more rounds (``r_i < 1``) than the ``planned`` rounds allow a lower quartile of at least 1 (at most
    ``⌊(planned − 1) / 4⌋``): it can no longer be clearly faster, whatever the other rounds give. A question with
    ``unless`` is settled once that one's every paired ratio is beyond all its thresholds by ``1 + band`` above."""
    if question.unless is not None and all(bool(np.all(_ratios(question.unless, times) >= threshold * (1 + band)))
                                           for threshold in question.unless.thresholds):
        return True
    if _lost_too_often(question, times, planned):
        return True
    ratios = _ratios(question, times)
    return all(bool(np.all(ratios >= threshold * (1 + band)) or np.all(ratios <= threshold / (1 + band)))
               for threshold in question.thresholds)


def _lost_too_often(question: Question, times: Mapping[str, Sequence[float]], planned: int) -> bool:
    """A challenger that lost more rounds than ``planned`` rounds allow a lower quartile of at least 1."""
    return question.challenger and int(np.sum(_ratios(question, times) < 1.0)) > (planned - 1) // 4


def stopping_rule(questions: Sequence[Question], band: float, minimum_rounds: int,
                  first_questions: Sequence[Question] = (), first_batch_size: int | None = None) -> StoppingRule:
    """A :data:`qgraph.latency.StoppingRule`: the rounds of a batch size end once at least ``minimum_rounds`` ran and
    every one of ``questions`` is :func:`settled` (and at ``first_batch_size`` every one of ``first_questions``).

    A challenger that lost too often at one batch size cannot be clearly faster (that needs every batch size): it
    stays settled at the batch sizes measured after it (with ``largest_first``, the costly rounds of the largest
    batch size spare the many cheap ones of batch 1)."""
    beaten: set[Question] = set()

    def stop(batch_size: int, times: Mapping[str, Sequence[float]], planned: int) -> bool:
        beaten.update(question for question in questions if _lost_too_often(question, times, planned))
        if min(len(values) for values in times.values()) < minimum_rounds:
            return False
        asked = [*questions, *(first_questions if batch_size == first_batch_size else ())]
        return all(question in beaten or settled(question, times, planned, band) for question in asked)

    return stop


def _pooled_speedups(tables: Sequence[LatencyTable], name: str) -> dict[int, float]:
    """Fast-quartile speed-up of ``name`` over FP32 per batch size over the runs of every table that timed both (the
    rounds of each table pair them; a load that came and went in one table leaves the faster runs of the other)."""
    both = [table for table in tables if FLOAT in table.models and name in table.models]
    speedups = {}
    for size in both[-1].batch_sizes:
        reference = [seconds for table in both for seconds in table.samples[size][FLOAT]]
        model = [seconds for table in both for seconds in table.samples[size][name]]
        speedups[size] = float(np.percentile(reference, 25) / np.percentile(model, 25))
    return speedups


def _harmless_questions(best: str, trials: Sequence[str], confirm_band: float) -> list[Question]:
    """The first batch size's questions of a trial table beyond the challengers': is each trial at least as fast as
    ``best`` (the rescue's test), asked only while ``best`` is not settled at ``1 + confirm_band`` over FP32 or
    more (a best that fast leaves no rescue to run); see :func:`stopping_rule`."""
    fast = Question(best, FLOAT, (1 + confirm_band,))
    return [Question(name, best, (1.0,), unless=fast) for name in trials]


def choose_speed(
    float_model: onnx.ModelProto,
    qdq_model: onnx.ModelProto,
    lower: Lowering | None,
    options: SpeedChoiceOptions | None = None,
    *,
    measure: Measure | None = None,
    feeds: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    lower_explicit: Lowering | None = None,
) -> SpeedChoice:
    """Measure the candidates built from ``qdq_model`` against ``float_model`` and return the fastest one that is
    not slower than FP32 (the FP32 model itself when none is, with a warning), with the measurements and the reason.

    ``lower`` is the target's lowering (:func:`target_lowering`; None when only QDQ is tried), ``lower_explicit``
    what the target rewrites in explicit QDQ (``target_lowering(target, QDQ)``; None: nothing). ``measure`` times a
    set of named models (by default :func:`qgraph.latency.measure_latency`, with one session pool for all tables and
    each table's :func:`stopping_rule`; a given ``measure`` runs without either); ``feeds`` (batch size -> inputs,
    for every batch size of the latency options) replaces its seeded random inputs: real data where random shapes
    cannot tell a symbolic length from the batch."""
    options = options or SpeedChoiceOptions()
    pool = SessionPool() if measure is None else None
    # found after the lead, and only when it was not decisive (the lead's candidate keeps no region FP32)
    regions: dict[str, frozenset[str]] = {}
    integer_regions: dict[str, frozenset[str]] = {}
    every_integer_node: frozenset[str] = frozenset()
    built: dict[str, onnx.ModelProto] = {FLOAT: float_model}
    nodes_of: dict[str, frozenset[str]] = {FLOAT: frozenset()}
    candidates: dict[str, Candidate] = {FLOAT: Candidate(FLOAT)}

    def add(candidate: Candidate) -> str:
        float_nodes = frozenset().union(*(regions[name] for name in candidate.float_classes))
        if candidate.name not in built:
            built[candidate.name] = build_candidate(qdq_model, candidate.format, float_nodes, lower, lower_explicit)
            nodes_of[candidate.name] = float_nodes
            candidates[candidate.name] = candidate
        return candidate.name

    def measured(names: Sequence[str], questions: Sequence[Question] | None = None,
                 first_questions: Sequence[Question] = (), minimum_rounds: int | None = None) -> LatencyTable:
        """One table of ``names``; with ``questions``, its rounds end once they are settled (see
        :func:`stopping_rule`; ``first_questions`` count at the first batch size only), after at least
        ``minimum_rounds`` (default ``options.settle_rounds``)."""
        chosen = {name: built[name] for name in names}
        reference = FLOAT if FLOAT in chosen else names[0]
        if measure is None:
            stop = None
            if questions is not None and options.settle_band is not None:
                stop = stopping_rule(questions, options.settle_band, minimum_rounds or options.settle_rounds,
                                     first_questions, options.latency.batch_sizes[0])
            latency = dataclasses.replace(options.latency, largest_first=stop is not None)
            table = measure_latency(chosen, latency, reference=reference, feeds=feeds, stop=stop, pool=pool)
        elif feeds is None:
            table = measure(chosen, options.latency, reference=reference)
        else:
            table = measure(chosen, options.latency, reference=reference, feeds=feeds)
        tables.append(table)
        return table

    near = (1 - options.tolerance, 1 + options.confirm_band)  # the speed-ups over FP32 the verdict turns on
    clear = (1.0, 1 + options.margin)  # what a challenger must beat (_clearly_faster)

    def ratios(values: Mapping[int, float]) -> str:
        return "/".join(f"{value:.2f}×" for value in values.values())

    tables: list[LatencyTable] = []
    formats = [Candidate(output_format).name for output_format in options.formats]  # each built when first timed
    best = add(Candidate(options.formats[0]))  # the first format (the target's lowering) unless another is faster
    table: LatencyTable | None = None
    decided = False
    if options.decisive_speedup is not None:
        # the lead: the target's lowering against FP32 alone, settled after two rounds unless near 1x. The decisive
        # threshold is not one to settle: a lead that noise put past it only spares the other candidates (the model
        # is still about that much faster), one that noise put below it runs the search; settling it cost ResNet-18
        # (2.2-2.8x at batch 1) up to 2.5 s of rounds on a busy machine
        table = measured([FLOAT, best], [Question(best, FLOAT, near)], minimum_rounds=2)
        lead = _speedups(table, best, FLOAT)
        decided = min(lead.values()) >= options.decisive_speedup
    if not decided:
        graph_model = ir.serde.deserialize_model(qdq_model)
        regions = find_regions(graph_model, small_matmul_weights=options.small_matmul_weights)
        integer_regions, every_integer_node = _selected_integer_regions(
            graph_model, {name: regions[name] for name in options.region_classes if regions[name]},
            options.max_regions)
        regions.update(integer_regions)
    trial_classes = [name for name in options.region_classes if regions.get(name)] + list(integer_regions)
    # the formats' speed-ups over FP32 matter here only when no trial table follows (it times FP32 beside the best
    # format and gives the verdict): FP32, the slowest model and on ResNet-18 half of this table's time, is timed
    # here only then; one format and a trial table to follow leave nothing to compare here, nor does one format
    # without trials once the lead table timed it against FP32
    if not decided and (len(formats) > 1 or (not trial_classes and table is None)):
        for output_format in options.formats[1:]:
            add(Candidate(output_format))
        table = measured([*([] if trial_classes else [FLOAT]), *formats],
                         [Question(name, formats[0], clear, challenger=True) for name in formats[1:]]
                         + ([] if trial_classes else [Question(name, FLOAT, near) for name in formats]))
        for name in formats[1:]:
            if _clearly_faster(table, name, best, options.margin):
                best = name
    reasons = ([f"{best} at {ratios(lead)} FP32, past the decisive {options.decisive_speedup:g}×: no other "
                f"candidate timed"] if decided else [f"{best} fastest of {', '.join(formats)}"])
    taken: list[str] = []
    harmless: list[str] = []  # trials that did not make the model slower at batch 1 (the first batch size)
    if trial_classes and not decided:
        base_format = candidates[best].format
        trials = {name: add(Candidate(base_format, (name,))) for name in trial_classes}
        # whether a trial is harmless at the first batch size matters only for a rescue, when the best so far may
        # be slower than FP32; that is asked unless the best is settled well above it
        table = measured([FLOAT, best, *trials.values()],
                         [Question(best, FLOAT, near), *(Question(name, best, clear, challenger=True)
                                                         for name in trials.values())],
                         _harmless_questions(best, list(trials.values()), options.confirm_band))
        for region, name in trials.items():
            gains = _speedups(table, name, best)
            accepted = _clearly_faster(table, name, best, options.margin)
            reasons.append(f"fp32 {region} ({len(regions[region])} nodes): {ratios(gains)} vs {best}"
                           f"{' taken' if accepted else ''}")
            if accepted:
                taken.append(region)
            if next(iter(gains.values())) >= 1.0:
                harmless.append(region)
        if len(taken) == 1:
            best = trials[taken[0]]
        elif len(taken) > 1:
            combined = add(Candidate(base_format, tuple(taken)))
            singles = [trials[region] for region in taken]
            table = measured([FLOAT, best, *singles, combined],
                             [*(Question(name, FLOAT, near) for name in [*singles, combined]),
                              *(Question(combined, name, (1.0,)) for name in singles)])
            best = max([combined, *singles], key=lambda name: _geometric_mean(list(_speedups(table, name, FLOAT)
                                                                                    .values())))
            reasons.append(f"{best} fastest of the combinations")
        speedup = _speedups(table, best, FLOAT)
        rescue = tuple(dict.fromkeys([*candidates[best].float_classes, *harmless]))
        rescue_nodes = frozenset().union(*(regions[name] for name in rescue))
        if (min(speedup.values()) < 1 - options.tolerance and rescue != candidates[best].float_classes
                and not rescue_nodes >= every_integer_node):
            # still slower than FP32: keep FP32 every region whose integer form did not pay at batch 1
            rescued = add(Candidate(base_format, rescue))
            table = measured([FLOAT, best, rescued])
            reasons.append(f"{rescued} (every region not slower in FP32): {ratios(_speedups(table, rescued, FLOAT))}"
                           f" FP32")
            if min(_speedups(table, rescued, FLOAT).values()) >= min(_speedups(table, best, FLOAT).values()):
                best = rescued
    speedup = _speedups(table, best, FLOAT)
    if best != FLOAT and min(speedup.values()) < 1 + options.confirm_band:
        # near or below FP32: one more table of the two alone, and the verdict on every run of both so far
        measured([FLOAT, best])
        speedup = _pooled_speedups(tables, best)
        reasons.append(f"confirmed on {sum(FLOAT in each.models and best in each.models for each in tables)} "
                       f"tables: {best} {ratios(speedup)} FP32")
    sizes = "/".join(str(size) for size in speedup)
    region_counts = {name: len(nodes) for name, nodes in regions.items()}
    if min(speedup.values()) < 1 - options.tolerance:
        if not options.keep_float_when_slower:
            reasons.append(f"{best} runs at {ratios(speedup)} FP32: the fastest integer model is slower than FP32")
            logger.warning("speed choice: the fastest integer model (%s) runs at %s FP32 on this machine; %s",
                           best, ratios(speedup), "; ".join(reasons))
            return SpeedChoice(built[best], candidates[best], nodes_of[best], "; ".join(reasons), speedup,
                               tuple(tables), region_counts, slower_than_float=True)
        reasons.append(f"the fastest integer model, {best}, runs at {ratios(speedup)} FP32 (batch {sizes}): "
                       f"FP32 kept")
        logger.warning("speed choice: every integer model is slower than FP32 on this machine, the FP32 model is "
                       "written (--no-speed-choice writes the integer one): %s", "; ".join(reasons))
        return SpeedChoice(float_model, candidates[FLOAT], frozenset(), "; ".join(reasons),
                           {size: 1.0 for size in speedup}, tuple(tables), region_counts)
    reasons.append(f"{best}: {ratios(speedup)} FP32 at batch {sizes}")
    logger.info("speed choice: %s", "; ".join(reasons))
    return SpeedChoice(built[best], candidates[best], nodes_of[best], "; ".join(reasons), speedup, tuple(tables),
                       region_counts)
