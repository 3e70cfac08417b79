"""Check issue #4's post-training quantization goals and print the tables.

Subcommands (``python tools/bench_ptq.py SUBCOMMAND --help``):

``memory``            peak RSS of histogram calibration (entropy, percentile, mse) of the ResNet-18 layout at
                      3×224×224 on 100 and 1000 streamed samples, each run in a fresh subprocess; goal < 1.5 GB and
                      the peak at 1000 within 10 % of the peak at 100. ``--with-ort`` adds ``quantize_static``
                      (Entropy) on a small N for comparison.
``speed``             qgraph's histogram calibration (the ``calibrate`` driver and end-to-end ``quantize``) against
                      plain FP32 inference over the same samples and against ``quantize_static``; goal: the whole
                      ``calibrate`` call ≤ 1.25× a fresh FP32 session over the same batches, and faster than
                      ``quantize_static``. ``--samples 1000`` matches the memory goal's set (192 by default, which
                      ``quantize_static`` can hold in memory). ``--fast-paths`` adds a table: the whole ``calibrate()``
                      call with each of its optional fast paths switched off alone, in the same alternating rounds,
                      and the share of the call's time each buys (kept in the library where ≥ 5 %).
``latency``           batch-1 latency of FP32, qgraph's QOperator model and ``quantize_static``'s QOperator model for
                      ResNet-18 and MobileNetV2 (alternating runs in one process), with operator histograms.
``accuracy``          Fashion-MNIST top-1 of trained models: FP32 vs qgraph PTQ vs ``quantize_static``
                      (see :mod:`bench_ptq_accuracy`).
``qoperator-vs-qdq``  qgraph's QOperator model against its QDQ model: max |diff| in output quantization steps.

Timings share 2 cores with other work: ratios are measured side by side, alternating, and medians are reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_ptq_support as support  # noqa: E402

logger = logging.getLogger("bench_ptq")

GIGABYTE = 1 << 30
MEMORY_GOAL_BYTES = int(1.5 * GIGABYTE)
HISTOGRAM_METHODS = ("entropy", "percentile", "mse")


# ------------------------------------------------------------------------------------------------------ memory
def _memory_child(arguments: argparse.Namespace) -> None:
    """Runs inside a fresh process: one calibration, then a JSON line with the peak RSS and times."""
    import onnx_ir as ir

    model = support.canonical_float_model(support.build_reference_model(arguments.model))
    baseline = support.peak_rss_bytes()
    batch_size = arguments.batch_size
    if arguments.quantizer == "ort":
        batch_size = support.even_batch_size(arguments.samples, batch_size)
    batches = support.random_image_batches(arguments.samples, batch_size, support.input_shape_of(model))
    start = time.perf_counter()
    if arguments.quantizer == "qgraph":
        from qgraph.annotate.annotator import annotate
        from qgraph.calibrate.driver import CalibrationConfig, calibrate
        from qgraph.targets import get_target

        ir_model = ir.serde.deserialize_model(model)
        plan = annotate(ir_model, get_target("ort-cpu").rules())
        config = CalibrationConfig(method=arguments.method, batch_size=arguments.batch_size, threads=arguments.threads)
        result = calibrate(ir_model, plan, batches, config)
        samples = result.samples
    else:
        # onnxruntime's documented flow: the exported model through quant_pre_process, then quantize_static.
        support.ort_quantize_static(support.build_reference_model(arguments.model), batches, method=arguments.method)
        samples = arguments.samples
    seconds = time.perf_counter() - start
    print(json.dumps({"peak": support.peak_rss_bytes(), "baseline": baseline, "seconds": seconds, "samples": samples}))


def _run_memory_child(quantizer: str, method: str, samples: int, arguments: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "_memory-child", "--quantizer", quantizer, "--method", method,
        "--samples", str(samples), "--batch-size", str(arguments.batch_size), "--threads", str(arguments.threads),
        "--model", arguments.model,
    ]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        # wait4 gives this child's own rusage: ru_maxrss is its peak RSS (kilobytes on Linux).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    if process.returncode != 0:
        last = (errors.strip().splitlines() or [""])[-1]
        return {"error": f"exit status {process.returncode}: {last[:120]}"}
    report = json.loads(output.strip().splitlines()[-1])
    report["ru_maxrss"] = usage.ru_maxrss * 1024
    return report


def command_memory(arguments: argparse.Namespace) -> None:
    methods = () if arguments.ort_only else ("entropy",) if arguments.quick else HISTOGRAM_METHODS
    counts = arguments.samples
    rows = []
    verdicts = []
    for method in methods:
        peaks = {}
        for samples in counts:
            report = _run_memory_child("qgraph", method, samples, arguments)
            if "error" in report:
                rows.append(["qgraph", method, samples, "error", report["error"], "", "", ""])
                continue
            peak = max(report["peak"], report["ru_maxrss"])
            peaks[samples] = peak
            rows.append(["qgraph", method, samples, f"{report['ru_maxrss'] / GIGABYTE:.3f}",
                         f"{report['peak'] / GIGABYTE:.3f}", f"{report['baseline'] / GIGABYTE:.3f}",
                         f"{report['seconds']:.1f}", "yes" if peak < MEMORY_GOAL_BYTES else "NO"])
        if len(peaks) >= 2:
            low, high = min(peaks), max(peaks)
            growth = peaks[high] / peaks[low] - 1
            verdicts.append(f"{method}: peak at {high} samples is {growth:+.1%} vs {low} "
                            f"({'within' if growth <= 0.10 else 'OUTSIDE'} the 10 % goal)")
    if arguments.with_ort or arguments.ort_only:
        report = _run_memory_child("ort", "entropy", arguments.ort_samples, arguments)
        if "error" in report:
            rows.append(["quantize_static", "Entropy", arguments.ort_samples, "error", report["error"], "", "", ""])
        else:
            peak = max(report["peak"], report["ru_maxrss"])
            rows.append(["quantize_static", "Entropy", arguments.ort_samples, f"{report['ru_maxrss'] / GIGABYTE:.3f}",
                         f"{report['peak'] / GIGABYTE:.3f}", f"{report['baseline'] / GIGABYTE:.3f}",
                         f"{report['seconds']:.1f}", "yes" if peak < MEMORY_GOAL_BYTES else "NO"])
    support.print_table(
        f"Calibration peak RSS, {arguments.model} 3×224×224, batch {arguments.batch_size}, {arguments.threads} threads "
        "(fresh process per row)",
        ["quantizer", "method", "samples", "ru_maxrss GB (wait4)", "VmHWM GB", "peak before calibration GB", "seconds",
         "< 1.5 GB"],
        rows,
        notes=verdicts,
    )


# ------------------------------------------------------------------------------------------------------- speed
#: A fast path is worth its code where switching it off makes the whole calibrate() call at least this much slower.
FAST_PATH_GOAL = 0.05


def _fast_path_switches() -> dict[str, object]:
    """Each optional fast path of calibrate() by name: a function that switches it on (True) or off (False)."""
    from qgraph.calibrate import probes

    def flag(key: str):
        return lambda on: probes._FAST_PATHS.__setitem__(key, on)

    return {"blocked NCHWc outputs (blocked_outputs)": flag("blocked_outputs")}


def _fast_path_table(pairs: dict[str, list[tuple[float, float, float, float]]], rounds: int, load: str) -> None:
    """Per fast path, the whole calibrate() call with it on against it off, from (on, off) pairs run back to back."""
    rows = []
    for name, measured in pairs.items():
        on_wall, off_wall, on_cpu, off_cpu = (list(column) for column in zip(*measured))
        ratios = sorted(off / on for off, on in zip(off_wall, on_wall))
        share = support.median(ratios) - 1
        cpu_share = support.median([off / on for off, on in zip(off_cpu, on_cpu)]) - 1
        rows.append([name, support.median(on_wall), support.median(off_wall),
                     f"{share:+.1%} [{ratios[0] - 1:+.1%} … {ratios[-1] - 1:+.1%}]", f"{cpu_share:+.1%}",
                     "keep" if share >= FAST_PATH_GOAL else "remove"])
    support.print_table(
        "calibrate() with each fast path on and switched off alone (whole call, wall s, medians)",
        ["fast path", "on", "off", "share: off / on − 1, median of pairs [min … max]", "CPU s: off / on − 1",
         f"≥ {FAST_PATH_GOAL:.0%}"],
        rows,
        notes=[f"{rounds} rounds; in each, every fast path's on and off runs back to back (which first alternates "
               f"by round), the paths in a rotated order; the other paths on. Load average before/after: {load}."],
    )


def command_speed(arguments: argparse.Namespace) -> None:
    import onnx_ir as ir

    from qgraph.annotate.annotator import annotate
    from qgraph.calibrate.driver import CalibrationConfig, calibrate
    from qgraph.calibrate.observers.base import NATIVE
    from qgraph.ptq import QuantizeOptions, quantize
    from qgraph.targets import TargetOptions, get_target

    model = support.canonical_float_model(support.build_reference_model(arguments.model))
    shape = support.input_shape_of(model)
    if arguments.samples % arguments.batch_size:
        # quantize_static's histogram calibrators fail on a shorter last batch: keep whole batches for everyone.
        arguments.samples -= arguments.samples % arguments.batch_size
    # The same batches for every contender, made once so data generation is timed by nobody.
    batches = list(support.random_image_batches(arguments.samples, arguments.batch_size, shape))

    def float_inference() -> list[float]:
        """A fresh session, as calibrate() makes its probe's: per-batch wall times, the first (cold) run included."""
        session = support.create_session(model, threads=arguments.threads)
        times = []
        for batch in batches:
            started = time.perf_counter()
            session.run(None, batch)
            times.append(time.perf_counter() - started)
        return times

    range_seconds: list[float] = []
    switches = _fast_path_switches() if arguments.fast_paths else {}
    #: The calibrate() call alone (the model's deserialisation and annotation excluded): (wall, CPU) seconds.
    call_seconds: list[tuple[float, float]] = []

    def qgraph_calibrate(switched_off: str | None = None) -> list[float]:
        """calibrate() with a progress callback that stamps each batch's end: per-batch wall times of its loop."""
        ir_model = ir.serde.deserialize_model(model)
        plan = annotate(ir_model, get_target("ort-cpu").rules())
        config = CalibrationConfig(method=arguments.method, batch_size=arguments.batch_size, threads=arguments.threads)
        stamps = []
        if switched_off is not None:
            switches[switched_off](False)
        try:
            called, cpu_called = time.perf_counter(), time.process_time()
            result = calibrate(ir_model, plan, iter(batches), config,
                               progress=lambda _: stamps.append(time.perf_counter()))
            call_seconds.append((time.perf_counter() - called, time.process_time() - cpu_called))
        finally:
            if switched_off is not None:
                switches[switched_off](True)
        # result.seconds runs from the loop's start to the ranges' end; the ranges follow the last batch's stamp
        loop_start = stamps[-1] + result.range_seconds - result.seconds
        edges = [loop_start, *stamps]
        range_seconds.append(result.range_seconds)
        return [later - earlier for earlier, later in zip(edges, edges[1:])]

    def qgraph_quantize(**extra) -> None:
        options = QuantizeOptions(
            target_options=TargetOptions(format="qoperator"),
            calibration=CalibrationConfig(
                method=arguments.method, batch_size=arguments.batch_size, threads=arguments.threads
            ),
            **extra,
        )
        quantize(ir.serde.deserialize_model(model), iter(batches), options)

    # Warm-up for nobody's account. This VM backs a page with host memory on its first touch (a process's first
    # 300 MB took ~1 s to touch here, later ones 25 ms), and the probe session needs more memory than FP32
    # inference. Touching memory first lowers what the probe's first run pays for the machine (0.4-0.9 s seen
    # with it, ~1 s without); what remains shows in the cold-batch row, reported apart from the steady state.
    np.ones(1 << 28, dtype=np.float32)  # 1 GiB touched once, then freed to this process's allocator and the kernel
    float_inference()
    load_before = support.load_average()
    names = ("fp32", "calibrate", "quantize", "quantize_no_fallback", "quantize_static")
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    per_batch: dict[str, list[list[float]]] = {"fp32": [], "calibrate": []}

    def record(name: str, function) -> object:
        seconds, cpu_seconds, value = support.timed_with_cpu(function)
        wall[name].append(seconds)
        cpu[name].append(cpu_seconds)
        if name in per_batch:
            per_batch[name].append(value)
        return value

    pairs: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in switches}
    load_before_pairs = support.load_average()
    for round_index in range(arguments.rounds):
        record("fp32", float_inference)
        record("calibrate", qgraph_calibrate)
        # each fast path on and off back to back (the machine drifts): which runs first alternates by round, and
        # the paths take every position in turn
        paths = list(switches)
        shift = round_index % len(paths) if paths else 0
        for path in paths[shift:] + paths[:shift]:
            measured = {}
            for switched_off in (None, path) if round_index % 2 == 0 else (path, None):
                qgraph_calibrate(switched_off)
                measured[switched_off] = call_seconds[-1]
            pairs[path].append((measured[None][0], measured[path][0], measured[None][1], measured[path][1]))
        if not arguments.skip_quantize:
            record("quantize", qgraph_quantize)
            record("quantize_no_fallback", lambda: qgraph_quantize(min_sqnr=None))
    if not arguments.skip_ort:
        record("quantize_static",
               lambda: support.ort_quantize_static(model, iter(batches), method=arguments.method, preprocess=False))

    def loop(name: str, skip_first: bool) -> float:
        """Median over rounds of the summed per-batch times (without the first, cold batch if asked)."""
        return support.median([sum(times[1:] if skip_first else times) for times in per_batch[name]])

    fp32 = support.median(wall["fp32"])
    fp32_cpu = support.median(cpu["fp32"])
    labels = {
        "fp32": "FP32 inference: fresh session + batches (onnxruntime, ORT_ENABLE_ALL)",
        "calibrate": "qgraph calibrate(): whole call (probe build + session + loop + ranges)",
        "quantize": "qgraph quantize() end to end (annotate … lower, QOperator; default sensitivity check)",
        "quantize_no_fallback": "qgraph quantize() end to end with min_sqnr=None (no sensitivity analysis)",
        "quantize_static": f"quantize_static ({arguments.method}, QOperator, same batches)",
    }
    rows = []
    for name in names:
        if not wall[name]:
            continue
        median = support.median(wall[name])
        cpu_median = support.median(cpu[name]) if cpu[name] else float("nan")
        rows.append([labels[name], median, median / fp32, cpu_median, cpu_median / fp32_cpu])
    batch_rows = []
    for skip_first, label in ((False, "all batches (the first, cold run included)"),
                              (True, "batches 2…n (steady state)")):
        fp32_loop, calibrate_loop = loop("fp32", skip_first), loop("calibrate", skip_first)
        batch_rows.append([label, fp32_loop, calibrate_loop, calibrate_loop / fp32_loop])
    first = {name: support.median([times[0] for times in per_batch[name]]) for name in per_batch}
    loop_all = batch_rows[0][3]
    whole_ratio = support.median(wall["calibrate"]) / fp32
    notes = [
        f"samples {arguments.samples}, batch {arguments.batch_size}, {arguments.threads} threads, method "
        f"{arguments.method}, native observer loops {'on' if NATIVE else 'OFF (numpy)'}; medians of "
        f"{arguments.rounds} alternating rounds; load average before: {load_before}, after: {support.load_average()} "
        "(2 shared cores).",
        f"first batch: FP32 {first['fp32'] * 1000:.0f} ms, calibrate {first['calibrate'] * 1000:.0f} ms (a new "
        f"session's first run); calibrate's range searches after the last batch: "
        f"{support.median(range_seconds) * 1000:.0f} ms.",
        f"goal calibrate ≤ 1.25× FP32 inference over the same samples: whole call {whole_ratio:.2f}× "
        f"({'met' if whole_ratio <= 1.25 else 'NOT met'}); the batch loop alone {loop_all:.2f}×, its steady state "
        f"{batch_rows[1][3]:.2f}× (the rest is fixed: probe build and range searches).",
    ]
    if wall["quantize_static"]:
        ort_seconds = wall["quantize_static"][0]
        whole = support.median(wall["calibrate"])
        notes.append(f"quantize_static takes {ort_seconds / whole:.1f}× qgraph calibrate()"
                     + (f" and {ort_seconds / support.median(wall['quantize']):.1f}× qgraph quantize()"
                        if wall["quantize"] else ""))
    support.print_table(f"Calibration speed, {arguments.model} 3×224×224",
                        ["run", "wall s (median)", "× FP32", "CPU s", "CPU × FP32"], rows)
    support.print_table("Batch loops, per-batch times summed (FP32 session run vs calibrate() batch: probe run + "
                        "observers)", ["batches", "FP32 s", "calibrate s", "ratio"], batch_rows, notes=notes)
    if switches:
        _fast_path_table(pairs, arguments.rounds, f"{load_before_pairs} / {support.load_average()}")


