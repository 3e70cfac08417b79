"""The range check: a range search's activation ranges measured at the model's output before they are written.

A histogram method (entropy, percentile, mse; :mod:`qgraph.calibrate.observers.histogram_ranges`) narrows each
activation's range by a criterion of that tensor alone. On a tensor with a sparse but important mode (a few large
values that the next layers amplify: outlier channels, a residual stream) KL divergence can choose a range that clips
the mode away, and the model's output is destroyed although every single choice looked optimal. The same histograms
hold each tensor's exact observed extremes, so the min-max ranges come for free; the check compares the two at the
output on the retained calibration batches and falls back where the method is clearly worse.

Rule
----
Let ``S(r)`` be the output SQNR (dB; the worst float output, :mod:`qgraph.output_comparison`) of the QDQ model with
activation ranges ``r`` against the FP32 model, weights quantized as they will be written, on the retained batches.

0. Screening, from the histograms alone: per tensor ``t``, ``E_method(t)`` and ``E_minmax(t)``, the expected
   squared fake-quantization error summed over the observed values with either range (rounding inside, clipping
   beyond). A tensor is *flagged* when ``E_method(t) > 2·E_minmax(t)`` (3 dB worse on the tensor itself, which only
   clipping a mode causes). With no tensor flagged the ranges are kept unmeasured (action "kept"): to first order
   the output noise is a gain-weighted sum of the tensors' noises, ``N = Σ_t g_t·E(t)``, so ``E_method ≤ 2·E_minmax``
   everywhere gives ``N_method ≤ 2·N_minmax``, i.e. ``S_method ≥ S_minmax − 3 dB``, what step 2 accepts.
1. ``S_method = S(method's ranges)``, ``S_minmax = S(extremes)``.
2. ``S_method ≥ S_minmax − margin`` (``margin`` = 3 dB: half the noise power of min-max at most): the method's ranges
   are kept (action "kept"). A user who chose the method may trade a little of this measurement for its expected
   generalisation; more than 3 dB is no longer a trade.
3. Otherwise the flagged tensors take their extremes, the others keep the method's range: ``S_per_tensor``. The
   ranges written are those of the larger of ``S_per_tensor`` (action "per-tensor") and ``S_minmax`` (action
   "minmax": every tensor its extremes), the per-tensor ranges on a tie. A scale group takes the union of its
   members' ranges again.

Every fallback is logged as a WARNING that names the method and the numbers, and the :class:`RangeCheck` goes into
the quantization report.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.calibrate.driver import (
    BatchAxes,
    CalibrationConfig,
    CalibrationResult,
    batch_samples,
    first_samples,
    merge_group_ranges,
)
from qgraph.calibrate.observers.histogram import METHODS as HISTOGRAM_METHODS
from qgraph.output_comparison import OutputComparison
from qgraph.passes.infrastructure import PassManager
from qgraph.passes.quantize.insert_quantize_dequantize import InsertQuantizeDequantize
from qgraph.quant.plan import QuantPlan
from qgraph.quant.spec import QuantParams

logger = logging.getLogger(__name__)

#: Output SQNR (dB) by which the method's ranges may trail min-max's before the check falls back.
DEFAULT_MARGIN_DB = 3.0
#: Calibration samples the check runs on (the first retained ones): a collapse costs tens of dB, far above the
#: spread of a 16-sample measurement, and the check must cost little beside the calibration itself.
DEFAULT_CHECK_SAMPLES = 16
#: A tensor takes its extremes when the method's range has this many times min-max's expected squared error on it.
TENSOR_ERROR_FACTOR = 2.0
KEPT, PER_TENSOR, MINMAX = "kept", "per-tensor", "minmax"

Ranges = Mapping[str, tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class RangeCheck:
    """What the range check measured and did (see the module docstring)."""

    method: str
    #: Calibration samples measured.
    samples: int
    margin_db: float
    #: Output SQNRs (dB) with the method's and with min-max ranges; None when the screening kept the ranges unmeasured.
    method_sqnr_db: float | None
    minmax_sqnr_db: float | None
    #: "kept" (the method's ranges), "per-tensor" (``tensors`` took min-max ranges) or "minmax" (every tensor).
    action: str
    #: Output SQNR with the flagged tensors at min-max ranges (None when the method's ranges were kept or no tensor
    #: was flagged).
    per_tensor_sqnr_db: float | None = None
    #: The tensors whose ranges were replaced by their min-max ranges ("minmax": every one the method narrowed).
    tensors: tuple[str, ...] = ()
    #: Tensors whose own expected error the method's range made more than ``TENSOR_ERROR_FACTOR`` times min-max's.
    flagged: int = 0

    @property
    def final_sqnr_db(self) -> float | None:
        if self.action == KEPT:
            return self.method_sqnr_db
        if self.action == PER_TENSOR and self.per_tensor_sqnr_db is not None:
            return self.per_tensor_sqnr_db
        return self.minmax_sqnr_db

    def describe(self) -> str:
        if self.method_sqnr_db is None or self.minmax_sqnr_db is None:
            return (f"no tensor's {self.method} range has more than {TENSOR_ERROR_FACTOR:g}× the expected "
                    f"quantization error of its min-max range: the {self.method} ranges are kept unmeasured")
        measured = (f"output SQNR {self.method_sqnr_db:.1f} dB with the {self.method} ranges, "
                    f"{self.minmax_sqnr_db:.1f} dB with min-max ranges on {self.samples} calibration samples")
        if self.action == KEPT:
            return f"{measured}: the {self.method} ranges are kept"
        worse = f"{measured} (more than {self.margin_db:g} dB worse)"
        if self.action == PER_TENSOR:
            return (f"{worse}: {len(self.tensors)} tensor(s) whose {self.method} range clips too much take their "
                    f"min-max range, output SQNR {self.per_tensor_sqnr_db:.1f} dB: {_listed(self.tensors)}")
        tried = ("" if self.per_tensor_sqnr_db is None else
                 f" (min-max on the {self.flagged} worst tensor(s) only: {self.per_tensor_sqnr_db:.1f} dB)")
        return f"{worse}: every tensor takes its min-max range{tried}"

    def to_markdown(self) -> list[str]:
        if self.method_sqnr_db is None or self.minmax_sqnr_db is None:
            return [f"## Range check ({self.method})", "", f"{self.describe()[0].upper()}{self.describe()[1:]}."]
        lines = [f"## Range check ({self.method})", "",
                 "| ranges | output SQNR (dB) |", "| --- | ---: |",
                 f"| {self.method} | {self.method_sqnr_db:.1f} |", f"| min-max | {self.minmax_sqnr_db:.1f} |"]
        if self.per_tensor_sqnr_db is not None:
            lines.append(f"| {self.method}, min-max on {self.flagged} tensor(s) | {self.per_tensor_sqnr_db:.1f} |")
        lines += ["", f"Written: {self.action}. {self.describe()[0].upper()}{self.describe()[1:]}."]
        return lines


def range_check_applies(plan: QuantPlan, config: CalibrationConfig) -> bool:
    """Whether calibration will give the check something to check: a histogram method on some activation."""
    if not config.range_check:
        return False
    methods = {config.method, *(plan.activation_methods.get(tensor, config.method) for tensor in plan.activations)}
    return bool(methods & set(HISTOGRAM_METHODS))


def check_ranges(
    model: ir.Model,
    plan: QuantPlan,
    calibration: CalibrationResult,
    batches: Sequence[Mapping[str, np.ndarray]],
    parameters: Mapping[str, QuantParams],
    *,
    method: str,
    threads: int | None = None,
    margin_db: float = DEFAULT_MARGIN_DB,
    samples: int = DEFAULT_CHECK_SAMPLES,
    batch_axes: BatchAxes | None = None,
) -> tuple[CalibrationResult, RangeCheck | None]:
    """The calibration with the ranges the rule above writes, and what it measured (None: nothing to check).

    ``parameters`` are the plan's quantization parameters from ``calibration`` (weights included: they stay, each
    measurement replaces the activations' from the ranges it tries); the
    first ``samples`` of ``batches`` (samples along ``batch_axes``) are measured, through optimised sessions (the
    float reference and the integer kernels that the QDQ candidates lower to in onnxruntime, as deployed);
    ``model`` is left as it is."""
    extremes = calibration.extremes
    narrowed = [tensor for tensor, bounds in extremes.items()
                if tensor in calibration.ranges and not _covers(calibration.ranges[tensor], bounds)]
    batches = _first(batches, samples, batch_axes)
    if not batches or not narrowed:
        return calibration, None
    errors = calibration.range_errors
    flagged = tuple(tensor for tensor in narrowed
                    if tensor in errors and errors[tensor][0] > TENSOR_ERROR_FACTOR * errors[tensor][1])
    if not flagged:
        check = RangeCheck(method=method, samples=0, margin_db=margin_db, method_sqnr_db=None, minmax_sqnr_db=None,
                           action=KEPT)
        logger.info("range check: %s", check.describe())
        return calibration, check
    proto = ir.serde.serialize_model(model)
    reference = OutputComparison(proto, batches, threads=threads, optimize=True).outputs()

    def measure(ranges: Ranges) -> float:
        candidate = {**parameters, **plan.activation_parameters(ranges)}
        return OutputComparison(_qdq_model(proto, plan, candidate), batches, threads=threads,
                                optimize=True).sqnr(reference)

    minmax_ranges = merge_group_ranges({**calibration.ranges, **extremes}, plan)
    method_sqnr, minmax_sqnr = measure(calibration.ranges), measure(minmax_ranges)
    measured = sum(batch_samples(batch, batch_axes) for batch in batches)
    common = dict(method=method, samples=measured, margin_db=margin_db, method_sqnr_db=method_sqnr,
                  minmax_sqnr_db=minmax_sqnr, flagged=len(flagged))
    if not method_sqnr < minmax_sqnr - margin_db:
        check = RangeCheck(action=KEPT, **common)
        logger.info("range check: %s", check.describe())
        return calibration, check
    per_tensor_sqnr, per_tensor_ranges = None, minmax_ranges
    if len(flagged) < len(narrowed):
        per_tensor_ranges = merge_group_ranges(
            {**calibration.ranges, **{tensor: extremes[tensor] for tensor in flagged}}, plan)
        per_tensor_sqnr = measure(per_tensor_ranges)
    if per_tensor_sqnr is not None and per_tensor_sqnr >= minmax_sqnr:
        check = RangeCheck(action=PER_TENSOR, per_tensor_sqnr_db=per_tensor_sqnr, tensors=flagged, **common)
        ranges = per_tensor_ranges
    else:
        check = RangeCheck(action=MINMAX, per_tensor_sqnr_db=per_tensor_sqnr, tensors=tuple(narrowed), **common)
        ranges = minmax_ranges
    logger.warning("calibration method %s: %s", method, check.describe())
    return dataclasses.replace(calibration, ranges=ranges), check


def _first(batches: Sequence[Mapping[str, np.ndarray]], samples: int,
           batch_axes: BatchAxes | None) -> list[Mapping[str, np.ndarray]]:
    """The batches that hold the first ``samples`` samples, the last one cut."""
    kept: list[Mapping[str, np.ndarray]] = []
    count = 0
    for batch in batches:
        if count >= samples:
            break
        size = batch_samples(batch, batch_axes)
        kept.append(batch if count + size <= samples else first_samples(batch, samples - count, batch_axes))
        count += size
    return kept


def _covers(bounds: tuple[float, float], extremes: tuple[float, float]) -> bool:
    """Whether ``bounds`` hold the whole observed interval, both as quantization sees them (with zero)."""
    return min(bounds[0], 0.0) <= min(extremes[0], 0.0) and max(bounds[1], 0.0) >= max(extremes[1], 0.0)


def _qdq_model(proto: onnx.ModelProto, plan: QuantPlan, parameters: Mapping[str, QuantParams]) -> onnx.ModelProto:
    candidate = ir.serde.deserialize_model(proto)
    PassManager([InsertQuantizeDequantize(plan=plan, parameters=parameters)]).run(candidate)
    return ir.serde.serialize_model(candidate)


def _listed(tensors: Sequence[str], shown: int = 8) -> str:
    return ", ".join(tensors[:shown]) + (f" and {len(tensors) - shown} more" if len(tensors) > shown else "")
