"""Outputs of a model on fixed batches against reference outputs, as one SQNR: the worst float output's.

For each float output ``o``, the signal ``S_o = Σ y²`` and the noise ``N_o = Σ (y − ŷ)²`` are summed over every
batch (noise +inf where ``ŷ`` is not finite); the output SQNR is ``min_o 10·log10(S_o / N_o)``, and its noise ratios
``r_o = N_o / S_o`` are what the sensitivity search adds up (see :mod:`qgraph.sensitivity`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from qgraph import runtime
from qgraph.quant.numerics import power_ratio_db

logger = logging.getLogger(__name__)

_FLOAT_OUTPUT_TYPES = frozenset({"tensor(float)", "tensor(double)", "tensor(float16)"})


class OutputComparison:
    """Float outputs of a session on fixed batches, compared with reference outputs as one SQNR (worst output).

    ``output_names`` are the float outputs of the model (by default all; a switchable model's probes excluded).
    """

    def __init__(self, proto: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]], *,
                 threads: int | None = None, extra_feeds: Mapping[str, np.ndarray] | None = None,
                 output_names: Sequence[str] | None = None, optimize: bool = False) -> None:
        self.session = runtime.create_session(proto, threads=threads, optimize=optimize)
        self.output_names = list(output_names) if output_names is not None else [
            output.name for output in self.session.get_outputs() if output.type in _FLOAT_OUTPUT_TYPES]
        names = [model_input.name for model_input in self.session.get_inputs()]
        self.feeds = [{name: batch[name] for name in names if name in batch} for batch in batches]
        self.extra_feeds = dict(extra_feeds or {})

    def outputs(self, extra: Mapping[str, np.ndarray] | None = None) -> list[list[np.ndarray]]:
        return [self.session.run(self.output_names, {**feeds, **self.extra_feeds, **(extra or {})})
                for feeds in self.feeds]

    def run(self, feeds: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray] | None = None,
            also: Sequence[str] = ()) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The float outputs and the outputs ``also`` of one run on ``feeds``."""
        values = self.session.run([*self.output_names, *also], {**feeds, **self.extra_feeds, **(extra or {})})
        return values[:len(self.output_names)], values[len(self.output_names):]

    def sqnr(self, reference: list[list[np.ndarray]], extra: Mapping[str, np.ndarray] | None = None) -> float:
        return output_sqnr(reference, self.outputs(extra))


def optimized_comparison(proto, batches: Sequence[Mapping[str, np.ndarray]], threads: int | None,
                         output_names: Sequence[str] | None = None) -> OutputComparison:
    """An :class:`OutputComparison` on an optimised session, or an unoptimised one where onnxruntime's optimiser
    refuses the graph (initializers named alike in If branches): the same outputs, a little slower."""
    try:
        return OutputComparison(proto, batches, threads=threads, output_names=output_names, optimize=True)
    except Exception as error:  # noqa: BLE001 - the unoptimised session measures the same thing
        logger.debug("optimised session refused (%s); running it unoptimised", error)
        return OutputComparison(proto, batches, threads=threads, output_names=output_names)


def output_sqnr(reference: list[list[np.ndarray]], approximation: list[list[np.ndarray]]) -> float:
    """The worst float output's SQNR (dB), each output's signal and noise summed over all batches."""
    if not reference or not reference[0]:
        return float("inf")
    signal, noise = _signal_and_noise(reference, approximation)
    values = [power_ratio_db(s, n) for s, n in zip(signal, noise)]
    return min(values)


def _signal_and_noise(reference: list[list[np.ndarray]],
                      approximation: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per output, ``Σ y²`` and ``Σ (y − ŷ)²`` over the batches (noise +inf where ŷ is not finite)."""
    signal = np.zeros(len(reference[0]))
    noise = np.zeros(len(reference[0]))
    for expected_batch, actual_batch in zip(reference, approximation):
        for index, (expected, actual) in enumerate(zip(expected_batch, actual_batch)):
            expected = np.asarray(expected, dtype=np.float64)
            error = expected - np.asarray(actual, dtype=np.float64)
            signal[index] += float(np.sum(np.square(expected)))
            noise[index] += float(np.sum(np.square(error))) if np.all(np.isfinite(error)) else float("inf")
    return signal, noise


def noise_ratios(reference: list[list[np.ndarray]], approximation: list[list[np.ndarray]]) -> np.ndarray:
    """Per output, the noise-to-signal ratio ``r_o`` (0 when both are 0, +inf for noise on a zero signal)."""
    signal, noise = _signal_and_noise(reference, approximation)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(noise == 0.0, 0.0, noise / signal)
    return np.where(np.isnan(ratios), np.inf, ratios)


def ratio_db(ratios: np.ndarray) -> float:
    """The output SQNR (dB) of per-output noise ratios: the worst output's."""
    worst = float(np.max(ratios)) if np.size(ratios) else 0.0
    if worst <= 0.0:
        return float("inf")
    if math.isinf(worst):
        return float("-inf")
    return -10.0 * math.log10(worst)
