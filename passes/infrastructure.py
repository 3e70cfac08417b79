"""The pass library's infrastructure: phases, the pass base classes, the registry, the pass manager and its verifier.

**Phases.** load ─▶ CANONICALIZE ─▶ ANNOTATE ─▶ (calibrate) ─▶ QUANTIZE ─▶ (QAT) ─▶ LOWER ─▶ save. A pass declares its
phase; the pass manager refuses a pipeline in which a pass comes after a pass of a later phase, rather than guessing
an order. Phases may repeat (a canonicalisation group is run to a fixed point) but never go backwards.

**Passes.** A :class:`QGraphPass` is an onnx-ir ``InPlacePass`` that declares its :class:`Phase` and a one-line
summary. A :class:`RewritePass` is a local rewrite written as three steps over every node of every graph (main graph,
If/Loop/Scan bodies, functions), visited once per run in graph order:

- ``match(node, context)`` returns the matched nodes/values (any object) or ``None`` when the pattern does not start
  at ``node`` (silently: most nodes are not candidates);
- ``check(match, context)`` decides whether the rewrite is legal and returns either the *plan* — any object carrying
  what the decision computed (the quantization parameters read, the folded constants, the nodes to replace; often a
  frozen dataclass; by default the match itself) — or a :class:`Refusal` with the sentence saying why not, which is
  logged (INFO, logger ``qgraph.passes.infrastructure``) and leaves the graph as it is;
- ``rewrite(plan, context)`` receives exactly the plan ``check`` returned and mutates the graph. It does not
  recompute what ``check`` computed, and ``check`` does not write into the match: whatever ``rewrite`` needs travels
  in the plan.

What the three steps may use besides the node is the :class:`RewriteContext`, created once per run: the model (its
opset imports, for instance) and a model-wide :class:`~qgraph.ir.naming.NameScope` for the names of
what the rewrites create. Nothing is stored on the pass instance while it runs (only the options of ``__init__``
live there), so one instance can run on any number of models, one after another, with the same result as fresh
instances. The ``modified`` flag of the result is true exactly when at least one rewrite ran.

**Registry.** Passes register by class name (``@register``), which the CLI lists and ``--passes NAME,...`` assembles
pipelines from. Importing :mod:`qgraph.passes` imports every pass module, so the registry is complete as soon as
anything of the pass library is imported.

**Pass manager.** Runs a sequence of passes with per-pass instrumentation and an optional verification mode.
Instrumentation records, for each pass run: wall time, node count before and after (main graph, subgraphs and
functions together) and the pass's ``modified`` flag. With ``verify=True`` the model is checked after every pass with
``onnx.checker`` (full check) and run in onnxruntime (graph optimisation disabled) on a seeded sample input; passes
of the CANONICALIZE phase must also keep every output within a tight tolerance of the unmodified model. A pass that
breaks the model raises :class:`PassVerificationError` naming the pass: that is a bug in qgraph, not a user mistake.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from qgraph import runtime
from qgraph.errors import PipelineError
from qgraph.ir.naming import NameScope
from qgraph.ir.traversal import iterate_graphs

logger = logging.getLogger(__name__)


# --- phases -----------------------------------------------------------------------------------------------------------

class Phase(enum.IntEnum):
    CANONICALIZE = 10
    ANNOTATE = 20
    QUANTIZE = 30
    LOWER = 40

    @property
    def label(self) -> str:
        return self.name.lower()


# --- pass base classes ------------------------------------------------------------------------------------------------

class QGraphPass(InPlacePass):
    """An in-place onnx-ir pass that knows its phase in qgraph's pipeline."""

    phase: ClassVar[Phase]
    summary: ClassVar[str] = ""

    @classmethod
    def pass_name(cls) -> str:
        return cls.__name__

    @classmethod
    def describe(cls) -> str:
        if cls.summary:
            return cls.summary
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else cls.__name__


@dataclasses.dataclass(frozen=True)
class Refusal:
    """What :meth:`RewritePass.check` returns when a match may not be rewritten: the reason, as a sentence."""

    reason: str


