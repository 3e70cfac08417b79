"""BERT-base latency: FP32 against qgraph INT8 (static and dynamic activations) and onnxruntime's quantizers.

The model is :func:`qgraph.models.bert.build_bert` at BERT-base shape (12 layers, hidden 768, 12 heads, intermediate
3072) with random weights (speed does not depend on them), written as the TorchScript exporter writes it. Every
variant runs in onnxruntime with full graph optimisation and ``--threads`` intra-op threads; the variants are timed
side by side (one run of each per round, rounds repeated), so that a machine shared with other work slows them
alike. The table gives the best and the median time of each, its file's size, and the speed-up over FP32 and over
the faster of onnxruntime's ``quantize_dynamic`` (int8 weights per tensor, the tool's default) and
``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, min-max calibration), both applied to the same
FP32 file.

    python tools/bench_bert.py [--batch 1 8] [--sequence 128] [--threads 2] [--rounds 30] [--reduce-range on]
                               [--clock cpu] [--spinning off] [--save FOLDER [--reuse]] [--layers 12]
                               [--speed-choice on]
                               [--profile] [--variants fp32 ort-dynamic ort-static qgraph-static qgraph-dynamic
                                                      qgraph-static-fast qgraph-dynamic-fast]

``--reduce-range on`` quantizes with 7-bit weights (qgraph's ``--reduce-range on``, onnxruntime's
``reduce_range=True``): the model for x86 CPUs without VNNI, run here. The ``-fast`` variants are qgraph with
``TargetOptions(transformer_kernels="fast")``: each attention block one com.microsoft QAttention and the FFN's GELU
as FastGelu (same accuracy to FP32, outside deploy parity with the QDQ simulation; docs/runtime-facts.md).
``qgraph-default`` is qgraph's defaults (min-max calibration, the sensitivity search, transformer kernels auto,
which takes the fast ones where they hold against FP32), the model a user gets from ``qgraph optimize``.
qgraph's speed choice (timing its candidate formats while quantizing) is off by default here: on a machine shared
with other work it picked formats by noise (the QDQ format, once FP32), so the table would time whatever it met;
``--speed-choice on`` runs it as a user's ``qgraph optimize`` does and logs what it picked.
``--clock cpu`` times each run by the CPU time of this process (all of onnxruntime's threads) with its worker threads
sleeping instead of spinning when idle: on a machine shared with other work, where wall times of one model moved by
up to 7x between runs, CPU time counts the work a run needs rather than the moments it waited for a core.
``--profile`` prints, per variant and batch, onnxruntime's kernel time per operator type (the median over the
profiled runs, the ``enable_profiling`` trace).
``--spinning off`` (the default with ``--clock cpu``) lets onnxruntime's idle worker threads sleep instead of spin
(``session.intra_op.allow_spinning``); with ``--clock wall`` it times what a deployment with spinning off waits for.
On the 2-vCPU machine of docs/runtime-facts.md, spinning threads put qgraph's static-fast model at 1.30× the faster
onnxruntime quantizer by best times and 1.11× by medians in one run (threads spinning for a core the other variant's
threads held); with spinning off best and median agreed within 2% in every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir

from qgraph import runtime
from qgraph.calibrate.driver import CalibrationConfig
from qgraph.ir.load import load_model
from qgraph.models.bert import BERT_LAYOUTS, BertOptions, build_bert, example_inputs
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions
from qgraph.targets import TargetOptions

logger = logging.getLogger("bench_bert")

VARIANTS = ("fp32", "ort-dynamic", "ort-static", "qgraph-default", "qgraph-static", "qgraph-dynamic",
            "qgraph-static-fast", "qgraph-dynamic-fast")
_ORT_VARIANTS = ("ort-dynamic", "ort-static")


def calibration_batches(layout, sequence: int, count: int = 4, batch: int = 4) -> list[dict[str, np.ndarray]]:
    return [example_inputs(layout, batch, sequence, seed=100 + index) for index in range(count)]


def qgraph_variant(path: str, batches, activations: str, reduce_range: str, *,
                   transformer_kernels: str = "exact", speed_choice: bool = False) -> onnx.ModelProto:
    """The FP32 file loaded as ``qgraph optimize`` loads it (with shape inference), then quantized and lowered for
    ort-cpu with ``transformer_kernels`` ("exact": the default lowering, "fast": QAttention and FastGelu too)."""
    target_options = TargetOptions(reduce_range=reduce_range, transformer_kernels=transformer_kernels)
    options = OptimizeOptions(quantization=QuantizeOptions(
        target_options=target_options, activations=activations, min_sqnr=None,
        calibration=CalibrationConfig(method="minmax"), speed_choice=speed_choice,
    ))
    result = optimize(load_model(path), None, options, calibration_data=batches)
    assert result.quantization is not None
    if result.quantization.speed is not None:
        logger.info("qgraph %s: %s", activations, result.quantization.speed.describe())
    return ir.serde.serialize_model(result.model)


def qgraph_default_variant(path: str, batches, reduce_range: str, *, speed_choice: bool = False) -> onnx.ModelProto:
    """``qgraph optimize``'s defaults (static activations, the default calibration method and search, the
    transformer kernels auto): what a user who passes only ``--reduce-range`` gets."""
    options = OptimizeOptions(quantization=QuantizeOptions(
        target_options=TargetOptions(reduce_range=reduce_range), speed_choice=speed_choice))
    result = optimize(load_model(path), None, options, calibration_data=batches)
    assert result.quantization is not None
    if result.quantization.kernels is not None:
        logger.info("qgraph default: transformer kernels %s", result.quantization.kernels.reason)
    return ir.serde.serialize_model(result.model)


def ort_variant(path: str, output: str, kind: str, batches, reduce_range: bool) -> str:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if kind == "ort-dynamic":
        quantize_dynamic(path, output, weight_type=QuantType.QInt8, reduce_range=reduce_range)
        return output

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    quantize_static(path, output, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range)
    return output


def time_side_by_side(sessions: dict, feeds: dict, rounds: int, clock: Callable[[], float] = time.perf_counter
                      ) -> dict[str, list[float]]:
    for session in sessions.values():
        for _ in range(2):
            session.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            start = clock()
            session.run(None, feeds)
            times[name].append(clock() - start)
    return times


def profile_by_op_type(path: str, feeds: dict, threads: int, runs: int = 10) -> dict[str, float]:
    """Median kernel seconds per run of each operator type over ``runs`` profiled runs (after two unprofiled ones)."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.gettempdir(), "bench_bert_profile")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for _ in range(2 + runs):
        session.run(None, feeds)
    trace = session.end_profiling()
    with open(trace) as handle:
        events = json.load(handle)
    os.remove(trace)
    run_spans = [(event["ts"], event["ts"] + event["dur"]) for event in events if event.get("name") == "model_run"][2:]
    per_run: list[dict[str, float]] = [{} for _ in run_spans]
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        for index, (start, end) in enumerate(run_spans):
            if start <= event["ts"] <= end:
                op_type = event["args"]["op_name"]
                per_run[index][op_type] = per_run[index].get(op_type, 0.0) + event["dur"] * 1e-6
                break
    op_types = {op_type for run in per_run for op_type in run}
    return {op_type: float(np.median([run.get(op_type, 0.0) for run in per_run])) for op_type in op_types}


