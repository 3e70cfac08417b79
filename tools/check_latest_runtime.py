"""Check qgraph's post-training-quantization path on the latest onnxruntime and the newest Python, beside this one.

Run from the training environment (``pip install -e ".[dev]"``: onnxruntime-training-cpu 1.19.2), as the README's
test command does after the test suite. It

1. finds the newest CPython from 3.10 to :data:`NEWEST_PYTHON` (pyenv's ``versions/3.X.Y``, or ``python3.X`` on the
   path), or takes ``--python``;
2. makes a second virtual environment with it, in ``~/.cache/qgraph/latest-runtime/`` under a name made of that
   Python's version, the latest onnxruntime release on PyPI and a hash of what the install depends on
   (this checkout's path, ``pyproject.toml``, ``setup.py``, the C sources): a later run with the same key reuses it, so
   CI pays for the install once. There it installs qgraph's PTQ path, ``pip install -e ".[cpu,test]"`` with
   ``onnxruntime==LATEST`` (its own packages, none of this environment's; the editable install builds the native
   libraries for that Python), and runs ``pip check`` there and here;
3. runs the test suite there without the tests that need onnxruntime-training: ``pytest -m "not qat"``;
4. runs the bundled example's INT8 path (``tools/example.py``'s model, calibration data, test images and
   ``qgraph optimize`` options) in both environments, each measuring its FP32 and INT8 models' top-1 and batch-1
   latency alternately in one process, and prints both side by side.

It fails (exit status 1, naming the check) if ``pip check`` or a test fails, if INT8 is not faster than FP32 in either
environment, or if INT8's top-1 differs between the environments by more than ``--tolerance`` points (default 0.5,
10 of the 2,000 test images: the two runtimes' float kernels round differently, which can move a calibration range by
a fraction of a step). Where PyPI cannot be reached, the newest cached environment for that Python is used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
#: The newest CPython the project supports; a newer one found is not used unless given with --python.
NEWEST_PYTHON = (3, 13)
OLDEST_PYTHON = (3, 10)
DEFAULT_TOLERANCE_POINTS = 0.5
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qgraph" / "latest-runtime"
#: What the second environment's install depends on: a change to any of them makes a new environment.
INSTALL_INPUTS = ("pyproject.toml", "setup.py", "qgraph/native/*.c", "qgraph/native/*.h")
LATENCY_RUNS = 200


class CheckFailed(Exception):
    """One of the checks failed; the message names it."""


def python_version(executable: str) -> tuple[int, int] | None:
    """(major, minor) of a Python executable; None if it does not run."""
    try:
        completed = subprocess.run([executable, "-c", "import sys; print(*sys.version_info[:2])"],
                                   capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    major, minor = completed.stdout.split()
    return int(major), int(minor)


def candidate_pythons() -> list[str]:
    """Python executables under pyenv's versions folder and on the path (``python3.X``)."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = [str(folder / "bin" / "python") for folder in sorted((pyenv_root / "versions").glob("3.*"))
             if re.fullmatch(r"3\.\d+\.\d+", folder.name)]
    found += [shutil.which(f"python3.{minor}") for minor in range(OLDEST_PYTHON[1], NEWEST_PYTHON[1] + 1)]
    return [path for path in found if path and os.access(path, os.X_OK)]


def newest_python() -> tuple[str, tuple[int, int]]:
    """The newest CPython found between :data:`OLDEST_PYTHON` and :data:`NEWEST_PYTHON`."""
    found = [(version, path) for path in candidate_pythons() if (version := python_version(path)) is not None]
    supported = [(version, path) for version, path in found if OLDEST_PYTHON <= version <= NEWEST_PYTHON]
    if not supported:
        raise CheckFailed(f"no CPython {OLDEST_PYTHON[0]}.{OLDEST_PYTHON[1]}-{NEWEST_PYTHON[0]}.{NEWEST_PYTHON[1]} "
                          "found under pyenv or on the path; give one with --python")
    version, path = max(supported)
    return path, version