@dataclasses.dataclass(frozen=True)
class RewriteContext:
    """What the steps of a :class:`RewritePass` may use besides the node: one context per run, shared by its steps."""

    model: ir.Model

    @functools.cached_property
    def names(self) -> NameScope:
        """Model-unique names for what the rewrites create, remembered as they are handed out for the rest of the run.

        Made on first use (most lowerings never name anything, and scanning a model's names costs about as much as
        the whole run's matching), from the model as it is then: a name of a value an earlier rewrite of the run
        removed may be handed out again, which no reader can confuse.
        """
        return NameScope(self.model)


class RewritePass(QGraphPass):
    """A pass made of local match / check / rewrite steps applied to every node once per run."""

    @abc.abstractmethod
    def match(self, node: ir.Node, context: RewriteContext) -> Any | None:
        """The matched pieces around ``node``, or ``None`` when the pattern does not start here."""

    def check(self, match: Any, context: RewriteContext) -> Any:
        """The plan for rewriting ``match`` (what the decision computed), or a :class:`Refusal` saying why not."""
        return match

    @abc.abstractmethod
    def rewrite(self, plan: Any, context: RewriteContext) -> None:
        """Mutate the graph as ``plan``, returned by :meth:`check`, says."""

    def call(self, model: ir.Model) -> PassResult:
        context = RewriteContext(model)
        modified = False
        refused, first = 0, ""
        for graph in list(iterate_graphs(model)):
            for node in list(graph):
                if node.graph is None:  # removed by an earlier rewrite in this run
                    continue
                match = self.match(node, context)
                if match is None:
                    continue
                plan = self.check(match, context)
                if isinstance(plan, Refusal):
                    # one line per node at debug level (-vv); -v gets one line per pass (a BERT-base encoder has 144
                    # Adds whose operand is no constant: one line, not 144)
                    logger.debug("%s: leaving %s (%s): %s", self.pass_name(), node.name, node.op_type, plan.reason)
                    refused += 1
                    first = first or f"{node.name} ({node.op_type}): {plan.reason}"
                    continue
                if plan is None or isinstance(plan, str):
                    raise TypeError(
                        f"{self.pass_name()}.check returned {plan!r}; it returns a plan, or a Refusal with the reason"
                    )
                self.rewrite(plan, context)
                modified = True
        if refused:
            logger.info("%s: left %d match%s as %s, the first %s%s", self.pass_name(), refused,
                        "" if refused == 1 else "es", "it was" if refused == 1 else "they were", first,
                        "" if refused == 1 else " (-vv lists each)")
        return PassResult(model, modified)


# --- registry ---------------------------------------------------------------------------------------------------------

PassClass = TypeVar("PassClass", bound=type)

_PASSES: dict[str, type] = {}


def register(pass_class: PassClass) -> PassClass:
    """Class decorator: make a pass available by its class name."""
    name = pass_class.__name__
    if name in _PASSES and _PASSES[name] is not pass_class:
        raise ValueError(f"two passes are named {name}")
    _PASSES[name] = pass_class
    return pass_class


def available_passes() -> dict[str, type]:
    """Every registered pass by name, ordered by phase and then name."""
    return dict(sorted(_PASSES.items(), key=lambda item: (item[1].phase, item[0])))


def get_pass(name: str) -> type:
    passes = available_passes()
    if name not in passes:
        raise PipelineError(f"unknown pass {name!r}; `qgraph passes` lists the {len(passes)} available passes")
    return passes[name]


# --- pass manager and verifier ----------------------------------------------------------------------------------------

class PassVerificationError(RuntimeError):
    """A pass produced an invalid model or changed its outputs (a qgraph bug)."""


@dataclasses.dataclass(frozen=True)
class PassRecord:
    name: str
    phase: Phase
    seconds: float
    nodes_before: int
    nodes_after: int
    modified: bool


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    model: ir.Model
    modified: bool
    records: tuple[PassRecord, ...]