# ----------------------------------------------------------------------------------------------------- latency
def command_latency(arguments: argparse.Namespace) -> None:
    rows = []
    notes = [f"quantize_static settings: {support.ORT_SETTINGS}, CalibrationMethod.MinMax, after quant_pre_process; "
             f"qgraph: ort-cpu QOperator, per-channel, reduce-range auto, method minmax. Both calibrated on the same "
             f"{arguments.calibration_samples} seeded random images; batch 1, {arguments.threads} threads, "
             f"ORT_ENABLE_ALL, intra-op spinning {'on' if arguments.spinning else 'off'}, "
             f"{arguments.iterations} rounds of one run per model in shuffled order; "
             f"load average {support.load_average()}."]
    histograms = {}
    for name in arguments.models:
        float_model = support.build_reference_model(name)
        shape = support.input_shape_of(float_model)

        def calibration(shape=shape):
            return support.random_image_batches(arguments.calibration_samples, 8, shape, seed=1)

        qgraph_model = _qgraph_proto(support.qgraph_quantize(float_model, calibration(), method="minmax", batch_size=8))
        ort_model = support.ort_quantize_static(float_model, calibration(), method="minmax")
        sessions = {
            key: support.create_session(proto, threads=arguments.threads, spinning=arguments.spinning)
            for key, proto in (("fp32", float_model), ("qgraph", qgraph_model), ("quantize_static", ort_model))
        }
        feeds = next(support.random_image_batches(1, 1, shape, seed=2))
        samples = support.alternate_latency(sessions, feeds, iterations=arguments.iterations)
        medians = {key: support.median(values) * 1e3 for key, values in samples.items()}
        # Paired per-round ratios: both runs of a round saw about the same machine load.
        ratios = np.array(samples["qgraph"]) / np.array(samples["quantize_static"])
        low, middle, high = np.percentile(ratios, [25, 50, 75])
        rows.append([name, medians["fp32"], medians["qgraph"], medians["quantize_static"],
                     medians["fp32"] / medians["qgraph"], medians["fp32"] / medians["quantize_static"],
                     f"{middle:.3f} [{low:.2f}–{high:.2f}]",
                     "yes" if middle <= 1.0 else ("within noise" if low <= 1.0 else "NO")])
        histograms[name] = {
            "qgraph (file)": support.operator_histogram(qgraph_model),
            "quantize_static (file)": support.operator_histogram(ort_model),
            "qgraph (as ORT runs it)": support.optimized_operator_histogram(qgraph_model, threads=arguments.threads),
            "quantize_static (as ORT runs it)": support.optimized_operator_histogram(ort_model,
                                                                                      threads=arguments.threads),
        }
        if arguments.save_models:
            folder = Path(arguments.save_models)
            folder.mkdir(parents=True, exist_ok=True)
            import onnx

            onnx.save(qgraph_model, str(folder / f"{name}.qgraph.onnx"))
            onnx.save(ort_model, str(folder / f"{name}.quantize_static.onnx"))
    support.print_table(
        "Batch-1 latency (ms, median)",
        ["model", "FP32", "qgraph", "quantize_static", "qgraph speed-up", "quantize_static speed-up",
         "qgraph / quantize_static per round: median [IQR]", "qgraph ≤ quantize_static"],
        rows,
        notes=notes,
    )
    for name, by_model in histograms.items():
        operators = sorted(set().union(*by_model.values()))
        support.print_table(
            f"Operator histogram, {name}",
            ["operator", *by_model],
            [[operator, *(by_model[key].get(operator, 0) for key in by_model)] for operator in operators],
        )


