"""Accuracy-driven tuning: the user's own metric chooses the quantization, cheapest configuration first.

``evaluate(path) -> float`` scores a model file (on the command line, ``--eval "CMD {model}"``: a program whose last
line of output is the score). The FP32 model is scored first, giving ``s₃₂``; a trial with score ``s`` meets the
bound ``--max-drop d`` when ``s₃₂ − s ≤ d`` (higher is better) or ``s − s₃₂ ≤ d`` (lower is better).

The search, in order of cost, stops at the first configuration that meets the bound:

1. the calibration method, weights per channel: ``minmax``, ``percentile``, ``entropy``, ``mse``;
2. the best of those with weights per tensor;
3. layers back to FP32 on the best configuration so far, in the order of the sensitivity analysis (the layer whose
   quantization alone hurts the output SQNR most goes first). With the ranked layers ``L₁ … Lₙ`` and ``k`` of them
   in FP32, the score is taken to improve with ``k``; the smallest ``k`` that meets the bound is found by bisection
   between ``lo = 0`` (known to miss) and ``hi = n`` (everything FP32, the FP32 model itself, never tried):
   about ``log₂ n`` trials, not ``n``.

Every trial runs without the automatic SQNR fallback (the metric decides what goes back to FP32), is written to a
work folder, scored, and its latency (median batch-1 run time at full optimisation) and size recorded. The budget
(``--tune-budget``) bounds the number of trials. The chosen trial (or, when none meets the bound, the best-scoring
one) is copied to the output, with its configuration as a TOML recipe next to it (``OUT`` with suffix ``.toml``) that
``--config`` replays exactly (see :mod:`qgraph.annotate.config_file`), and every trial as JSON
(``OUT`` with suffix ``.trials.json``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import onnx_ir as ir

from qgraph.errors import OutputPathError, QGraphError
from qgraph.pipeline import OptimizeOptions, OptimizeResult, calibration_batches, optimize
from qgraph.ptq import QuantizeOptions

logger = logging.getLogger(__name__)

#: Calibration methods in the order the search tries them (cheapest first).
SEARCH_METHODS = ("minmax", "percentile", "entropy", "mse")
#: Lines of an evaluation command's output shown when it fails.
ERROR_LINES = 10


class EvaluationError(QGraphError):
    """The evaluation command failed, printed no score, or scored NaN."""


class BoundNotMetError(QGraphError):
    """No configuration met the bound; the best one found was written."""


@dataclasses.dataclass(frozen=True)
class TuningOptions:
    #: The largest acceptable drop of the score from the FP32 model's.
    max_drop: float
    higher_is_better: bool = True
    #: At most this many trials (None: the whole search).
    budget: int | None = None
    #: Measure each trial's latency (batch 1, median of this many runs; 0 skips it).
    latency_runs: int = 20

    def __post_init__(self) -> None:
        if not math.isfinite(self.max_drop) or self.max_drop < 0:
            raise QGraphError(f"--max-drop must be a finite number >= 0, got {self.max_drop!r}")
        if self.budget is not None and self.budget < 1:
            raise QGraphError(f"--tune-budget must be at least 1 trial, got {self.budget}")

    def drop(self, fp32_score: float, score: float) -> float:
        """How much worse ``score`` is than ``fp32_score`` (negative: better)."""
        return fp32_score - score if self.higher_is_better else score - fp32_score

    def bound_text(self) -> str:
        return f"drop at most {self.max_drop:g} ({'higher' if self.higher_is_better else 'lower'} is better)"


@dataclasses.dataclass(frozen=True)
class TrialConfiguration:
    """One point of the search space."""

    method: str = "minmax"
    per_channel: bool = True
    #: Nodes kept in FP32 (most damaging first).
    fp32_layers: tuple[str, ...] = ()

    def describe(self) -> str:
        text = f"method={self.method}, {'per-channel' if self.per_channel else 'per-tensor'} weights"
        if self.fp32_layers:
            text += f", {len(self.fp32_layers)} layer(s) FP32 ({', '.join(self.fp32_layers)})"
        return text

    def quantization(self, base: QuantizeOptions) -> QuantizeOptions:
        """``base`` with this configuration, the automatic fallback off."""
        return dataclasses.replace(
            base,
            calibration=dataclasses.replace(base.calibration, method=self.method),
            target_options=dataclasses.replace(base.target_options, per_channel=self.per_channel),
            overrides=dataclasses.replace(base.overrides, exclude=base.overrides.exclude | frozenset(self.fp32_layers)),
            min_sqnr=None,
            sensitivity_table=False,
        )

    def to_recipe(self, base: QuantizeOptions) -> str:
        """The configuration as a ``--config`` file (see :mod:`qgraph.annotate.config_file`)."""
        exclude = sorted(base.overrides.exclude | frozenset(self.fp32_layers))
        return "\n".join([
            "# qgraph tuning recipe: qgraph optimize MODEL -o OUT --calib CALIB --config THIS_FILE replays it",
            "exclude = [" + ", ".join(json.dumps(name) for name in exclude) + "]",
            "",
            "[quantization]",
            f"method = {json.dumps(self.method)}",
            f"per_channel = {'true' if self.per_channel else 'false'}",
            'min_sqnr = "off"',
            "",
        ])


@dataclasses.dataclass(frozen=True)
class Trial:
    configuration: TrialConfiguration
    score: float
    meets_bound: bool
    latency_ms: float | None
    size_bytes: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class TuningResult:
    fp32_score: float
    fp32_latency_ms: float | None
    options: TuningOptions
    trials: tuple[Trial, ...]
    #: Index of the chosen trial: the first that met the bound, else the best-scoring one.
    chosen: int
    seconds: float
    #: The chosen trial's optimize result (its model as written to the output).
    result: OptimizeResult | None = None
    recipe_path: Path | None = None
    trials_path: Path | None = None

    @property
    def bound_met(self) -> bool:
        return self.trials[self.chosen].meets_bound

    @property
    def shortfall(self) -> float:
        """How far the chosen trial's drop exceeds the bound (0 when it is met)."""
        return max(0.0, self.options.drop(self.fp32_score, self.trials[self.chosen].score) - self.options.max_drop)

    def summary(self) -> dict:
        """The tuning as plain data (the JSON file, and the HTML report's tuning section)."""
        return {
            "fp32_score": self.fp32_score,
            "fp32_latency_ms": self.fp32_latency_ms,
            "bound_text": self.options.bound_text(),
            "max_drop": self.options.max_drop,
            "higher_is_better": self.options.higher_is_better,
            "chosen": self.chosen,
            "bound_met": self.bound_met,
            "seconds": self.seconds,
            "trials": [
                {"description": trial.configuration.describe(), **dataclasses.asdict(trial.configuration),
                 "score": trial.score, "meets_bound": trial.meets_bound, "latency_ms": trial.latency_ms,
                 "size_bytes": trial.size_bytes, "seconds": trial.seconds}
                for trial in self.trials
            ],
        }


