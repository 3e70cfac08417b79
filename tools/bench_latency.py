"""Is INT8 ever slower than FP32 here? Latency of qgraph's and onnxruntime's integer models against FP32.

For each reference model (random weights, 3×224×224, batch dimension symbolic) the same seeded calibration images
quantize it several ways, and all models run side by side in alternating rounds in one process (see
:mod:`qgraph.latency`), at batch 1 and at the calibration batch size, on ``--threads`` intra-op threads:

- ``fp32``: the model as exported (onnxruntime applies its own FP32 fusions, NCHWc layouts included);
- ``qgraph``: the *default* output of ``qgraph optimize --calib`` (``qgraph.pipeline.optimize`` with default
  :class:`~qgraph.ptq.QuantizeOptions`: target ort-cpu, MinMax, per-channel weights, the sensitivity fallback and
  the speed choice on, which picks QOperator or QDQ and the regions kept FP32 by timing them on this machine);
- ``qgraph-plain``: the same with ``--no-speed-choice`` (the target's QOperator lowering as it is);
- ``qgraph-qdq``: plain with ``--format qdq`` (onnxruntime fuses the pairs at session creation);
- ``ort-qoperator`` / ``ort-qdq``: onnxruntime's ``quantize_static`` (after ``quant_pre_process``; QUInt8
  activations, QInt8 per-channel weights, MinMax);
- ``fp32 REGION`` (``--candidates``): the speed choice's one-region candidates, qgraph's QDQ graph lowered to
  QOperator with one region class (``stem``, ``depthwise``, …) or one connected integer region (``region:NODE``)
  FP32, and ``fp32 all regions`` where the model has several;
- ``qgraph-choice`` (``--with-choice``): :func:`qgraph.speed_choice.choose_speed` called alone on qgraph's QDQ
  graph with this tool's rounds, FP32 when no integer candidate is faster (the reason is printed).

The notes give, per model, what the default's speed choice chose and the wall time of the default run beside the
plain one (their difference is what the speed choice costs).

``--reduce-range on`` builds the model meant for CPUs without VNNI (7-bit weights in both quantizers);
``auto`` follows this CPU, as qgraph's default does (quantize_static gets the same setting); ``both`` quantizes and
times every model in both settings (``off``, the VNNI setting, then ``on``) and ends with a summary table that puts
them side by side: the default qgraph output's and quantize_static QOperator's speed-up over FP32 at each batch
size, qgraph over quantize_static at batch 1, and the speed choice's candidate.

Models: ``resnet18``, ``mobilenet_v2``, ``stream_vad`` (the LSTM stand-in of :mod:`qgraph.models.stream_vad`: FP32
is its canonical model with ``sr`` fixed to 16000, calibration and timing feeds are chunks of
:func:`~qgraph.models.stream_vad.synthetic_speech` with the state carried, batched along the state's axis 1),
``mobilenet_v3`` (MobileNetV3-Large: depthwise 3x3/5x5, ReLU and
HardSwish as the opset-14 operator, squeeze-and-excitation blocks, BatchNorm kept), ``mobilenet_v3_hardsigmoid`` and
``mobilenet_v3_relu6`` (HardSwish spelled ``x·HardSigmoid(x)`` and ``x·Relu6(x+3)/6``), ``mobilenet_v3_folded``
(BatchNorm folded into the convolutions, as torch.onnx exports in eval mode), ``mobilenet_v3_small``.

``--save-models DIR`` writes every model as ``DIR/MODEL.QUANTIZER.onnx``; ``--time-only DIR`` times such a folder
without quantizing (it needs only onnx, numpy and onnxruntime, so another onnxruntime release can run it:
``OTHER_PYTHON tools/bench_latency.py --time-only DIR``). ``--profile`` adds onnxruntime's per-operator profile
(``enable_profiling``) of each model: time per operator type, and per convolution kind (stem, depthwise, pointwise,
squeeze-excite) matched in execution order. Examples::

    python tools/bench_latency.py --models mobilenet_v3 mobilenet_v2 resnet18
    python tools/bench_latency.py --models mobilenet_v3 --reduce-range on --rounds 30
    python tools/bench_latency.py --models resnet18 mobilenet_v2 mobilenet_v3 stream_vad --skip-qdq
    python tools/bench_latency.py --models mobilenet_v3 --profile
    python tools/bench_latency.py --models resnet18 mobilenet_v2 mobilenet_v3 stream_vad --reduce-range both \\
        --skip-qdq --rounds 40
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_ptq_support as support  # noqa: E402 - after the sys.path setup above

from qgraph.latency import LatencyOptions, LatencyTable, measure_latency  # noqa: E402 - after the sys.path setup above

logger = logging.getLogger("bench_latency")

MODELS = ("resnet18", "mobilenet_v2", "stream_vad", "mobilenet_v3", "mobilenet_v3_hardsigmoid",
          "mobilenet_v3_relu6", "mobilenet_v3_folded", "mobilenet_v3_small")
STREAM_VAD_LAYOUT = {"state": 1}
CONV_KINDS = ("stem", "depthwise", "pointwise", "squeeze-excite", "other")
#: ``--reduce-range both``: 8-bit weights as on a VNNI CPU, and the 7-bit weights meant for CPUs without VNNI.
SETTINGS = ("off", "on")
SETTING_LABELS = {"off": "VNNI", "on": "non-VNNI"}


# ----------------------------------------------------------------------------------------------------- models
def build_model(name: str) -> onnx.ModelProto:
    from qgraph.models.mobilenet_v3 import build_mobilenet_v3

    if name in ("resnet18", "mobilenet_v2"):
        return support.build_reference_model(name)
    if name == "stream_vad":
        return stream_vad_float_model()
    spellings = {"mobilenet_v3": "op", "mobilenet_v3_hardsigmoid": "hardsigmoid", "mobilenet_v3_relu6": "relu6",
                 "mobilenet_v3_folded": "op", "mobilenet_v3_small": "op"}
    if name not in spellings:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    layout = "mobilenet_v3_small" if name == "mobilenet_v3_small" else "mobilenet_v3_large"
    return build_mobilenet_v3(layout, hardswish=spellings[name], fold_batch_norm=name == "mobilenet_v3_folded")


def stream_vad_float_model() -> onnx.ModelProto:
    """The LSTM stream VAD canonicalised with ``sr`` fixed to 16000 (the If folded into its 16 kHz branch)."""
    import onnx_ir as ir

    from qgraph.models.stream_vad import build_stream_vad
    from qgraph.pipeline import OptimizeOptions, optimize

    result = optimize(ir.serde.deserialize_model(build_stream_vad("LSTM")), None,
                      OptimizeOptions(fixed_inputs={"sr": 16000}))
    return ir.serde.serialize_model(result.model)


def stream_vad_arrays(samples: int, seed: int) -> dict[str, np.ndarray]:
    """``samples`` streamed chunks of synthetic speech: input [N, 512] and state [2, N, 64] (sr left out)."""
    from qgraph.models.stream_vad import CHUNK_SAMPLES, build_stream_vad, stream_feeds, synthetic_speech

    seconds = (samples + 1) * CHUNK_SAMPLES[16000] / 16000
    feeds = list(stream_feeds(build_stream_vad("LSTM"), synthetic_speech(seconds, seed=seed)))[:samples]
    return {"input": np.concatenate([feed["input"] for feed in feeds]),
            "state": np.concatenate([feed["state"] for feed in feeds], axis=1)}


def calibration_source(name: str, arguments: argparse.Namespace, shape):
    """A fresh iterable of calibration batches for ``name`` (qgraph reads a dataset that knows the batch axes)."""
    if name == "stream_vad":
        from qgraph.data import DataLayout, dataset_from_arrays

        return dataset_from_arrays(stream_vad_arrays(arguments.calibration_samples, seed=1),
                                   layout=DataLayout(STREAM_VAD_LAYOUT))
    return support.random_image_batches(arguments.calibration_samples, arguments.batch_size, shape, seed=1)


def timing_feeds(name: str, batch_sizes) -> dict[int, dict[str, np.ndarray]] | None:
    """Feeds per batch size where random inputs cannot stand in (the VAD's chunk length is symbolic)."""
    if name != "stream_vad":
        return None
    arrays = stream_vad_arrays(max(batch_sizes), seed=5)
    return {size: {"input": arrays["input"][:size], "state": arrays["state"][:, :size]} for size in batch_sizes}


def qgraph_quantize(model: onnx.ModelProto, batches, *, output_format: str | None, reduce_range: str,
                    batch_size: int, speed_choice: bool = True):
    """qgraph's PTQ as ``qgraph optimize --calib … --target ort-cpu [--format F] --reduce-range R
    [--no-speed-choice]`` runs it (all other options at their defaults)."""
    import onnx_ir as ir

    from qgraph.calibrate.driver import CalibrationConfig
    from qgraph.pipeline import OptimizeOptions, optimize
    from qgraph.ptq import QuantizeOptions
    from qgraph.targets import TargetOptions

    options = OptimizeOptions(quantization=QuantizeOptions(
        target="ort-cpu",
        target_options=TargetOptions(format=output_format, reduce_range=reduce_range),
        calibration=CalibrationConfig(method="minmax", batch_size=batch_size, threads=2),
        speed_choice=speed_choice,
    ))
    return optimize(ir.serde.deserialize_model(model), None, options, calibration_data=batches)


def quantize_all(name: str, arguments: argparse.Namespace, notes: list[str]) -> dict[str, onnx.ModelProto]:
    """Every quantizer's model of ``name`` (FP32 first), calibrated on the same seeded images."""
    import onnx_ir as ir

    from qgraph.targets.cpu_features import needs_reduce_range

    float_model = build_model(name)
    shape = support.input_shape_of(float_model)

    def calibration():
        return calibration_source(name, arguments, shape)

    def ort_calibration():
        source = calibration()
        return source.iter_batches(arguments.batch_size) if hasattr(source, "iter_batches") else source

    reduce_range = arguments.reduce_range == "on" or (arguments.reduce_range == "auto" and needs_reduce_range())
    models = {"fp32": float_model}
    seconds, default = support.timed(lambda: qgraph_quantize(float_model, calibration(), output_format=None,
                                                             reduce_range=arguments.reduce_range,
                                                             batch_size=arguments.batch_size))
    models["qgraph"] = ir.serde.serialize_model(default.model)
    plain_seconds, result = support.timed(lambda: qgraph_quantize(
        float_model, calibration(), output_format="qoperator", reduce_range=arguments.reduce_range,
        batch_size=arguments.batch_size, speed_choice=False))
    models["qgraph-plain"] = ir.serde.serialize_model(result.model)
    speed = default.quantization.speed
    notes.append(f"{name}: default qgraph run {seconds:.1f} s, with --no-speed-choice {plain_seconds:.1f} s; "
                 f"speed choice: {speed.describe() if speed else 'off'}"
                 + (f" [{speed.reason}]" if speed and speed.candidate.format != "fp32" else ""))
    logger.info("%s: qgraph %.1f s, plain %.1f s", name, seconds, plain_seconds)
    if not arguments.skip_qdq:
        qdq = qgraph_quantize(float_model, calibration(), output_format="qdq", reduce_range=arguments.reduce_range,
                              batch_size=arguments.batch_size, speed_choice=False)
        models["qgraph-qdq"] = ir.serde.serialize_model(qdq.model)
    if not arguments.skip_ort:
        for quant_format in ("qoperator", "qdq"):
            models[f"ort-{quant_format}"] = support.ort_quantize_static(
                float_model, ort_calibration(), method="minmax", quant_format=quant_format,
                reduce_range=reduce_range)
    if arguments.candidates:
        models.update(region_candidates(result.quantization.qdq_model, setting=arguments.reduce_range))
    if arguments.with_choice:
        from qgraph.speed_choice import SpeedChoiceOptions, choose_speed, target_lowering
        from qgraph.targets import TargetOptions, get_target

        target = get_target("ort-cpu", TargetOptions(format="qoperator", reduce_range=arguments.reduce_range))
        options = SpeedChoiceOptions(latency=LatencyOptions(threads=arguments.threads,
                                                            batch_sizes=(1, arguments.batch_size),
                                                            rounds=arguments.choice_rounds))
        seconds, choice = support.timed(lambda: choose_speed(
            result.float_model, result.quantization.qdq_model, target_lowering(target), options,
            feeds=timing_feeds(name, (1, arguments.batch_size))))
        models["qgraph-choice"] = choice.model
        notes.append(f"{name}: qgraph-choice = {choice.candidate.name} ({seconds:.0f} s to choose): {choice.reason}")
    return models


def region_candidates(qdq_model: onnx.ModelProto, *, setting: str) -> dict[str, onnx.ModelProto]:
    """The speed choice's one-region candidates of qgraph's QDQ graph, QOperator: each region class present and, when
    the model has several connected integer regions, each of them and all of them FP32 (``fp32 NAME``)."""
    import onnx_ir as ir

    from qgraph.speed_choice import QOPERATOR, build_candidate, target_lowering
    from qgraph.speed_regions import find_integer_regions, find_regions
    from qgraph.targets import TargetOptions, get_target

    graph = ir.serde.deserialize_model(qdq_model)
    lower = target_lowering(get_target("ort-cpu", TargetOptions(format="qoperator", reduce_range=setting)))
    node_sets = {f"fp32 {name}": nodes for name, nodes in find_regions(graph).items() if nodes}
    regions = find_integer_regions(graph)
    if len(regions) > 1:
        node_sets.update({f"fp32 {name}": nodes for name, nodes in regions.items()})
        node_sets["fp32 all regions"] = frozenset().union(*regions.values())
    return {label: build_candidate(qdq_model, QOPERATOR, frozenset(nodes), lower) for label, nodes in node_sets.items()}


# ------------------------------------------------------------------------------------------------- profiling
def conv_kinds(model: onnx.ModelProto) -> list[str]:
    """The kind of each Conv of a float model, in graph order."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {info.name: [dim.dim_value for dim in info.type.tensor_type.shape.dim]
              for info in [*inferred.graph.value_info, *inferred.graph.input]}
    weights = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    inputs = {value.name for value in model.graph.input}
    kinds = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1)
        weight = weights.get(node.input[1], [])
        spatial = shapes.get(node.input[0], [])[2:]
        if node.input[0] in inputs:
            kinds.append("stem")
        elif group > 1 and len(weight) == 4 and weight[1] == 1:
            kinds.append("depthwise")
        elif spatial and all(size == 1 for size in spatial):
            kinds.append("squeeze-excite")
        elif len(weight) == 4 and weight[2:] == [1, 1]:
            kinds.append("pointwise")
        else:
            kinds.append("other")
    return kinds


def profile(model: onnx.ModelProto, batch_size: int, *, threads: int, runs: int) -> list[tuple[str, float]]:
    """(operator, median µs) for each node onnxruntime ran, in execution order (onnxruntime's session profiling)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory() as folder:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        shape = [batch_size if not isinstance(dim, int) else dim for dim in session.get_inputs()[0].shape]
        feeds = {session.get_inputs()[0].name: np.random.default_rng(2).standard_normal(shape).astype(np.float32)}
        warmup = 5
        for _ in range(warmup + runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    run_starts = [event["ts"] for event in events if event.get("name") == "model_run"]
    first = run_starts[warmup]
    durations: dict[str, list[float]] = collections.defaultdict(list)
    operators: dict[str, str] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= first:
            durations[event["name"]].append(event["dur"])
            operators[event["name"]] = event["args"]["op_name"]
    return [(operators[name], float(np.median(values))) for name, values in durations.items()]


def print_profiles(name: str, models: dict[str, onnx.ModelProto], arguments: argparse.Namespace) -> None:
    kinds = conv_kinds(models["fp32"])
    profiles = {quantizer: profile(model, 1, threads=arguments.threads, runs=arguments.profile_runs)
                for quantizer, model in models.items()}
    operators = sorted({operator for nodes in profiles.values() for operator, _ in nodes})
    rows = []
    for operator in operators:
        row = [operator]
        for nodes in profiles.values():
            times = [duration for op, duration in nodes if op == operator]
            row.append(f"{sum(times):.0f} ({len(times)})" if times else "")
        rows.append(row)
    rows.append(["sum of nodes", *(f"{sum(d for _, d in nodes):.0f}" for nodes in profiles.values())])
    support.print_table(f"Profile, {name}, batch 1: µs per operator type (node count)", ["operator", *profiles], rows,
                        notes=[("onnxruntime session profiling, median per node over the runs; the profiler's own "
                                "cost is in every number.")])
    rows = []
    for kind in CONV_KINDS:
        if kind not in kinds:
            continue
        row = [f"{kind} ({kinds.count(kind)})"]
        for nodes in profiles.values():
            convs = [duration for op, duration in nodes if op in ("Conv", "QLinearConv", "FusedConv")]
            row.append(f"{sum(d for d, k in zip(convs, kinds) if k == kind):.0f}" if len(convs) == len(kinds) else "")
        rows.append(row)
    support.print_table(f"Profile, {name}, batch 1: µs per convolution kind", ["convolutions", *profiles], rows,
                        notes=[("Matched in execution order; blank where the model runs a different number of "
                                "convolution kernels (FP32 regions).")])


# ------------------------------------------------------------------------------------------------------ tables
def print_latency(name: str, table: LatencyTable) -> None:
    rows = []
    for quantizer in table.models:
        row = [quantizer]
        for batch_size in table.batch_sizes:
            speedup = table.speedup(quantizer, batch_size)
            row += [table.fast_quartile_seconds(quantizer, batch_size) * 1e3, f"{speedup.fast_quartile:.2f}×",
                    f"{speedup.median:.2f} [{speedup.low:.2f}–{speedup.high:.2f}]"]
        rows.append(row)
    headers = ["model"]
    for batch_size in table.batch_sizes:
        headers += [f"b{batch_size} ms (q25)", f"b{batch_size} vs FP32", f"b{batch_size} paired [IQR]"]
    support.print_table(f"Latency, {name}", headers, rows)


def time_models(name: str, models: dict[str, onnx.ModelProto | str], arguments: argparse.Namespace) -> LatencyTable:
    options = LatencyOptions(threads=arguments.threads, batch_sizes=(1, arguments.batch_size),
                             rounds=arguments.rounds, warmup=arguments.warmup)
    return measure_latency(models, options, reference="fp32", feeds=timing_feeds(name, options.batch_sizes))


def environment_note(arguments: argparse.Namespace) -> str:
    import onnxruntime as ort

    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model_name = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                           if line.startswith("model name")), "?")
        found = sorted({flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
                        if f" {flag}" in text})
        flags = f"{model_name}, {' '.join(found)}"
    except OSError:
        flags = "?"
    return (f"onnxruntime {ort.__version__}; CPU {flags}; {arguments.threads} threads, intra-op spinning off, "
            f"ORT_ENABLE_ALL; {arguments.rounds} alternating rounds after {arguments.warmup} warm-up runs; "
            f"'ms (q25)' is the first quartile of the run times, 'vs FP32' the ratio of first quartiles, 'paired' "
            f"the median [quartiles] of per-round ratios; load average {support.load_average()}.")


def run_time_only(arguments: argparse.Namespace) -> None:
    """Time DIR/MODEL.QUANTIZER.onnx, or each DIR/reduce_range_SETTING folder that ``--save-models`` wrote with
    ``--reduce-range both`` (then with the summary of both settings side by side)."""
    folder = Path(arguments.time_only)
    setting_folders = {path.name[len("reduce_range_"):]: path for path in sorted(folder.glob("reduce_range_*"))
                       if path.is_dir()} or {arguments.reduce_range: folder}
    summary: dict[str, dict[str, tuple[LatencyTable, str]]] = collections.defaultdict(dict)
    for setting, setting_folder in setting_folders.items():
        grouped: dict[str, dict[str, str]] = collections.defaultdict(dict)
        for path in sorted(setting_folder.glob("*.onnx")):
            model_name, quantizer = path.name[: -len(".onnx")].split(".", 1)
            grouped[model_name][quantizer] = str(path)
        for name, paths in grouped.items():
            if "fp32" not in paths:
                raise SystemExit(f"{setting_folder}: no {name}.fp32.onnx to compare against")
            ordered = {"fp32": paths.pop("fp32"), **paths}
            table = time_models(name, ordered, arguments)
            print_latency(f"{name}, --reduce-range {setting}" if len(setting_folders) > 1 else name, table)
            if "qgraph" in table.models:
                summary[name][setting] = (table, "")
    if summary and all(len(by_setting) == len(setting_folders) for by_setting in summary.values()):
        print_summary(summary, tuple(setting_folders))
    print(f"\n{environment_note(arguments)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "mobilenet_v3"], choices=MODELS)
    parser.add_argument("--reduce-range", default="auto", choices=["auto", "on", "off", "both"],
                        help="'both': each model in both settings (off: VNNI, on: non-VNNI), summary side by side.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="Calibration batch size, also timed.")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--choice-rounds", type=int, default=12, help="Rounds of each speed-choice measurement.")
    parser.add_argument("--skip-ort", action="store_true", help="Leave out quantize_static.")
    parser.add_argument("--with-choice", action="store_true", help="Add qgraph-choice (choose_speed called alone).")
    parser.add_argument("--skip-qdq", action="store_true", help="Leave out qgraph-qdq.")
    parser.add_argument("--candidates", action="store_true",
                        help="Add the speed choice's one-region candidates (each region class, each connected integer "
                        "region FP32) to the table.")
    parser.add_argument("--profile", action="store_true", help="Add onnxruntime's per-operator profiles.")
    parser.add_argument("--profile-runs", type=int, default=30)
    parser.add_argument("--save-models", metavar="DIR")
    parser.add_argument("--time-only", metavar="DIR", help="Time DIR/MODEL.QUANTIZER.onnx files; no quantizing.")
    parser.add_argument("--verbose", action="store_true")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if arguments.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    if arguments.time_only:
        run_time_only(arguments)
        return
    settings = SETTINGS if arguments.reduce_range == "both" else (arguments.reduce_range,)
    notes: list[str] = []
    summary: dict[str, dict[str, tuple[LatencyTable, str]]] = collections.defaultdict(dict)
    for name in arguments.models:
        for setting in settings:
            start = time.perf_counter()
            setting_arguments = argparse.Namespace(**{**vars(arguments), "reduce_range": setting})
            setting_notes = [f"--reduce-range {setting}"]
            models = quantize_all(name, setting_arguments, setting_notes)
            notes += [f"[--reduce-range {setting}] {note}" for note in setting_notes[1:]]
            if arguments.save_models:
                folder = Path(arguments.save_models) / (f"reduce_range_{setting}" if len(settings) > 1 else "")
                folder.mkdir(parents=True, exist_ok=True)
                for quantizer, model in models.items():
                    onnx.save(model, os.fspath(folder / f"{name}.{quantizer}.onnx"))
            table = time_models(name, models, setting_arguments)
            print_latency(f"{name}, --reduce-range {setting}", table)
            summary[name][setting] = (table, _choice_of(setting_notes))
            if arguments.profile:
                print_profiles(name, models, setting_arguments)
            logger.info("%s (--reduce-range %s) done in %.0f s", name, setting, time.perf_counter() - start)
    print_summary(summary, settings)
    support.print_table("Notes", ["note"], [[note] for note in notes])
    print(f"\n{environment_note(arguments)}")


def _choice_of(setting_notes: list[str]) -> str:
    """The speed choice's candidate named in quantize_all's note ("… speed choice: CANDIDATE at …")."""
    note = next((note for note in setting_notes if "speed choice: " in note), "")
    text = note.split("speed choice: ", 1)[1] if note else ""
    if text.startswith("WARNING: FP32 kept"):
        return "fp32 (every integer candidate slower)"
    return text.split(" at ", 1)[0]


def print_summary(summary: dict[str, dict[str, tuple[LatencyTable, str]]], settings) -> None:
    """One row per model: for each setting, the default qgraph output's and quantize_static QOperator's speed-up
    over FP32 at each batch size (ratio of first quartiles, same run), qgraph over quantize_static, the choice."""
    headers = ["model"]
    rows = []
    for setting in settings:
        label = SETTING_LABELS.get(setting, f"--reduce-range {setting}")
        sizes = next(iter(summary.values()))[setting][0].batch_sizes
        headers += [f"{label}: qgraph b{size}" for size in sizes]
        headers += [f"{label}: ort-qop b{size}" for size in sizes]
        headers += [f"{label}: qgraph/ort-qop b{sizes[0]}", f"{label}: choice"]
    for name, by_setting in summary.items():
        row = [name]
        for setting in settings:
            table, choice = by_setting[setting]
            has_ort = "ort-qoperator" in table.models
            row += [f"{table.speedup('qgraph', size).fast_quartile:.2f}×" for size in table.batch_sizes]
            row += [f"{table.speedup('ort-qoperator', size).fast_quartile:.2f}×" if has_ort else ""
                    for size in table.batch_sizes]
            row.append(f"{table.speedup('qgraph', table.batch_sizes[0], reference='ort-qoperator').fast_quartile:.2f}×"
                       if has_ort else "")
            row.append(choice)
        rows.append(row)
    support.print_table("Summary: default qgraph output and quantize_static QOperator vs FP32, both settings side by "
                        "side", headers, rows,
                        notes=["speed-up = q25(FP32) / q25(model) of the same alternating rounds; qgraph/ort-qop is "
                               "q25(ort-qoperator) / q25(qgraph) at batch 1 (>= 1: qgraph at least as fast)."])

if __name__ == "__main__":
    main()
