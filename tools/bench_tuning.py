"""Wall time of one accuracy-driven search in one process against the same search on Ray with 2 workers.

    python tools/bench_tuning.py [--model models/trained/resnet_small_fmnist.onnx] [--max-drop 0] [--repeats 3]
                                 [--tune-for accuracy|speed] [--full-test-set]

The two runs alternate (one process, Ray, one process, Ray, ...) so that both see the same load of the machine;
the medians and their ratio are printed, and the chosen configurations must be identical. Each time is the wall
time of ``tune`` as the user sees it: Ray's start (a local instance started on demand) and shutdown included. The
scorer is tools/score_fmnist.py: top-1 % on the bundled 2000-image Fashion-MNIST test subset, or with
``--full-test-set`` on all 10 000 test images (Debian's dataset-fashion-mnist, what models/trained/README.md
reports), which makes each trial's evaluation the several seconds a real one takes.

Two lines bound what 2 workers can give on this machine. The first sums the searches' own trial times (each trial's
seconds as its worker measured them): half of Ray's sum, against one process's, is what perfectly packed rounds of
two would reach with those trials. The last runs one trial (minmax) ``--repeats`` times in one process with all the
cores, against the same trial run the same number of times in each of 2 processes at once with cores / 2 threads
(the trials' throughput ratio; Ray's start, rounds and cancellations come on top).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _trial_seconds(model: str, evaluation: str, calib: str, threads: int, repeats: int) -> float:
    """Seconds of ``repeats`` minmax trials, one after another in this process, ``threads`` threads each."""
    import onnx

    from qgraph.pipeline import OptimizeOptions
    from qgraph.ptq import QuantizeOptions
    from qgraph.ray_trials import TrialContext, TrialJob, run_trial
    from qgraph.tuning import command_evaluator
    from qgraph.tuning.configuration import TrialConfiguration
    from qgraph.tuning.driver import _latency_feeds

    base = OptimizeOptions(quantization=QuantizeOptions())
    context = TrialContext(onnx.load(model).SerializeToString(), calib, command_evaluator(evaluation), base,
                           _latency_feeds(Path(model), calib, base.quantization), 20, 2)
    configuration = TrialConfiguration()
    job = TrialJob(0, configuration, configuration.to_recipe(base.quantization))
    run_trial(context, job, threads)  # warm
    started = time.perf_counter()
    for _ in range(repeats):
        run_trial(context, job, threads)
    return time.perf_counter() - started


def trial_throughput(model: str, evaluation: str, calib: str, repeats: int) -> tuple[float, float]:
    """Seconds per trial: one process with all the cores; two processes at once with half of them each."""
    import concurrent.futures
    import multiprocessing

    from qgraph.ray_trials import cpu_count

    cores = cpu_count()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        alone = pool.submit(_trial_seconds, model, evaluation, calib, cores, repeats).result() / repeats
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        pair = [pool.submit(_trial_seconds, model, evaluation, calib, max(1, cores // 2), repeats) for _ in range(2)]
        together = max(future.result() for future in pair) / (2 * repeats)
    return alone, together


def main() -> None:
    from qgraph.pipeline import OptimizeOptions
    from qgraph.ptq import QuantizeOptions
    from qgraph.tuning import TuningOptions, command_evaluator, tune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "trained" / "resnet_small_fmnist.onnx"))
    parser.add_argument("--calib", default=str(ROOT / "models" / "data" / "fashion_mnist_calibration.npz"))
    parser.add_argument("--max-drop", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=12)
    parser.add_argument("--tune-for", choices=("accuracy", "speed"), default="accuracy")
    parser.add_argument("--full-test-set", action="store_true")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("qgraph.ir", "qgraph.latency", "qgraph.calibrate", "qgraph.sensitivity", "qgraph.passes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    folder_context = tempfile.TemporaryDirectory()
    folder = folder_context.name
    data = ""
    if arguments.full_test_set:
        import numpy as np

        from qgraph.data import load_fashion_mnist

        images, labels = load_fashion_mnist("test", normalization="standard")
        np.savez(Path(folder) / "test.npz", input=images, label=labels)
        data = f" --data {Path(folder) / 'test.npz'}"
    evaluation = f"{sys.executable} {ROOT / 'tools' / 'score_fmnist.py'} {{model}}{data}"
    evaluate = command_evaluator(evaluation)
    times: dict[int, list[float]] = {1: [], 2: []}
    chosen: dict[int, set[str]] = {1: set(), 2: set()}
    trials: dict[int, list[int]] = {1: [], 2: []}
    trial_seconds: dict[int, list[float]] = {1: [], 2: []}  # the summed seconds of each search's own trials
    with folder_context:
        for repeat in range(arguments.repeats):
            for workers in (1, 2):
                started = time.perf_counter()
                result = tune(arguments.model, Path(folder) / f"out{workers}.onnx", arguments.calib, evaluate,
                              TuningOptions(max_drop=arguments.max_drop, workers=workers, budget=arguments.budget,
                                            tune_for=arguments.tune_for),
                              OptimizeOptions(quantization=QuantizeOptions()))
                seconds = time.perf_counter() - started
                times[workers].append(seconds)
                chosen[workers].add(result.trials[result.chosen].configuration.describe())
                trials[workers].append(len(result.trials))
                trial_seconds[workers].append(sum(trial.seconds for trial in result.trials))
                print(f"repeat {repeat}: {result.executor} ({workers} worker(s)): {seconds:.1f} s, "
                      f"{len(result.trials)} trials, chose #{result.chosen} "
                      f"({result.trials[result.chosen].configuration.describe()}), bound met: {result.bound_met}",
                      flush=True)
        one, two = statistics.median(times[1]), statistics.median(times[2])
        print(f"one process: median {one:.1f} s {[round(value, 1) for value in times[1]]}, trials {trials[1]}")
        print(f"Ray, 2 workers: median {two:.1f} s {[round(value, 1) for value in times[2]]}, trials {trials[2]}")
        print(f"ratio Ray / one process: {two / one:.3f} (paired: "
              f"{[round(b / a, 3) for a, b in zip(times[1], times[2])]})")
        print(f"chosen configurations identical: {chosen[1] == chosen[2] and len(chosen[1]) == 1} ({chosen[1]})",
              flush=True)
        one_trials, ray_trials = statistics.median(trial_seconds[1]), statistics.median(trial_seconds[2])
        print(f"the trials themselves: {one_trials:.1f} s in one process (all the cores each), {ray_trials:.1f} s on "
              f"Ray (each with its share of the cores); two at a time, perfectly packed, would take "
              f"{ray_trials / 2:.1f} s: {ray_trials / 2 / one_trials:.3f} of one process (the bound these trials "
              f"leave, before Ray's start and the rounds of one trial)", flush=True)
        alone, together = trial_throughput(arguments.model, evaluation, arguments.calib, arguments.repeats)
    print(f"trial throughput: {alone:.2f} s per trial alone at all cores, {together:.2f} s per trial two at once "
          f"at half the cores each: ratio {together / alone:.3f} (what 2 workers can give at best)")


if __name__ == "__main__":
    main()
