"""``transformer_kernels="auto"`` (the default): the fast transformer kernels where they apply and hold against FP32.

The fast kernels (:data:`qgraph.targets.ort_cpu.FAST_TRANSFORMER_PASSES`: one com.microsoft QAttention per integer
self-attention block, FastGelu for an exact GELU whose output step covers the difference, residuals read in float)
ran BERT-base 1.15× faster than the exact lowering on onnxruntime 1.19.2 (docs/runtime-facts.md) at the same or a
better accuracy to FP32; what they give up is deploy parity, the lowered model following the QDQ simulation within
one quantization step. After PTQ, which fits nothing to that simulation, auto takes them where the decision can be
checked on the spot:

1. the target offers them (ort-cpu, QOperator, 8-bit weights) and the fast passes change the lowered model: a
   QAttention or a FastGelu is written (the float-read bypass alone is no transformer kernel);
2. against the FP32 model's outputs on the retained calibration batches (the reference the sensitivity search
   measured the QDQ simulation against, returned by calibration's probe runs), the fast model's output SQNR
   ``S_fast`` (dB, worst float output, :mod:`qgraph.output_comparison`) is within ``TOLERANCE_DB`` of the
   simulation's ``S_sim`` and meets the search's bound::

       S_fast >= S_sim - TOLERANCE_DB   and   S_fast >= min_sqnr

Otherwise the exact lowering stays, and the log says why. With no FP32 reference (the search off: ``--min-sqnr
off``) auto keeps the exact kernels, as it does after QAT, whose fine-tuning fitted the weights to the simulation
(:mod:`qgraph.qat.export` lowers with the exact kernels unless ``fast`` is asked for).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qgraph.output_comparison import optimized_comparison
from qgraph.passes.infrastructure import PassRecord
from qgraph.targets import Target, get_target

logger = logging.getLogger(__name__)

#: How much lower than the QDQ simulation's output SQNR the fast kernels' may be (dB).
TOLERANCE_DB = 0.5
#: The fast passes whose changes make a model one with transformer kernels.
KERNEL_PASSES = frozenset({"LowerQuantizedAttention", "LowerFastGelu"})
#: Why auto keeps the exact kernels of a model that has nothing for the fast ones.
NOTHING_TO_FUSE = "no attention block or GELU for the fast kernels"
#: Operators one of :data:`KERNEL_PASSES` needs (an attention's Softmax, an exact GELU): a model without any is not
#: copied and lowered again to find that out (ResNet-18: 0.2 s).
KERNEL_OPERATORS = frozenset({"Softmax", "Erf", "Gelu"})


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """What auto chose: ``fast`` or ``exact``, why, and the fast model's output SQNR when it was measured."""

    kernels: str
    reason: str
    output_sqnr_db: float | None = None


def fast_kernel_target(target: Target) -> Target | None:
    """``target`` with the fast transformer kernels, when its option is auto and it offers them; else None."""
    options = target.options
    if options.transformer_kernels != "auto" or options.weight_bits != 8:
        return None
    fast = get_target(target.name, dataclasses.replace(options, transformer_kernels="fast"))
    if len(fast.lowering_passes()) <= len(target.lowering_passes()):  # auto lowers exactly
        return None  # the target (or its format) has no fast kernels
    return fast


def try_fast_kernels(
    lowered: ir.Model,
    fast_target: Target,
    lower: Callable[[ir.Model, Target], Sequence[PassRecord]],
    batches: Sequence[Mapping[str, np.ndarray]],
    reference: Sequence[Mapping[str, np.ndarray]],
    simulated_sqnr_db: float | None,
    min_sqnr_db: float | None,
    threads: int | None = None,
) -> tuple[ir.Model, tuple[PassRecord, ...], KernelChoice]:
    """The exactly ``lowered`` model lowered on by ``fast_target`` (a copy, through ``lower``), when the fast kernels
    apply and hold (see the module docstring); else ``lowered`` itself, no records, and the reason.

    ``reference`` holds the FP32 model's outputs (name -> array) on the first of ``batches``.
    """
    if not any(node.op_type in KERNEL_OPERATORS for node in lowered.graph):
        return lowered, (), KernelChoice("exact", NOTHING_TO_FUSE)
    if simulated_sqnr_db is None or not reference:
        return lowered, (), KernelChoice("exact", "no FP32 reference to check the fast kernels against")
    candidate = ir.serde.deserialize_model(ir.serde.serialize_model(lowered))
    records = tuple(lower(candidate, fast_target))
    applied = sorted({record.name for record in records if record.modified} & KERNEL_PASSES)
    if not applied:
        return lowered, (), KernelChoice("exact", NOTHING_TO_FUSE)
    names = [value.name for value in candidate.graph.outputs
             if all(value.name in outputs for outputs in reference)]
    count = min(len(batches), len(reference))
    if not names or count == 0:
        return lowered, (), KernelChoice("exact", "the FP32 reference lacks the model's outputs")
    comparison = optimized_comparison(ir.serde.serialize_model(candidate), list(batches[:count]), threads, names)
    measured = comparison.sqnr([[np.asarray(outputs[name]) for name in names] for outputs in reference[:count]])
    floor = simulated_sqnr_db - TOLERANCE_DB
    if min_sqnr_db is not None:
        floor = max(floor, min_sqnr_db) if simulated_sqnr_db >= min_sqnr_db else floor
    if measured < floor:
        reason = (f"exact kernels kept: the fast ones ({', '.join(applied)}) gave output SQNR {measured:.1f} dB, "
                  f"below {floor:.1f} dB (the QDQ simulation's {simulated_sqnr_db:.1f} dB)")
        logger.info("transformer kernels: %s", reason)
        return lowered, (), KernelChoice("exact", reason, measured)
    reason = (f"fast ({', '.join(applied)}): output SQNR {measured:.1f} dB against the QDQ simulation's "
              f"{simulated_sqnr_db:.1f} dB")
    logger.info("transformer kernels: %s", reason)
    return candidate, records, KernelChoice("fast", reason, measured)
