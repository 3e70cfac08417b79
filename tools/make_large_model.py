"""Build a synthetic model over 2 GB and push it through qgraph, measuring time and peak memory per phase.

The model is a chain of 1×1 Conv + BatchNormalization + Relu blocks with ``channels``² float32 weights each
(defaults: 9 blocks of 8192 channels: 2.25 GiB, 2.42 GB of weights, over protobuf's 2 GiB limit). Its tensors are
written straight into one external data file, one tensor at a time, and the graph proto refers to them by offset: no
protobuf over 2 GB ever exists in memory, and at most one weight is held while building.

Then, in this process: ``load_model`` (external tensors memory-mapped), the canonical pipeline (BatchNorm must fold
into every Conv), and ``save_model`` with external data. Peak resident memory is measured per phase from
``/proc/self/status`` (VmHWM, reset between phases through ``/proc/self/clear_refs``); the whole-process peak is the
largest of them (``ru_maxrss`` follows the same reset on Linux, so it only covers the last phase). ``--verify`` runs the
original and the result in onnxruntime in a child process (its own peak reported) and compares the outputs.

Usage::

    python tools/make_large_model.py --folder /tmp/qgraph-large            # build, optimize, report, delete
    python tools/make_large_model.py --folder /tmp/qgraph-large --keep --verify
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def read_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class Phases:
    """Times each phase and records its peak RSS."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, float]] = []

    def run(self, name: str, function, *args, **kwargs):
        resettable = reset_peak()
        start = time.perf_counter()
        result = function(*args, **kwargs)
        seconds = time.perf_counter() - start
        peak = read_status_kib("VmHWM") / 2**20 if resettable else float("nan")
        self.rows.append((name, seconds, peak, read_status_kib("VmRSS") / 2**20))
        print(f"  {name}: {seconds:.1f} s, peak RSS {peak:.2f} GiB", flush=True)
        return result

    def table(self) -> str:
        lines = [f"{'phase':<38} {'time (s)':>9} {'peak RSS (GiB)':>15} {'RSS after (GiB)':>16}", "-" * 81]
        for name, seconds, peak, after in self.rows:
            lines.append(f"{name:<38} {seconds:>9.1f} {peak:>15.2f} {after:>16.2f}")
        return "\n".join(lines)


def _external_tensor(name: str, array: np.ndarray, data_file, location: str) -> TensorProto:
    offset = data_file.tell()
    data_file.write(array.tobytes())
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def build(folder: Path, *, blocks: int, channels: int, seed: int = 0) -> Path:
    """Write ``model.onnx`` + ``model.onnx.data`` into ``folder``; returns the model path."""
    folder.mkdir(parents=True, exist_ok=True)
    location = "model.onnx.data"
    generator = np.random.default_rng(seed)
    nodes, initializers = [], []
    value = "input"
    with open(folder / location, "wb") as data_file:
        for block in range(blocks):
            weight = generator.standard_normal((channels, channels, 1, 1), dtype=np.float32)
            weight *= np.float32(1.0 / np.sqrt(channels))
            initializers.append(_external_tensor(f"conv{block}.weight", weight, data_file, location))
            del weight
            statistics = {
                "scale": generator.uniform(0.5, 1.5, channels),
                "bias": generator.standard_normal(channels) * 0.1,
                "mean": generator.standard_normal(channels) * 0.1,
                "var": generator.uniform(0.5, 2.0, channels),
            }
            for key, array in statistics.items():
                initializers.append(
                    _external_tensor(f"bn{block}.{key}", array.astype(np.float32), data_file, location)
                )
            nodes += [
                helper.make_node("Conv", [value, f"conv{block}.weight"], [f"conv{block}"], name=f"conv{block}"),
                helper.make_node(
                    "BatchNormalization",
                    [f"conv{block}"] + [f"bn{block}.{key}" for key in ("scale", "bias", "mean", "var")],
                    [f"bn{block}"],
                    name=f"bn{block}",
                ),
                helper.make_node("Relu", [f"bn{block}"], [f"relu{block}"], name=f"relu{block}"),
            ]
            value = f"relu{block}"
    nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        nodes,
        "large_conv_bn_chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, 2, 2])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, channels, 2, 2])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "model.onnx"
    onnx.save(model, os.fspath(path))  # the proto holds only references: a few kilobytes
    return path


def canonical_pass_names() -> tuple[str, ...]:
    from qgraph.passes.infrastructure import available_passes
    from qgraph.pipeline import CANONICAL_PASSES

    available = available_passes()
    missing = [name for name in CANONICAL_PASSES if name not in available]
    if missing:
        print(f"  note: passes not available yet, skipped: {', '.join(missing)}")
    return tuple(name for name in CANONICAL_PASSES if name in available)


