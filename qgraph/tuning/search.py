"""The search: rounds of trial configurations, cheapest first, each round computed from what the earlier ones scored.

A *round* is a list of configurations that do not depend on one another; it is run in order and its outcome is the
trials up to and including the first that meets the bound (all of them when none does, or when searching for speed).
The next round depends on that outcome only, so the search visits the same configurations and chooses the same one
whether a round runs one trial after another in this process (stopping at the first that meets the bound) or all at
once on Ray workers (the later ones cancelled, or ignored, once an earlier one is known to meet it): the
cheapest-first order decides, never the order of completion.

The stages, in order of cost (each trial is one calibration and one evaluation; QAT trains):

1. ``method``: the calibration method, weights per channel: ``minmax``, ``percentile``, ``entropy``, ``mse``;
2. ``variant``: the best configuration so far with weights per tensor, with bias correction, with SmoothQuant
   α ∈ {0.5, 0.75} and with dynamic activations (the last three only where the model is made mostly of MatMul/Gemm
   layers with constant weights, the only layers they change: a CNN's convolutions would stay FP32 under dynamic
   activations);
3. ``fallback``: layers back to FP32 on the best configuration so far, in the order of the sensitivity analysis (the
   layer whose quantization alone hurts the output SQNR most goes first). With the ranked layers ``L₁ … Lₙ`` and
   ``k`` of them in FP32 the score is taken to improve with ``k``; the smallest ``k`` that meets the bound is found
   by a search of two points per round that splits ``(lo, hi)`` into thirds (``lo = 0`` misses, ``hi = n`` is the
   FP32 model and is never tried), and chosen even when a larger set, tried earlier, met the bound too. Run one
   after the other, the lower point is tried first and the higher only
   when the lower misses: about 1.5·log₃ n ≈ 0.95·log₂ n trials, what bisection costs; run in parallel, a round
   costs one trial's time, and log₃ n rounds;
4. ``qat``: the best configuration so far fine-tuned by QAT with distillation on the calibration data (the last
   resort; only where onnxruntime-training is installed).

Searching for speed (``--tune-for speed``) the rounds are run whole and the search goes on after the bound is met:
the variants of the first configuration that met it, then ``four_bit``: that configuration with the weights of the
``k`` least sensitive layers at 4 bits, the largest ``k`` that still meets the bound found by the same search of
two points per round (the higher point first). The fallback and QAT stages only run while nothing meets the bound.
Of all the trials that met it, the fastest in a side-by-side latency measurement is chosen.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Generator, Sequence

from qgraph.tuning.configuration import Trial, TrialConfiguration, TuningOptions

#: Calibration methods in the order the search tries them (cheapest first).
SEARCH_METHODS = ("minmax", "percentile", "entropy", "mse")
#: SmoothQuant strengths the variant stage tries.
SMOOTH_QUANT_ALPHAS = (0.5, 0.75)
#: Points of one round of the fallback and 4-bit searches (fixed, so that the search does not depend on the number
#: of workers).
POINTS_PER_ROUND = 2


@dataclasses.dataclass(frozen=True)
class Round:
    stage: str
    configurations: tuple[TrialConfiguration, ...]


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    #: MatMul/Gemm layers with constant weights are most of the model's (SmoothQuant and dynamic activations change
    #: them only).
    has_matmul: bool
    #: onnxruntime-training is installed (the QAT stage can run).
    can_train: bool


#: configuration -> (quantized layers most sensitive first, {layer: its weight initializer})
SensitivityOrder = Callable[[TrialConfiguration], tuple[tuple[str, ...], dict[str, str]]]
#: Yields rounds, is sent their outcomes, returns the configuration to choose when it is not the first that met the
#: bound (the fallback's smallest set of FP32 layers), else None.
Search = Generator[Round, Sequence[Trial], "TrialConfiguration | None"]


def split_points(low: int, high: int) -> list[int]:
    """Up to :data:`POINTS_PER_ROUND` distinct integers strictly inside ``(low, high)``, splitting it evenly."""
    points = {low + round((high - low) * part / (POINTS_PER_ROUND + 1)) for part in range(1, POINTS_PER_ROUND + 1)}
    return sorted(point for point in points if low < point < high)


def search_rounds(facts: ModelFacts, options: TuningOptions, fp32_score: float,
                  sensitivity_order: SensitivityOrder) -> Search:
    """The rounds of the search; each ``yield`` is sent the round's outcome (see the module docstring)."""
    tried: list[Trial] = []
    speed = options.tune_for == "speed"

    def met() -> Trial | None:
        return next((trial for trial in tried if trial.meets_bound), None)

    def best() -> TrialConfiguration:
        scored = [trial for trial in tried if not math.isnan(trial.score)] or tried
        return min(scored, key=lambda trial: options.drop(fp32_score, trial.score)).configuration

    def start() -> TrialConfiguration:
        first = met()
        return first.configuration if first is not None else best()

    tried += yield Round("method", tuple(TrialConfiguration(method=method) for method in SEARCH_METHODS))
    if met() is not None and not speed:
        return
    base = start()
    variants = [dataclasses.replace(base, per_channel=False), dataclasses.replace(base, bias_correction="on")]
    if facts.has_matmul:
        variants += [dataclasses.replace(base, smooth_quant=alpha) for alpha in SMOOTH_QUANT_ALPHAS]
        variants.append(dataclasses.replace(base, activations="dynamic"))
    tried += yield Round("variant", tuple(dataclasses.replace(variant, stage="variant") for variant in variants))
    if met() is None:
        base = best()
        order, _ = sensitivity_order(base)
        low, high, smallest = 0, len(order), None
        while high - low > 1:
            points = split_points(low, high)
            outcome = yield Round("fallback", tuple(
                dataclasses.replace(base, fp32_layers=order[:point], stage="fallback") for point in points))
            tried += outcome
            meeting = [index for index, trial in enumerate(outcome) if trial.meets_bound]
            if meeting:
                high, low = points[meeting[0]], points[meeting[0] - 1] if meeting[0] > 0 else low
                smallest = outcome[meeting[0]].configuration
            else:
                low = points[-1]
        if smallest is None and facts.can_train:
            tried += yield Round("qat", (dataclasses.replace(best(), qat=True, stage="qat"),))
        return smallest
    if not speed:
        return
    base = met().configuration
    order, weights = sensitivity_order(base)
    candidates = [weights[layer] for layer in reversed(order) if layer in weights]  # least sensitive first
    low, high = 0, len(candidates) + 1  # k = 0 meets (it is ``base``); k = n is tried as a point
    while high - low > 1:
        points = sorted(split_points(low, high), reverse=True)  # the larger k first: the first that meets is the best
        outcome = yield Round("four_bit", tuple(
            dataclasses.replace(base, four_bit_weights=tuple(candidates[:point]), stage="four_bit")
            for point in points))
        tried += outcome
        meeting = [index for index, trial in enumerate(outcome) if trial.meets_bound]
        if meeting:
            low = points[meeting[0]]
            high = points[meeting[0] - 1] if meeting[0] > 0 else high
        else:
            high = points[-1] if len(outcome) == len(points) else low