def print_profiles(paths: dict[str, str], feeds: dict, threads: int) -> None:
    for name, path in paths.items():
        profile = profile_by_op_type(path, feeds, threads)
        total = sum(profile.values())
        print(f"  {name}: kernel time {total * 1e3:.1f} ms (median per op type over 10 profiled runs)")
        for op_type, seconds in sorted(profile.items(), key=lambda item: -item[1])[:12]:
            print(f"    {op_type:<26} {seconds * 1e3:8.2f} ms {100 * seconds / total:5.1f}%")


def cosine(reference: np.ndarray, other: np.ndarray) -> float:
    a, b = reference.reshape(len(reference), -1), other.reshape(len(other), -1)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))


def build_variants(arguments, layout, folder: str) -> dict[str, str]:
    paths = {"fp32": os.path.join(folder, "fp32.onnx")}
    if not (arguments.reuse and os.path.exists(paths["fp32"])):
        onnx.save(build_bert(layout, options=BertOptions()), paths["fp32"])
    batches = calibration_batches(layout, arguments.sequence)
    reduce_range = arguments.reduce_range == "on"
    builders: dict[str, Callable[[], str]] = {}
    for kind in _ORT_VARIANTS:
        builders[kind] = lambda kind=kind: ort_variant(paths["fp32"], os.path.join(folder, f"{kind}.onnx"), kind,
                                                       batches, reduce_range)
    for activations in ("static", "dynamic"):
        for suffix, kernels in (("", "exact"), ("-fast", "fast")):
            def build(activations=activations, suffix=suffix, kernels=kernels) -> str:
                path = os.path.join(folder, f"qgraph-{activations}{suffix}.onnx")
                onnx.save(qgraph_variant(paths["fp32"], batches, activations, arguments.reduce_range,
                                         transformer_kernels=kernels, speed_choice=arguments.speed_choice == "on"),
                          path)
                return path
            builders[f"qgraph-{activations}{suffix}"] = build
    def build_default() -> str:
        path = os.path.join(folder, "qgraph-default.onnx")
        onnx.save(qgraph_default_variant(paths["fp32"], batches, arguments.reduce_range,
                                         speed_choice=arguments.speed_choice == "on"), path)
        return path
    builders["qgraph-default"] = build_default
    for name in arguments.variants:
        if name == "fp32":
            continue
        if arguments.reuse and os.path.exists(os.path.join(folder, f"{name}.onnx")):
            paths[name] = os.path.join(folder, f"{name}.onnx")
            logger.info("reusing %s", paths[name])
            continue
        start = time.perf_counter()
        paths[name] = builders[name]()
        logger.info("built %s in %.1f s", name, time.perf_counter() - start)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--reduce-range", choices=("auto", "on", "off"), default="off")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: the process's CPU time with onnxruntime's spinning off")
    parser.add_argument("--spinning", choices=("on", "off"),
                        help="onnxruntime's worker threads spin while idle (default: on with --clock wall, off "
                             "with cpu)")
    parser.add_argument("--save", metavar="FOLDER", help="keep the models there (fp32.onnx, qgraph-static.onnx, …)")
    parser.add_argument("--reuse", action="store_true", help="time the models already in --save FOLDER")
    parser.add_argument("--speed-choice", choices=("on", "off"), default="off",
                        help="qgraph's timed choice of output format (off: always the ort-cpu lowering)")
    parser.add_argument("--profile", action="store_true", help="print onnxruntime's kernel time per operator type")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("qgraph", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)  # onnxruntime's quantizer configures the root logger before this one logs
    layout = dataclasses.replace(BERT_LAYOUTS["bert_base"], layers=arguments.layers)
    if "fp32" not in arguments.variants:
        arguments.variants.insert(0, "fp32")
    with tempfile.TemporaryDirectory() as scratch:
        folder = arguments.save or scratch
        os.makedirs(folder, exist_ok=True)
        paths = build_variants(arguments, layout, folder)
        cpu = arguments.clock == "cpu"
        spinning = not cpu if arguments.spinning is None else arguments.spinning == "on"
        sessions = {name: runtime.create_session(path, optimize=True, threads=arguments.threads, spinning=spinning)
                    for name, path in paths.items()}
        print(f"BERT-base shape ({layout.layers} layers, hidden {layout.hidden}, {layout.heads} heads), sequence "
              f"{arguments.sequence}, {arguments.threads} threads, reduce-range {arguments.reduce_range}, "
              f"{arguments.rounds} rounds side by side, {arguments.clock} time, spinning {'on' if spinning else 'off'}")
        for batch in arguments.batch:
            feeds = example_inputs(layout, batch, arguments.sequence, seed=7)
            reference = sessions["fp32"].run(["last_hidden_state"], feeds)[0]
            clock = time.process_time if cpu else time.perf_counter
            times = time_side_by_side(sessions, feeds, arguments.rounds, clock)
            best = {name: min(values) for name, values in times.items()}
            median = {name: float(np.median(values)) for name, values in times.items()}
            ort_best = min((best[name] for name in _ORT_VARIANTS if name in best), default=None)
            ort_median = min((median[name] for name in _ORT_VARIANTS if name in median), default=None)
            print(f"\nbatch {batch}")
            print(f"{'variant':<20} {'best ms':>9} {'median ms':>10} {'× FP32':>7} {'× best ORT':>10} "
                  f"{'(medians)':>9} {'cosine':>8} {'file MB':>8}")
            for name in times:
                output = sessions[name].run(["last_hidden_state"], feeds)[0]
                versus_ort = (f"{ort_best / best[name]:>10.2f} {ort_median / median[name]:>9.2f}" if ort_best
                              else f"{'':>10} {'':>9}")
                print(f"{name:<20} {best[name] * 1e3:>9.1f} {median[name] * 1e3:>10.1f} "
                      f"{best['fp32'] / best[name]:>7.2f} {versus_ort} {cosine(reference, output):>8.4f} "
                      f"{os.path.getsize(paths[name]) / 1e6:>8.1f}")
            if arguments.profile:
                print_profiles(paths, feeds, arguments.threads)


if __name__ == "__main__":
    main()
