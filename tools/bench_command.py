"""``qgraph optimize`` as a whole process, as a user runs it: wall time against FP32 inference, and peak RSS.

For each sample count (default 100 and 1000) it writes a calibration ``.npz`` of random 3×224×224 images for the
ResNet-18 reference layout, then runs, each in a fresh subprocess measured with ``resource.getrusage(
RUSAGE_CHILDREN)`` (peak RSS of that child, user and system CPU) and a wall clock:

- ``qgraph optimize model.onnx -o out.onnx --calib calib.npz --method METHOD`` (the default search on);
- FP32 inference over the same samples in a fresh process (load the file, one optimised onnxruntime session,
  the same batch size), the baseline the goal compares with: command ≤ 1.25× FP32.

Both run with Python's bytecode cache on, as on a user's machine (``PYTHONDONTWRITEBYTECODE`` is dropped from their
environment, and one untimed import of the command writes qgraph's cache first): with it off, as in some sandboxes,
every run compiles qgraph's modules again (0.17 s here).

The runs alternate (command, FP32, command, FP32, …) and the medians are reported, since the cores are shared;
the CPU-time ratio beside the wall-time one moves less when another process takes a core from one run only.
The table also gives the peak RSS at the largest count relative to the smallest (goal: within 10%). Every run
prints a progress line to stderr as it ends (under load one command can take minutes), each run has a time limit
(``--timeout``; a run past it is reported and the table shows what finished), and ``--profile`` runs the command
once more under cProfile and prints where its time goes by phase (imports, loading, calibration,
range check, sensitivity search, bias correction, QDQ, lowering, speed choice, report, saving)::

    python tools/bench_command.py                          # percentile, 100 and 1000 samples, 3 repeats
    python tools/bench_command.py --method entropy --samples 1000 --repeats 1 --profile
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

_FP32_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
data = np.load(sys.argv[2])["input"]
options = ort.SessionOptions()
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
batch = int(sys.argv[3])
for start in range(0, len(data), batch):
    session.run(None, {"input": data[start:start + batch]})
"""


def measure(command: list[str], timeout: float | None = None) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one subprocess (its own getrusage, children only)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{' '.join(command)} ran past {timeout:.0f} s") from None
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{completed.stderr[-2000:]}")
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: children run one at a time, largest last wins
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "rss_mb": after.ru_maxrss / 1024.0}


def _peak_of_one(command: list[str], timeout: float) -> dict[str, float] | None:
    """``measure`` in a fresh Python parent, so that ``ru_maxrss`` is this child's alone; None past ``timeout``."""
    wrapper = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_command as b; "
               "print(json.dumps(b.measure(sys.argv[3:], float(sys.argv[2]))))")
    completed = subprocess.run([sys.executable, "-c", wrapper, str(Path(__file__).parent), str(timeout), *command],
                               capture_output=True, text=True)
    if completed.returncode != 0:
        print(completed.stderr[-2000:], file=sys.stderr, flush=True)
        return None
    return json.loads(completed.stdout.strip().splitlines()[-1])


#: Phases of ``qgraph optimize``: (phase, the end of a file name, a function in it); a phase's time is that
#: function's cumulative time (the largest, when several functions match), ``~`` names onnxruntime's built-ins.
PHASES = (
    ("imports", "qgraph/cli/optimize.py", "<module>"),
    ("loading", "qgraph/ir/load.py", "load_model"),
    ("calibration", "qgraph/calibrate/driver.py", "calibrate"),
    ("range check", "qgraph/range_check.py", "check_ranges"),
    ("sensitivity search", "qgraph/ptq.py", "_fall_back"),
    ("bias correction", "qgraph/ptq.py", "_correct_biases"),
    ("lowering", "qgraph/ptq.py", "lower_to_target"),
    ("speed choice", "qgraph/ptq.py", "choose_output_speed"),
    ("quantize (all of PTQ)", "qgraph/ptq.py", "quantize"),
    ("report", "qgraph/report.py", "build_report"),
    ("saving", "qgraph/ir/save.py", "save_model"),
    ("session builds", "qgraph/runtime.py", "create_session"),
    ("onnxruntime runs", "~", "onnxruntime"),
)