def count_nodes(model: ir.Model) -> int:
    return sum(1 for graph in iterate_graphs(model) for _ in graph)


def check_phase_order(passes: Sequence[QGraphPass]) -> None:
    """Refuse a pipeline in which a pass precedes a pass of an earlier phase."""
    latest: QGraphPass | None = None
    for current in passes:
        if not isinstance(current, QGraphPass):
            raise PipelineError(f"{type(current).__name__} is not a qgraph pass (it declares no phase)")
        if latest is not None and current.phase < latest.phase:
            raise PipelineError(
                f"pass {current.pass_name()} ({current.phase.label}) cannot run after "
                f"{latest.pass_name()} ({latest.phase.label}): phases only move forward"
            )
        latest = current


class _Verifier:
    """Checks a model after a pass against the reference outputs of the model as it entered the pipeline."""

    def __init__(self, model: ir.Model, *, rtol: float, atol: float, seed: int) -> None:
        self.rtol, self.atol = rtol, atol
        proto = ir.serde.serialize_model(model)
        session = runtime.create_session(proto)
        self.feeds = runtime.random_inputs(session, seed=seed)
        self.reference = runtime.run(session, self.feeds)

    def __call__(self, model: ir.Model, pass_name: str, phase: Phase) -> None:
        proto = ir.serde.serialize_model(model)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as error:
            raise PassVerificationError(f"after {pass_name}: onnx.checker rejects the model: {error}") from error
        try:
            outputs = runtime.run(runtime.create_session(proto), self.feeds)
        except Exception as error:
            raise PassVerificationError(f"after {pass_name}: onnxruntime cannot run the model: {error}") from error
        if phase != Phase.CANONICALIZE:
            return
        for name, expected in self.reference.items():
            if name not in outputs:
                raise PassVerificationError(f"after {pass_name}: output {name!r} disappeared")
            if not np.allclose(outputs[name], expected, rtol=self.rtol, atol=self.atol, equal_nan=True):
                difference = float(np.max(np.abs(outputs[name].astype(np.float64) - expected.astype(np.float64))))
                raise PassVerificationError(f"after {pass_name}: output {name!r} changed (max |diff| {difference:.3g})")


class PassManager:
    """Runs qgraph passes in order, optionally repeating to a fixed point, and records what each did."""

    def __init__(
        self,
        passes: Sequence[QGraphPass],
        *,
        fixed_point: bool = False,
        max_iterations: int = 8,
        verify: bool = False,
        verify_rtol: float = 1e-4,
        verify_atol: float = 1e-5,
        seed: int = 0,
    ) -> None:
        check_phase_order(passes)
        self.passes = tuple(passes)
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations
        self.verify = verify
        self.verify_rtol, self.verify_atol, self.seed = verify_rtol, verify_atol, seed

    def run(self, model: ir.Model) -> PipelineResult:
        verifier = (
            _Verifier(model, rtol=self.verify_rtol, atol=self.verify_atol, seed=self.seed) if self.verify else None
        )
        records: list[PassRecord] = []
        any_modified = False
        for _ in range(self.max_iterations if self.fixed_point else 1):
            round_modified = False
            for current in self.passes:
                before = count_nodes(model)
                start = time.perf_counter()
                result = current(model)
                seconds = time.perf_counter() - start
                model = result.model
                after = count_nodes(model)
                records.append(
                    PassRecord(current.pass_name(), current.phase, seconds, before, after, result.modified)
                )
                logger.debug(
                    "%s: %.3fs, nodes %d -> %d, modified=%s",
                    current.pass_name(), seconds, before, after, result.modified,
                )
                if verifier is not None and result.modified:
                    verifier(model, current.pass_name(), current.phase)
                round_modified = round_modified or result.modified
            any_modified = any_modified or round_modified
            if not round_modified:
                break
        else:
            if self.fixed_point:
                logger.warning("pipeline did not reach a fixed point in %d rounds", self.max_iterations)
        return PipelineResult(model, any_modified, tuple(records))