def clean_environment() -> dict[str, str]:
    """This process's environment without what would make the other interpreter see this environment's packages."""
    return {name: value for name, value in os.environ.items()
            if name not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE")}


def run(arguments: list[str], *, what: str, capture: bool = False) -> str:
    print("$ " + " ".join(arguments), flush=True)
    completed = subprocess.run(arguments, cwd=REPOSITORY, env=clean_environment(), text=True,
                               capture_output=capture, check=False)
    if completed.returncode != 0:
        if capture:
            print(completed.stdout, end="", flush=True)
            print(completed.stderr, end="", file=sys.stderr, flush=True)
        raise CheckFailed(f"{what} failed (exit status {completed.returncode})")
    return completed.stdout if capture else ""


def latest_onnxruntime(python: str) -> str | None:
    """The latest onnxruntime release on the package index for that Python, or None where it cannot be reached."""
    completed = subprocess.run([python, "-m", "pip", "index", "versions", "onnxruntime", "--disable-pip-version-check"],
                               capture_output=True, text=True, env=clean_environment(), check=False, timeout=120)
    match = re.search(r"^onnxruntime \(([^)]+)\)", completed.stdout, re.MULTILINE)
    return match.group(1) if match else None


def install_inputs_hash() -> str:
    """A hash of this checkout's path (the install is editable) and of the files the install depends on."""
    digest = hashlib.sha256(os.fsencode(REPOSITORY))
    for pattern in INSTALL_INPUTS:
        for path in sorted(REPOSITORY.glob(pattern)):
            digest.update(path.relative_to(REPOSITORY).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment_folder(python: str, version: tuple[int, int]) -> Path:
    """The cached environment's folder for this Python, the latest onnxruntime and the current install inputs."""
    python_tag = f"py{version[0]}.{version[1]}"
    onnxruntime_version = latest_onnxruntime(python)
    if onnxruntime_version is None:
        cached = sorted(CACHE.glob(f"{python_tag}-ort*-{install_inputs_hash()}"), key=lambda path: path.stat().st_mtime)
        if not cached:
            raise CheckFailed("the package index cannot be reached and no second environment is cached")
        print(f"the package index cannot be reached: reusing {cached[-1]}", flush=True)
        return cached[-1]
    return CACHE / f"{python_tag}-ort{onnxruntime_version}-{install_inputs_hash()}"


def _native_built(venv_python: str) -> bool:
    """Whether this checkout holds the C extensions built for the environment's Python (an editable install
    builds them into the tree, so a fresh clone has none)."""
    suffix = subprocess.run([venv_python, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return bool(suffix) and (REPOSITORY / "qgraph" / "native" / f"_observer_loops{suffix}").exists()


def make_environment(python: str, folder: Path) -> str:
    """The virtual environment in ``folder`` with qgraph's PTQ path on the latest onnxruntime; its Python."""
    venv_python = str(folder / "bin" / "python")
    marker = folder / "installed"
    if marker.exists():
        print(f"reusing the second environment {folder}", flush=True)
        if marker.read_text().splitlines()[-1:] != [str(REPOSITORY)] or not _native_built(venv_python):
            # the editable install points at the checkout that made the environment, with that checkout's C
            # extensions: a new clone (or one at the same path, unbuilt) is installed again, qgraph alone
            run([venv_python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "-e", "."],
                what='pip install --no-deps -e . (this checkout)', capture=True)
            marker.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n") + f"{REPOSITORY}\n")
        return venv_python
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    run([python, "-m", "venv", str(folder)], what="creating the virtual environment")
    onnxruntime_version = folder.name.split("-ort")[1].rsplit("-", 1)[0]
    run([venv_python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", ".[cpu,test]",
         f"onnxruntime=={onnxruntime_version}"],
        what=f'pip install -e ".[cpu,test]" onnxruntime=={onnxruntime_version}', capture=True)
    marker.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n") + f"{REPOSITORY}\n")
    for stale in folder.parent.glob(f"{folder.name.split('-ort')[0]}-ort*"):
        if stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    return venv_python


def measure_example(output: Path) -> None:
    """The example's INT8 path in this environment: ``qgraph optimize`` as the example runs it, then the top-1 and
    batch-1 latency of FP32 and INT8 (measured alternately), written to ``output`` as JSON."""
    import numpy as np
    import onnx
    import onnxruntime

    sys.path.insert(0, str(REPOSITORY))
    from qgraph.report import measure_latency
    from tools import example

    model = example.MODELS / "trained" / "resnet_small_fmnist.onnx"
    calibration = example.MODELS / "data" / "fashion_mnist_calibration.npz"
    test = np.load(example.MODELS / "data" / "fashion_mnist_test_subset.npz")
    images, labels = test["input"].astype(np.float32), test["label"].astype(np.int64)
    with tempfile.TemporaryDirectory() as scratch:
        quantized = Path(scratch) / "resnet_small_fmnist.int8.onnx"
        example.run_command([sys.executable, "-m", "qgraph.cli", "optimize", str(model), "-o", str(quantized),
                             "--calib", str(calibration), "--method", "percentile"])
        rows = {"FP32": model, "INT8": quantized}
        latencies = measure_latency({name: onnx.load(str(path)) for name, path in rows.items()},
                                    {"input": images[:1]}, runs=LATENCY_RUNS)
        table = {name: {"top1": example.accuracy(path, images, labels), "latency_ms": latencies[name]}
                 for name, path in rows.items()}
    output.write_text(json.dumps({
        "python": ".".join(map(str, sys.version_info[:3])), "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__, "test_images": len(images), "rows": table,
        "speedup": latencies["FP32"] / latencies["INT8"],
    }, indent=1))


def example_numbers(python: str, scratch: Path, name: str) -> dict:
    output = scratch / f"example-{name}.json"
    run([python, str(Path(__file__).resolve()), "--measure-example", str(output)], what=f"the example ({name})")
    return json.loads(output.read_text())


def compare(training: dict, latest: dict, tolerance: float) -> list[str]:
    """The failures: INT8 accuracy differing by more than ``tolerance`` points, or INT8 not faster than FP32."""
    failures = []
    for name in ("FP32", "INT8"):
        here, there = training["rows"][name]["top1"], latest["rows"][name]["top1"]
        if abs(here - there) > tolerance:
            failures.append(f"{name} top-1 {here:.2f}% on onnxruntime {training['onnxruntime']} but {there:.2f}% on "
                            f"{latest['onnxruntime']} (tolerance {tolerance} points)")
    for numbers in (training, latest):
        if numbers["speedup"] <= 1.0:
            failures.append(f"INT8 is not faster than FP32 on onnxruntime {numbers['onnxruntime']} "
                            f"({numbers['speedup']:.2f}x)")
    return failures


def print_comparison(training: dict, latest: dict) -> None:
    print()
    print(f"The bundled example's INT8 path: Fashion-MNIST ResNet, {training['test_images']} test images; "
          "latency batch 1, 2 threads, median of "
          f"{LATENCY_RUNS}")
    columns = [("training environment", training), ("latest runtime", latest)]
    for label, numbers in columns:
        print(f"  {label}: Python {numbers['python']}, onnxruntime {numbers['onnxruntime']}, onnx {numbers['onnx']}")
    print(f"{'':<8}" + "".join(f"{label:>36}" for label, _ in columns))
    print(f"{'model':<8}" + f"{'top-1':>12} {'latency':>12} {'speed-up':>10}" * len(columns))
    for name in ("FP32", "INT8"):
        cells = ""
        for _, numbers in columns:
            row = numbers["rows"][name]
            speedup = numbers["rows"]["FP32"]["latency_ms"] / row["latency_ms"]
            cells += f"{row['top1']:>11.2f}% {row['latency_ms']:>10.3f}ms {speedup:>9.2f}x"
        print(f"{name:<8}{cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", help="the interpreter for the second environment (default: the newest found)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE_POINTS,
                        help="largest top-1 difference between the environments, in points (default: %(default)s)")
    parser.add_argument("--measure-example", type=Path, metavar="JSON",
                        help="(used by the check itself) measure the example's INT8 path here and write JSON")
    arguments = parser.parse_args()
    if arguments.measure_example is not None:
        measure_example(arguments.measure_example)
        return 0

    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="qgraph-latest-runtime-"))
    try:
        if arguments.python:
            python, version = arguments.python, python_version(arguments.python)
            if version is None:
                raise CheckFailed(f"{arguments.python} does not run")
        else:
            python, version = newest_python()
        print(f"second environment: CPython {version[0]}.{version[1]} ({python})", flush=True)
        venv_python = make_environment(python, environment_folder(python, version))
        run([venv_python, "-m", "pip", "check"], what="pip check in the second environment")
        run([sys.executable, "-m", "pip", "check"], what="pip check in this environment")
        run([venv_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not qat"],
            what='the tests without onnxruntime-training (pytest -m "not qat") in the second environment')
        training = example_numbers(sys.executable, scratch, "training")
        latest = example_numbers(venv_python, scratch, "latest")
        print_comparison(training, latest)
        failures = compare(training, latest, arguments.tolerance)
        if failures:
            raise CheckFailed("; ".join(failures))
    except CheckFailed as failure:
        print(f"check_latest_runtime: FAILED: {failure}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"check_latest_runtime: passed in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
