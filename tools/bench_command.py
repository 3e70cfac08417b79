"""``qgraph optimize`` as a whole process, as a user runs it: wall time against FP32 inference, and peak RSS.

For each sample count (default 100 and 1000) it writes a calibration ``.npz`` of random 3×224×224 images for the
ResNet-18 reference layout, then runs, each in a fresh subprocess measured with ``resource.getrusage(
RUSAGE_CHILDREN)`` (peak RSS of that child, user and system CPU) and a wall clock:

- ``qgraph optimize model.onnx -o out.onnx --calib calib.npz --method METHOD`` (the default search on);
- FP32 inference over the same samples in a fresh process (load the file, one optimised onnxruntime session,
  the same batch size), the baseline the goal compares with: command ≤ 1.25× FP32.

The runs alternate (command, FP32, command, FP32, …) and the medians are reported, since the cores are shared.
The table also gives the peak RSS at the largest count relative to the smallest (goal: within 10%)::

    python tools/bench_command.py                          # percentile, 100 and 1000 samples, 3 repeats
    python tools/bench_command.py --method entropy --samples 1000 --repeats 1
"""

from __future__ import annotations

import argparse
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


def measure(command: list[str]) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one subprocess (its own getrusage, children only)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    completed = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{completed.stderr[-2000:]}")
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: children run one at a time, largest last wins
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "rss_mb": after.ru_maxrss / 1024.0}


def _peak_of_one(command: list[str]) -> dict[str, float]:
    """``measure`` in a fresh Python parent, so that ``ru_maxrss`` is this child's alone."""
    wrapper = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_command as b; "
               "print(json.dumps(b.measure(sys.argv[2:])))")
    completed = subprocess.run([sys.executable, "-c", wrapper, str(Path(__file__).parent), *command],
                               capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(completed.stderr[-2000:])
    import json

    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="percentile")
    parser.add_argument("--samples", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more qgraph optimize options")
    arguments = parser.parse_args()
    from qgraph.models.resnet import build_resnet

    qgraph = str(Path(sys.executable).with_name("qgraph"))
    rows = []
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
            runs = {"command": [], "fp32": []}
            for _ in range(arguments.repeats):
                runs["command"].append(_peak_of_one(command))
                runs["fp32"].append(_peak_of_one(inference))
            row = {"samples": samples}
            for kind, values in runs.items():
                for key in ("wall", "cpu", "rss_mb"):
                    row[f"{kind}_{key}"] = statistics.median(value[key] for value in values)
            rows.append(row)
    print(f"qgraph optimize --method {arguments.method} on ResNet-18 224 (random weights, random images), "
          f"batch {arguments.batch_size}, medians of {arguments.repeats}")
    print("| samples | command wall s | FP32 wall s | ratio | command CPU s | FP32 CPU s | command peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['samples']} | {row['command_wall']:.1f} | {row['fp32_wall']:.1f} | "
              f"{row['command_wall'] / row['fp32_wall']:.2f}x | {row['command_cpu']:.1f} | {row['fp32_cpu']:.1f} | "
              f"{row['command_rss_mb']:.0f} |")
    if len(rows) > 1:
        print(f"peak RSS at {rows[-1]['samples']} samples / at {rows[0]['samples']}: "
              f"{rows[-1]['command_rss_mb'] / rows[0]['command_rss_mb']:.2f}x (goal ≤ 1.10x)")


if __name__ == "__main__":
    main()
