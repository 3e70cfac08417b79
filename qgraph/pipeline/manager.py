"""Runs a sequence of qgraph passes with per-pass instrumentation and an optional verification mode.

Instrumentation records, for each pass run: wall time, node count before and after (main graph, subgraphs and
functions together) and the pass's ``modified`` flag. With ``verify=True`` the model is checked after every pass
with ``onnx.checker`` (full check) and run in onnxruntime (graph optimisation disabled) on a seeded sample input;
passes of the CANONICALIZE phase must also keep every output within a tight tolerance of the unmodified model. A
pass that breaks the model raises :class:`PassVerificationError` naming the pass: that is a bug in qgraph, not a
user mistake.

Phases may repeat (a canonicalisation group is run to a fixed point) but never go backwards.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from qgraph import runtime
from qgraph.errors import PipelineError
from qgraph.passes.base import QGraphPass, iterate_graphs
from qgraph.pipeline.phases import Phase

logger = logging.getLogger(__name__)


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
        for iteration in range(self.max_iterations if self.fixed_point else 1):
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
                    "%s: %.3fs, nodes %d -> %d, modified=%s", current.pass_name(), seconds, before, after, result.modified
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