def profile_phases(command: list[str], folder: Path, timeout: float) -> list[tuple[str, float, int]]:
    """The command once under cProfile: (phase, cumulative seconds, calls) per phase of :data:`PHASES`, and the
    profiled wall time; phases nest (calibration lies inside PTQ), so the rows do not add up."""
    import pstats

    output = folder / "command.prof"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(output), *command], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=timeout, check=True)
    wall = time.perf_counter() - started
    # {(file, line, function): (primitive calls, calls, own seconds, cumulative seconds, callers)}
    table = pstats.Stats(str(output)).stats  # type: ignore[attr-defined]
    rows = []
    for phase, file_end, function in PHASES:
        if file_end == "~":  # built-ins: every onnxruntime run method, summed (they do not nest)
            matches = [value for (file, _, name), value in table.items()
                       if file == "~" and function in name and (name.endswith(".run>") or "run_with" in name)]
            if matches:
                rows.append((phase, sum(value[3] for value in matches), sum(value[1] for value in matches)))
            continue
        matches = [value for (file, _, name), value in table.items() if file.endswith(file_end) and name == function]
        if matches:
            best = max(matches, key=lambda value: value[3])
            rows.append((phase, best[3], best[1]))
    rows.append(("whole process (wall, profiled)", wall, 1))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="percentile")
    parser.add_argument("--samples", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    parser.add_argument("--profile", action="store_true", help="also profile the command once (largest count)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more qgraph optimize options")
    arguments = parser.parse_args()
    from qgraph.models.resnet import build_resnet

    qgraph = str(Path(sys.executable).with_name("qgraph"))
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # the children inherit it: bytecode cached, as users have it
    subprocess.run([sys.executable, "-c", "import qgraph.cli.optimize"], check=True)
    rows = []
    profile: list[tuple[str, float, int]] = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        onnx.save(build_resnet("resnet18"), folder / "model.onnx")
        fp32 = folder / "fp32.py"
        fp32.write_text(_FP32_SCRIPT)
        for samples in arguments.samples:
            images = np.random.default_rng(0).standard_normal((samples, 3, 224, 224)).astype(np.float32)
            np.savez(folder / "calib.npz", input=images)
            del images
            command = [qgraph, "optimize", str(folder / "model.onnx"), "-o", str(folder / "out.onnx"), "--calib",
                       str(folder / "calib.npz"), "--method", arguments.method, "--batch-size",
                       str(arguments.batch_size), *arguments.extra]
            inference = [sys.executable, str(fp32), str(folder / "model.onnx"), str(folder / "calib.npz"),
                         str(arguments.batch_size)]
            runs: dict[str, list[dict[str, float]]] = {"command": [], "fp32": []}
            for repeat in range(arguments.repeats):
                for kind, line in (("command", command), ("fp32", inference)):
                    measured = _peak_of_one(line, arguments.timeout)
                    if measured is None:
                        print(f"{samples} samples, {kind} run {repeat + 1} failed or ran past "
                              f"{arguments.timeout:.0f} s", file=sys.stderr, flush=True)
                        continue
                    runs[kind].append(measured)
                    print(f"{samples} samples, {kind} run {repeat + 1}/{arguments.repeats}: {measured['wall']:.1f} s "
                          f"wall, {measured['cpu']:.1f} s CPU, peak RSS {measured['rss_mb']:.0f} MB",
                          file=sys.stderr, flush=True)
            if not runs["command"] or not runs["fp32"]:
                continue
            row: dict[str, float] = {"samples": samples}
            for kind, values in runs.items():
                for key in ("wall", "cpu", "rss_mb"):
                    row[f"{kind}_{key}"] = statistics.median(value[key] for value in values)
            rows.append(row)
            if arguments.profile and samples == max(arguments.samples):
                profile = profile_phases(command, folder, arguments.timeout)
    print(f"qgraph optimize --method {arguments.method} on ResNet-18 224 (random weights, random images), "
          f"batch {arguments.batch_size}, medians of {arguments.repeats}")
    print("| samples | command wall s | FP32 wall s | ratio | command CPU s | FP32 CPU s | CPU ratio | "
          "command peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['samples']} | {row['command_wall']:.1f} | {row['fp32_wall']:.1f} | "
              f"{row['command_wall'] / row['fp32_wall']:.2f}x | {row['command_cpu']:.1f} | {row['fp32_cpu']:.1f} | "
              f"{row['command_cpu'] / row['fp32_cpu']:.2f}x | {row['command_rss_mb']:.0f} |")
    if len(rows) > 1:
        print(f"peak RSS at {rows[-1]['samples']} samples / at {rows[0]['samples']}: "
              f"{rows[-1]['command_rss_mb'] / rows[0]['command_rss_mb']:.2f}x (goal ≤ 1.10x)")
    if profile:
        print(f"\nwhere the command's time goes ({max(arguments.samples)} samples, one profiled run; phases nest)")
        print("| phase | cumulative s | calls |")
        print("|---|---|---|")
        for phase, seconds, calls in profile:
            print(f"| {phase} | {seconds:.1f} | {calls} |")


if __name__ == "__main__":
    main()