def command_evaluator(command: str) -> Callable[[str | os.PathLike], float]:
    """``evaluate(path)`` that runs ``command`` with ``{model}`` replaced by the (shell-quoted) path and reads the
    score from the last non-empty line of its standard output."""
    if "{model}" not in command:
        raise EvaluationError(f"--eval {command!r}: the command must contain {{model}}, where the model path goes")

    def evaluate(path: str | os.PathLike) -> float:
        line = command.replace("{model}", shlex.quote(os.fspath(path)))
        completed = subprocess.run(line, shell=True, capture_output=True, text=True)
        output = (completed.stdout + completed.stderr).strip().splitlines()
        tail = "\n".join(output[-ERROR_LINES:]) or "(no output)"
        if completed.returncode != 0:
            raise EvaluationError(f"--eval command failed with exit status {completed.returncode} on {path}: "
                                  f"{line}\nits last lines:\n{tail}")
        lines = [text.strip() for text in completed.stdout.splitlines() if text.strip()]
        try:
            return float(lines[-1])
        except (IndexError, ValueError):
            raise EvaluationError(f"--eval command printed no score (a number on its last line) for {path}: "
                                  f"{line}\nits last lines:\n{tail}") from None

    return evaluate


def _score(evaluate: Callable, path: Path, what: str) -> float:
    score = float(evaluate(path))
    if math.isnan(score):
        raise EvaluationError(f"the evaluation scored the {what} NaN ({path})")
    return score


