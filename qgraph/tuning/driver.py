"""Accuracy-driven tuning: the user's own metric chooses the quantization, cheapest configuration first.

``evaluate(path) -> float`` scores a model file (on the command line, ``--eval "CMD {model}"``: a program whose last
line of output is the score). The FP32 model is scored first, giving ``s₃₂``; a trial with score ``s`` meets the
bound ``--max-drop d`` when ``s₃₂ − s ≤ d`` (higher is better) or ``s − s₃₂ ≤ d`` (lower is better).

The search (:mod:`qgraph.tuning.search`) proposes rounds of configurations cheapest first; each trial runs from its
own TOML recipe without the automatic SQNR fallback (the metric decides what goes back to FP32), is scored, and its
latency (median batch-1 run time at full optimisation, :mod:`qgraph.latency`) and size recorded. Trials run in this
process or on Ray actors (:mod:`qgraph.ray_trials`, ``workers``/``ray_address``), with the same choice; with Ray the
search runs on its own thread while the caller's starts Ray, the first trials running in this process meanwhile,
and the sensitivity analysis calibrates on the workers. The budget
(``--tune-budget``: trials, or minutes) bounds the search. The chosen trial — the first that met the bound, or with
``--tune-for speed`` the fastest that did (all of them timed side by side at the end), or, when none met it, the
best-scoring one — is written to the output, with its recipe next to it (``OUT`` with suffix ``.toml``) that
``--config`` replays exactly (see :mod:`qgraph.annotate.config_file`), and every trial as JSON
(``OUT`` with suffix ``.trials.json``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import shlex
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
from qgraph.ray_trials import LocalTrials, TrialContext, TrialJob, TrialOutcome, cpu_count, trial_executor
from qgraph.tuning.configuration import Trial, TrialConfiguration, TuningOptions
from qgraph.tuning.search import ModelFacts, search_rounds

logger = logging.getLogger(__name__)

#: Lines of an evaluation command's output shown when it fails.
ERROR_LINES = 10


class EvaluationError(QGraphError):
    """The evaluation command failed, printed no score, or scored NaN."""


class BoundNotMetError(QGraphError):
    """No configuration met the bound; the best one found was written."""


@dataclasses.dataclass(frozen=True)
class TuningResult:
    fp32_score: float
    fp32_latency_ms: float | None
    options: TuningOptions
    trials: tuple[Trial, ...]
    #: Index of the chosen trial: the first that met the bound (the fastest with --tune-for speed), else the
    #: best-scoring one.
    chosen: int
    seconds: float
    #: Unused by :func:`tune` (its trials may run on other machines): :func:`replay` gives the chosen trial's full
    #: optimize result.
    result: OptimizeResult | None = None
    recipe_path: Path | None = None
    trials_path: Path | None = None
    #: Where the trials ran ("one process" or "Ray") and how many at once.
    executor: str = "one process"
    workers: int = 1

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
            "tune_for": self.options.tune_for,
            "executor": self.executor,
            "workers": self.workers,
            "chosen": self.chosen,
            "bound_met": self.bound_met,
            "seconds": self.seconds,
            "trials": [
                {"description": trial.configuration.describe(), **dataclasses.asdict(trial.configuration),
                 "score": trial.score, "meets_bound": trial.meets_bound, "latency_ms": trial.latency_ms,
                 "size_bytes": trial.size_bytes, "seconds": trial.seconds, "worker": trial.worker}
                for trial in self.trials
            ],
        }


def command_evaluator(command: str) -> Callable[[str | os.PathLike], float]:
    """``evaluate(path)`` that runs ``command`` with ``{model}`` replaced by the (shell-quoted) path and reads the
    score from the last non-empty line of its standard output. The command inherits ``QGRAPH_THREADS``, the
    onnxruntime threads a trial may use (see :mod:`qgraph.ray_trials`)."""
    if "{model}" not in command:
        raise EvaluationError(f"--eval {command!r}: the command must contain {{model}}, where the model path goes")
    return _CommandEvaluator(command)


@dataclasses.dataclass(frozen=True)
class _CommandEvaluator:
    """A picklable evaluator (Ray sends it to the workers)."""

    command: str

    def __call__(self, path: str | os.PathLike) -> float:
        line = self.command.replace("{model}", shlex.quote(os.fspath(path)))
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


def _score(evaluate: Callable, path: Path, what: str) -> float:
    score = float(evaluate(path))
    if math.isnan(score):
        raise EvaluationError(f"the evaluation scored the {what} NaN ({path})")
    return score


def sensitivity_order(model: ir.Model | str | os.PathLike, calibration_data, base: QuantizeOptions,
                      configuration: TrialConfiguration, recipe_path: Path, qat_epochs: int = 2,
                      calibrator: Callable | None = None) -> tuple[tuple[str, ...], dict[str, str]]:
    """The quantized layers, the one whose quantization alone hurts the output SQNR most first (the sensitivity
    analysis's full table, with a bound that no fallback is needed for), and each layer's weight initializer (the
    candidates for 4 bits: embedding lookups left out).
    ``calibrator`` calibrates instead of :func:`qgraph.calibrate.driver.calibrate` (the same ranges: on Ray, the
    shards of :class:`qgraph.ray_trials.ShardedCalibration`)."""
    bound = 1e-6  # below any model's output SQNR: the analysis ranks every layer and nothing falls back
    recipe_path.write_text(dataclasses.replace(configuration, qat=False).to_recipe(base, qat_epochs, min_sqnr=bound))
    options = dataclasses.replace(configuration.quantization(base, recipe_path), min_sqnr=bound,
                                  sensitivity_table=True, speed_choice=False, calibrator=calibrator)
    model = ir.serde.deserialize_model(ir.serde.serialize_model(model)) if isinstance(model, ir.Model) else model
    analysed = optimize(model, None, OptimizeOptions(quantization=options), calibration_data=calibration_data)
    layers = sorted(analysed.quantization.sensitivity.layers, key=lambda layer: layer.output_sqnr_db)
    lookups = {layer.node for layer in layers if layer.op_type == "Gather"}  # an embedding table gains no 4-bit kernel
    weights = {weight.consumer: weight.name for weight in analysed.quantization.plan.weights
               if weight.consumer not in lookups}
    return tuple(layer.node for layer in layers), weights


def model_facts(model: onnx.ModelProto) -> ModelFacts:
    """What decides which stages apply: a model made mostly of MatMul/Gemm layers with constant weights (dynamic
    activations leave convolutions in FP32, SmoothQuant does not change them), and a training runtime."""
    constants = {tensor.name for tensor in model.graph.initializer}
    constants |= {output for node in model.graph.node if node.op_type == "Constant" for output in node.output}
    matmuls = sum(node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in constants
                  for node in model.graph.node)
    convolutions = sum(node.op_type in ("Conv", "ConvTranspose") for node in model.graph.node)
    has_matmul = matmuls > 0 and matmuls >= convolutions  # a CNN's one classifier Gemm does not count
    try:
        from qgraph.train.ort_training import require_training_api

        require_training_api()
        can_train = True
    except QGraphError:
        can_train = False
    return ModelFacts(has_matmul=has_matmul, can_train=can_train)


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
    if base_quantization.config is not None:
        raise QGraphError("tuning writes each trial's own recipe: --config cannot be combined with --eval "
                          "(put the names to keep in FP32 in --exclude instead)")
    base = dataclasses.replace(base, quantization=base_quantization)
    executor = trial_executor(options.workers, options.ray_address)
    if isinstance(executor, LocalTrials):  # nothing to start: the search runs on this thread
        return _tune(model, output, calibration_data, evaluate, options, base, executor, work_directory, started)
    try:
        # the search runs on its own thread; this one starts Ray (its processes live as long as the thread that
        # started them), the first trials running in this process meanwhile
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qgraph-search") as pool:
            searching = pool.submit(_tune, model, output, calibration_data, evaluate, options, base, executor,
                                    work_directory, started)
            try:
                executor.start()
            except QGraphError:
                pass  # the search raises it at its next round
            return searching.result()
    finally:
        executor.close()


def _tune(model: Path, output: Path, calibration_data, evaluate: Callable, options: TuningOptions,
          base: OptimizeOptions, executor, work_directory, started: float) -> TuningResult:
    base_quantization = base.quantization
    fp32_score = _score(evaluate, model, "FP32 model")
    feeds = _latency_feeds(model, calibration_data, base_quantization) if options.latency_runs > 0 else None
    from qgraph.ray_trials import trial_latency

    fp32_latency = trial_latency(model, feeds, options.latency_runs, cpu_count())
    logger.info("FP32 model scores %.6g; bound: %s; trials run in %s (%d at once)", fp32_score, options.bound_text(),
                executor.kind, executor.workers)
    proto = onnx.load(model)
    context = TrialContext(proto.SerializeToString(), calibration_data, evaluate, base, feeds, options.latency_runs,
                           options.qat_epochs)
    temporary = None
    if work_directory is None:
        temporary = tempfile.TemporaryDirectory(prefix="qgraph-tune-")
        work_directory = temporary.name
    work = Path(work_directory)
    work.mkdir(parents=True, exist_ok=True)
    trials: list[Trial] = []
    done: dict[TrialConfiguration, Trial] = {}

    def order(configuration: TrialConfiguration):
        found = sensitivity_order(model, calibration_data, base_quantization, configuration,
                                  work / "sensitivity.toml", options.qat_epochs, executor.calibrator())
        logger.info("sensitivity order: %s", ", ".join(found[0]))
        return found

    def out_of_budget() -> bool:
        if options.budget is not None and len(trials) >= options.budget:
            return True
        minutes = (time.perf_counter() - started) / 60
        return options.budget_minutes is not None and minutes >= options.budget_minutes

    search = search_rounds(model_facts(proto), options, fp32_score, order)
    preferred = None
    try:
        stage = next(search)
        while not out_of_budget():
            fresh = [configuration for configuration in stage.configurations if configuration not in done]
            if options.budget is not None:
                fresh = fresh[:options.budget - len(trials)]
            jobs = [TrialJob(len(trials) + position, configuration,
                             configuration.to_recipe(base_quantization, options.qat_epochs))
                    for position, configuration in enumerate(fresh)]
            stop = None if options.tune_for == "speed" else (
                lambda outcome: options.meets(fp32_score, outcome.score))
            logger.info("round '%s': %d trial(s)", stage.stage, len(jobs))
            for job, outcome in zip(jobs, executor.run_round(context, jobs, stop)):
                trial = _record(job, outcome, work, options, fp32_score, len(trials))
                trials.append(trial)
                done[job.configuration] = trial
            outcome_trials = _round_outcome(stage.configurations, done, options.tune_for == "speed")
            if len(outcome_trials) < len(stage.configurations) and not any(t.meets_bound for t in outcome_trials):
                break  # the budget cut the round short
            stage = search.send(outcome_trials)
    except StopIteration as finished:
        preferred = finished.value
    finally:
        search.close()
    try:
        if not trials:
            raise QGraphError("the tuning budget allowed no trial")
        chosen = _choose(trials, work, options, fp32_score, feeds, preferred)
        output.write_bytes((work / f"trial_{chosen:03d}.onnx").read_bytes())
        recipe_path = output.with_suffix(".toml")
        recipe_path.write_text((work / f"trial_{chosen:03d}.toml").read_text())
    finally:
        if temporary is not None:
            temporary.cleanup()
    tuning = TuningResult(fp32_score, fp32_latency, options, tuple(trials), chosen, time.perf_counter() - started,
                          None, recipe_path, output.with_suffix(".trials.json"), executor.kind, executor.workers)
    tuning.trials_path.write_text(json.dumps(tuning.summary(), indent=2))
    logger.info("tuning: %d trials in %.1f s (%s), chose #%d (%s)", len(trials), tuning.seconds, executor.kind, chosen,
                trials[chosen].configuration.describe())
    return tuning


def _round_outcome(configurations: Sequence[TrialConfiguration], done: dict, whole: bool) -> list[Trial]:
    """The round's trials in its order, up to and including the first that meets the bound (all when ``whole``)."""
    outcome = []
    for configuration in configurations:
        if configuration not in done:
            break
        outcome.append(done[configuration])
        if outcome[-1].meets_bound and not whole:
            break
    return outcome


def _record(job: TrialJob, outcome: TrialOutcome, work: Path, options: TuningOptions, fp32_score: float,
            index: int) -> Trial:
    path = work / f"trial_{index:03d}.onnx"
    path.write_bytes(outcome.model_bytes)
    (work / f"trial_{index:03d}.toml").write_text(job.recipe)
    if outcome.error is not None:
        logger.warning("trial %d (%s) could not be built: %s", index, job.configuration.describe(), outcome.error)
    elif math.isnan(outcome.score):
        logger.warning("trial %d (%s) scored NaN: counted as missing the bound", index, job.configuration.describe())
    meets = options.meets(fp32_score, outcome.score)
    logger.info("trial %d: %s -> score %.6g (drop %.4g)%s [%s, %.1f s]", index, job.configuration.describe(),
                outcome.score, options.drop(fp32_score, outcome.score), ", meets the bound" if meets else "",
                outcome.worker, outcome.seconds)
    return Trial(job.configuration, outcome.score, meets, outcome.latency_ms, len(outcome.model_bytes),
                 outcome.seconds, outcome.worker)


def _choose(trials: Sequence[Trial], work: Path, options: TuningOptions, fp32_score: float, feeds,
            preferred: TrialConfiguration | None = None) -> int:
    """The trial to write: the search's preferred one (the fallback's smallest FP32 set) or the first that met the
    bound; with --tune-for speed the fastest that met it; when none did, the best-scoring one."""
    meeting = [index for index, trial in enumerate(trials) if trial.meets_bound]
    if not meeting:
        scored = [index for index, trial in enumerate(trials) if not math.isnan(trial.score)]
        built = [index for index, trial in enumerate(trials) if trial.size_bytes > 0]
        if not built:
            raise QGraphError(f"none of the {len(trials)} trials could be built (see the warnings above)")
        return min(scored or built, key=lambda index: options.drop(fp32_score, trials[index].score))
    if options.tune_for != "speed" or len(meeting) == 1 or feeds is None:
        return next((index for index in meeting if trials[index].configuration == preferred), meeting[0])
    from qgraph.latency import LatencyOptions, measure_latency

    names = {f"trial {index}": index for index in meeting}
    table = measure_latency({name: onnx.load(work / f"trial_{index:03d}.onnx") for name, index in names.items()},
                            LatencyOptions(threads=cpu_count(), rounds=max(options.latency_runs, 5)),
                            feeds={1: feeds})
    for name in names:
        logger.info("speed: %s %.3f ms (fast quartile)", name, table.fast_quartile_seconds(name, 1) * 1e3)
    return names[min(names, key=lambda name: (table.fast_quartile_seconds(name, 1), names[name]))]


def replay(tuning: TuningResult, model: str | os.PathLike, calibration_data, base: OptimizeOptions | None = None,
           output: str | os.PathLike | None = None) -> OptimizeResult:
    """The chosen trial run again in this process from its recipe (the trials ran elsewhere, possibly on Ray): its
    full optimize result (plan, ranges, QDQ graph) for a report; with ``output``, written there too."""
    base = base or OptimizeOptions()
    quantization = base.quantization or QuantizeOptions()
    configuration = tuning.trials[tuning.chosen].configuration
    options = dataclasses.replace(base, quantization=configuration.quantization(quantization, tuning.recipe_path))
    train_data = None
    if configuration.qat:
        from qgraph.qat.options import QATOptions

        options = dataclasses.replace(options, qat=QATOptions(loss="distill", epochs=tuning.options.qat_epochs,
                                                              patience=None))
        train_data = calibration_data
    return optimize(model, output, options, calibration_data=calibration_data, train_data=train_data)


def _latency_feeds(model: Path, calibration_data, quantization: QuantizeOptions):
    from qgraph.ir import load_model
    from qgraph.report import single_sample_feeds

    if not isinstance(calibration_data, (str, os.PathLike)) and not hasattr(calibration_data, "iter_batches"):
        batches = list(calibration_data)[:1]
    else:
        batches = [batch for _, batch in zip(range(1), calibration_batches(load_model(model), calibration_data,
                                                                             quantization.calibration))]
    return single_sample_feeds(onnx.load(model), batches[0]) if batches else None


def check_bound(tuning: TuningResult) -> None:
    """Raise :class:`BoundNotMetError` saying how far the written (best) trial is from the bound, if it is."""
    if tuning.bound_met:
        return
    trial = tuning.trials[tuning.chosen]
    unscored = sum(math.isnan(other.score) for other in tuning.trials)
    nan_text = f"; {unscored} of them scored NaN or could not be built" if unscored else ""
    if math.isnan(trial.score):
        raise BoundNotMetError(
            f"no configuration in {len(tuning.trials)} trials met the bound ({tuning.options.bound_text()}): every "
            f"trial scored NaN or could not be built; #{tuning.chosen} ({trial.configuration.describe()}) was "
            f"written all the same")
    raise BoundNotMetError(
        f"no configuration in {len(tuning.trials)} trials met the bound ({tuning.options.bound_text()}): the best, "
        f"#{tuning.chosen} ({trial.configuration.describe()}), scores {trial.score:.6g} against FP32 "
        f"{tuning.fp32_score:.6g}, {tuning.shortfall:.4g} beyond the allowed drop{nan_text}; it was written all the "
        f"same")


def describe_trials(trials: Sequence[Trial], chosen: int) -> list[str]:
    """One line per trial, the chosen one marked."""
    return [f"{'*' if index == chosen else ' '} #{index} {trial.configuration.describe()}: score {trial.score:.6g}"
            + (f", {trial.latency_ms:.2f} ms" if trial.latency_ms is not None else "")
            + f", {trial.size_bytes / 1e6:.2f} MB" + (" (meets the bound)" if trial.meets_bound else "")
            for index, trial in enumerate(trials)]