def verify_child(original: str, optimized: str) -> None:
    """In a child process: run both models in onnxruntime and print the comparison as JSON."""
    from qgraph import runtime

    feeds = None
    outputs = []
    for path in (original, optimized):
        session = runtime.create_session(path)
        feeds = feeds or runtime.random_inputs(session, seed=0)
        outputs.append(runtime.run(session, feeds)["output"])
        del session
    difference = float(np.max(np.abs(outputs[0] - outputs[1])))
    scale = float(np.max(np.abs(outputs[0])))
    print(json.dumps({"max_abs_difference": difference, "max_abs_output": scale,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/qgraph-large-model"))
    parser.add_argument("--blocks", type=int, default=9)
    parser.add_argument("--channels", type=int, default=8192)
    parser.add_argument("--keep", action="store_true", help="keep the files (default: delete them at the end)")
    parser.add_argument("--verify", action="store_true", help="compare original and result in onnxruntime")
    parser.add_argument("--verify-child", nargs=2, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.verify_child:
        verify_child(*arguments.verify_child)
        return 0

    from qgraph.ir import load_model, save_model
    from qgraph.passes.infrastructure import PassManager, get_pass

    folder: Path = arguments.folder
    if folder.exists():
        shutil.rmtree(folder)
    phases = Phases()
    total_start = time.perf_counter()
    try:
        print(f"building {arguments.blocks} Conv+BN blocks of {arguments.channels} channels in {folder}", flush=True)
        source = phases.run("build (external data, streamed)", build, folder / "source",
                            blocks=arguments.blocks, channels=arguments.channels)
        data_bytes = (folder / "source" / "model.onnx.data").stat().st_size
        print(f"  model.onnx: {source.stat().st_size} bytes, "
              f"model.onnx.data: {data_bytes / 2**30:.2f} GiB ({data_bytes / 1e9:.2f} GB)")

        import onnx_ir

        plain = phases.run("onnx_ir.load (what embedders call)", onnx_ir.load, source)
        del plain
        model = phases.run("qgraph load_model", load_model, source)
        batch_norms_before = sum(node.op_type == "BatchNormalization" for node in model.graph)
        names = canonical_pass_names()
        manager = PassManager([get_pass(name)() for name in names], fixed_point=True)
        result = phases.run("canonicalize (" + str(len(names)) + " passes, fixed point)", manager.run, model)
        operators = [node.op_type for node in result.model.graph]
        batch_norms_after = operators.count("BatchNormalization")
        (folder / "optimized").mkdir()
        output = folder / "optimized" / "model.onnx"
        phases.run("qgraph save_model (external data)", save_model, result.model, output, external_data=True)
        del model, result
        out_data = output.with_name("model.onnx.data")
        print(f"  output: {output.stat().st_size} bytes + {out_data.stat().st_size / 2**30:.2f} GiB of data")

        # Per-pass time from the records is kept short: the slowest passes.
        reloaded = onnx.load(os.fspath(output), load_external_data=False)
        print(f"  operators after: {sorted(set(n.op_type for n in reloaded.graph.node))}; "
              f"BatchNormalization {batch_norms_before} -> {batch_norms_after}")
        if batch_norms_after:
            print("  ERROR: BatchNormalization did not fold", flush=True)

        verification = None
        if arguments.verify:
            start = time.perf_counter()
            completed = subprocess.run(
                [sys.executable, __file__, "--verify-child", os.fspath(source), os.fspath(output)],
                capture_output=True, text=True, check=True,
            )
            verification = json.loads(completed.stdout.strip().splitlines()[-1])
            phases.rows.append(("onnxruntime verify (child, both)", time.perf_counter() - start,
                                verification["peak_rss_gib"], float("nan")))
            print(f"  verify: {verification}")
    finally:
        if not arguments.keep:
            shutil.rmtree(folder, ignore_errors=True)

    print()
    print(phases.table())
    peak = max(row[2] for row in phases.rows if not row[0].startswith("onnxruntime"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"{'qgraph process peak RSS (max of phases)':<38} {'':>9} {peak:>15.2f}")
    print(f"{'largest child peak RSS (ru_maxrss)':<38} {'':>9} {children:>15.2f}")
    print(f"{'total wall time (s)':<38} {time.perf_counter() - total_start:>9.1f}")
    print(f"data: {data_bytes / 2**30:.2f} GiB ({data_bytes:,} bytes) of tensors; "
          f"BatchNormalization {batch_norms_before} -> {batch_norms_after}")
    return 1 if batch_norms_after else 0


if __name__ == "__main__":
    sys.exit(main())