def _latency(path: Path, batches: list, runs: int) -> float | None:
    if runs <= 0 or not batches:
        return None
    from qgraph.report import measure_latency, single_sample_feeds

    model = onnx.load(path)
    feeds = single_sample_feeds(model, batches[0])
    return measure_latency({"model": model}, feeds, runs=runs, threads=None)["model"]


def sensitivity_order(model: ir.Model | str | os.PathLike, calibration_data, base: QuantizeOptions,
                      configuration: TrialConfiguration) -> tuple[str, ...]:
    """The quantized layers, the one whose quantization alone hurts the output SQNR most first (the sensitivity
    analysis's full table, with a bound that no fallback is needed for)."""
    options = dataclasses.replace(configuration.quantization(base), min_sqnr=1e-6, sensitivity_table=True)
    model = ir.serde.deserialize_model(ir.serde.serialize_model(model)) if isinstance(model, ir.Model) else model
    analysed = optimize(model, None, OptimizeOptions(quantization=options), calibration_data=calibration_data)
    layers = sorted(analysed.quantization.sensitivity.layers, key=lambda layer: layer.output_sqnr_db)
    return tuple(layer.node for layer in layers)


def tune(
    model: str | os.PathLike,
    output: str | os.PathLike,
    calibration_data,
    evaluate: Callable[[str | os.PathLike], float],
    options: TuningOptions,
    base: OptimizeOptions | None = None,
    *,
    work_directory: str | os.PathLike | None = None,
) -> TuningResult:
    """Search quantization configurations of the model file ``model`` for the first whose ``evaluate`` score meets
    ``options``' bound (see the module docstring); the chosen model is written to ``output``, its recipe and the
    trials next to it. ``base`` carries the settings the search leaves alone (target, calibration samples, ...).

    Raises :class:`EvaluationError` before any search when the FP32 model cannot be scored (the command fails,
    prints no number, or scores NaN). When no trial meets the bound the best-scoring one is written all the same
    and ``bound_met`` is False (:func:`check_bound` turns that into :class:`BoundNotMetError`).
    """
    started = time.perf_counter()
    model, output = Path(model), Path(output)
    base = base or OptimizeOptions()
    base_quantization = base.quantization or QuantizeOptions()
    if not output.parent.exists():
        raise OutputPathError(f"{output.parent}: output folder does not exist")
    if output.exists() and output.resolve() == model.resolve():
        raise OutputPathError(f"{output}: the output path is the input model; choose another output path")
    fp32_score = _score(evaluate, model, "FP32 model")
    report_batches = list(_first_batches(model, calibration_data, base_quantization))
    fp32_latency = _latency(model, report_batches, options.latency_runs)
    logger.info("FP32 model scores %.6g; bound: %s", fp32_score, options.bound_text())
    temporary = None
    if work_directory is None:
        temporary = tempfile.TemporaryDirectory(prefix="qgraph-tune-")
        work_directory = temporary.name
    work = Path(work_directory)
    work.mkdir(parents=True, exist_ok=True)
    trials: list[Trial] = []
    results: list[OptimizeResult] = []

    def run(configuration: TrialConfiguration) -> Trial | None:
        if options.budget is not None and len(trials) >= options.budget:
            return None
        trial_started = time.perf_counter()
        path = work / f"trial_{len(trials):03d}.onnx"
        trial_options = dataclasses.replace(base, quantization=configuration.quantization(base_quantization))
        result = optimize(model, path, trial_options, calibration_data=calibration_data)
        score = float(evaluate(path))
        if math.isnan(score):
            logger.warning("trial %d (%s) scored NaN: counted as missing the bound", len(trials),
                           configuration.describe())
        meets = not math.isnan(score) and options.drop(fp32_score, score) <= options.max_drop
        trial = Trial(configuration, score, meets, _latency(path, report_batches, options.latency_runs),
                      path.stat().st_size, time.perf_counter() - trial_started)
        trials.append(trial)
        results.append(result)
        logger.info("trial %d: %s -> score %.6g (drop %.4g)%s", len(trials) - 1, configuration.describe(), score,
                    options.drop(fp32_score, score), ", meets the bound" if meets else "")
        return trial

    try:
        chosen = _search(run, model, calibration_data, base_quantization, options, fp32_score)
        if not trials:
            raise QGraphError("the tuning budget allowed no trial")
        if chosen is None:
            scored = [index for index, trial in enumerate(trials) if not math.isnan(trial.score)]
            chosen = min(scored or [0], key=lambda index: options.drop(fp32_score, trials[index].score))
        shutil.copyfile(work / f"trial_{chosen:03d}.onnx", output)
    finally:
        if temporary is not None:
            temporary.cleanup()
    recipe_path = output.with_suffix(".toml")
    recipe_path.write_text(trials[chosen].configuration.to_recipe(base_quantization))
    tuning = TuningResult(fp32_score, fp32_latency, options, tuple(trials), chosen, time.perf_counter() - started,
                          dataclasses.replace(results[chosen], output_path=output), recipe_path,
                          output.with_suffix(".trials.json"))
    tuning.trials_path.write_text(json.dumps(tuning.summary(), indent=2))
    logger.info("tuning: %d trials in %.1f s, chose #%d (%s)", len(trials), tuning.seconds, chosen,
                trials[chosen].configuration.describe())
    return tuning