def _qgraph_proto(result):
    import onnx_ir as ir

    return ir.serde.serialize_model(result.model)


# ------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log qgraph's info messages.")
    commands = parser.add_subparsers(dest="command", required=True)

    memory = commands.add_parser("memory", help="Peak RSS of histogram calibration, one process per run.")
    memory.add_argument("--samples", type=int, nargs="+", default=[100, 1000])
    memory.add_argument("--batch-size", type=int, default=16)
    memory.add_argument("--threads", type=int, default=2)
    memory.add_argument("--model", default="resnet18")
    memory.add_argument("--quick", action="store_true", help="Entropy only (the three methods share the observer).")
    memory.add_argument("--with-ort", action="store_true", help="Also quantize_static (Entropy) on --ort-samples.")
    memory.add_argument("--ort-samples", type=int, default=100)
    memory.add_argument("--ort-only", action="store_true", help="Only the quantize_static row.")
    memory.set_defaults(handler=command_memory)

    child = commands.add_parser("_memory-child")
    child.add_argument("--quantizer", choices=["qgraph", "ort"], required=True)
    child.add_argument("--method", required=True)
    child.add_argument("--samples", type=int, required=True)
    child.add_argument("--batch-size", type=int, default=16)
    child.add_argument("--threads", type=int, default=2)
    child.add_argument("--model", default="resnet18")
    child.set_defaults(handler=_memory_child)

    speed = commands.add_parser("speed", help="Calibration time vs FP32 inference and quantize_static.")
    speed.add_argument("--samples", type=int, default=192, help="Rounded down to whole batches.")
    speed.add_argument("--batch-size", type=int, default=16)
    speed.add_argument("--threads", type=int, default=2)
    speed.add_argument("--method", default="entropy", choices=["minmax", "entropy", "percentile", "mse"])
    speed.add_argument("--rounds", type=int, default=3)
    speed.add_argument("--model", default="resnet18")
    speed.add_argument("--skip-ort", action="store_true")
    speed.add_argument("--skip-quantize", action="store_true")
    speed.add_argument("--quick", action="store_true", help="64 samples, 2 rounds.")
    speed.add_argument("--fast-paths", action="store_true",
                       help="Also time calibrate() with each optional fast path switched off alone.")
    speed.set_defaults(handler=command_speed)

    latency = commands.add_parser("latency", help="Batch-1 latency: FP32 vs qgraph vs quantize_static.")
    latency.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    latency.add_argument("--iterations", type=int, default=100)
    latency.add_argument("--threads", type=int, default=2)
    latency.add_argument("--calibration-samples", type=int, default=32)
    latency.add_argument("--spinning", action="store_true",
                         help="Let idle onnxruntime threads spin (default off: alternating sessions on 2 shared cores "
                         "steal each other's CPU).")
    latency.add_argument("--save-models", metavar="FOLDER", help="Keep both quantized models there.")
    latency.add_argument("--quick", action="store_true", help="40 iterations, 16 calibration samples.")
    latency.set_defaults(handler=command_latency)

    import bench_ptq_accuracy

    bench_ptq_accuracy.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if arguments.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if getattr(arguments, "quick", False):
        if arguments.command == "speed":
            arguments.samples, arguments.rounds = 64, 2
        elif arguments.command == "latency":
            arguments.iterations, arguments.calibration_samples = 40, 16
    np.seterr(all="ignore")
    arguments.handler(arguments)


if __name__ == "__main__":
    main()