def _first_batches(model: Path, calibration_data, quantization: QuantizeOptions, count: int = 1) -> list:
    from qgraph.ir import load_model

    if not isinstance(calibration_data, (str, os.PathLike)) and not hasattr(calibration_data, "iter_batches"):
        return list(calibration_data)[:count]
    batches = calibration_batches(load_model(model), calibration_data, quantization.calibration)
    return [batch for _, batch in zip(range(count), batches)]


def _search(run: Callable[[TrialConfiguration], Trial | None], model: Path, calibration_data,
            base: QuantizeOptions, options: TuningOptions, fp32_score: float) -> int | None:
    """The trials in search order; the index of the first that meets the bound, or None."""
    tried: list[tuple[TrialConfiguration, Trial]] = []

    def attempt(configuration: TrialConfiguration) -> Trial | None:
        trial = run(configuration)
        if trial is not None:
            tried.append((configuration, trial))
        return trial

    def best() -> TrialConfiguration:
        scored = [(configuration, trial) for configuration, trial in tried if not math.isnan(trial.score)]
        pool = scored or tried
        return min(pool, key=lambda pair: options.drop(fp32_score, pair[1].score))[0]

    for method in SEARCH_METHODS:
        trial = attempt(TrialConfiguration(method=method))
        if trial is None:
            return None
        if trial.meets_bound:
            return len(tried) - 1
    trial = attempt(dataclasses.replace(best(), per_channel=False))
    if trial is None:
        return None
    if trial.meets_bound:
        return len(tried) - 1
    start = best()
    order = sensitivity_order(model, calibration_data, base, start)
    logger.info("sensitivity order: %s", ", ".join(order))
    low, high, high_index = 0, len(order), None
    while high - low > 1:
        middle = (low + high) // 2
        trial = attempt(dataclasses.replace(start, fp32_layers=order[:middle]))
        if trial is None:
            return high_index
        if trial.meets_bound:
            high, high_index = middle, len(tried) - 1
        else:
            low = middle
    return high_index  # None: even all layers but one in FP32 missed the bound (all of them is the FP32 model)


def check_bound(tuning: TuningResult) -> None:
    """Raise :class:`BoundNotMetError` saying how far the written (best) trial is from the bound, if it is."""
    if tuning.bound_met:
        return
    trial = tuning.trials[tuning.chosen]
    raise BoundNotMetError(
        f"no configuration in {len(tuning.trials)} trials met the bound ({tuning.options.bound_text()}): the best, "
        f"#{tuning.chosen} ({trial.configuration.describe()}), scores {trial.score:.6g} against FP32 "
        f"{tuning.fp32_score:.6g}, {tuning.shortfall:.4g} beyond the allowed drop; it was written all the same")


def describe_trials(trials: Sequence[Trial], chosen: int) -> list[str]:
    """One line per trial, the chosen one marked."""
    return [f"{'*' if index == chosen else ' '} #{index} {trial.configuration.describe()}: score {trial.score:.6g}"
            + (f", {trial.latency_ms:.2f} ms" if trial.latency_ms is not None else "")
            + f", {trial.size_bytes / 1e6:.2f} MB" + (" (meets the bound)" if trial.meets_bound else "")
            for index, trial in enumerate(trials)]
