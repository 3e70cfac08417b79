"""The bundled example: a trained Fashion-MNIST model through ``qgraph optimize``: FP32 → PTQ → QAT → lowered.

Runs with nothing but the repository: the trained reference model lives in ``models/trained/``, a small licensed
subset of Fashion-MNIST in ``models/data/``. It prints each command it runs, then a table of top-1 accuracy, file
size and batch-1 latency (onnxruntime, 2 threads, measured alternately in one process) for the FP32 model, the
INT8 model (post-training quantization), and 4-bit weights without and with quantization-aware training (QAT by
distillation from the FP32 model on the bundled images: no labels needed). Every quantized model is lowered to
onnxruntime's integer operators.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parent.parent
MODELS = REPOSITORY / "models"


def top1(session, images: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    """Top-1 accuracy (%) of an onnxruntime session's first output over ``images`` fed in batches."""
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = session.run(None, {name: images[start:start + batch_size]})[0]
        correct += int(np.sum(np.argmax(logits, axis=1) == labels[start:start + batch_size]))
    return 100.0 * correct / len(images)


def accuracy(model_path: Path, images: np.ndarray, labels: np.ndarray, batch_size: int = 250) -> float:
    from qgraph import runtime

    return top1(runtime.create_session(str(model_path), optimize=True), images, labels, batch_size)


def run_command(arguments: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(part) for part in arguments), flush=True)
    completed = subprocess.run(arguments, check=False)
    if completed.returncode != 0:
        sys.exit(f"the command failed with status {completed.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODELS / "trained" / "resnet_small_fmnist.onnx"))
    parser.add_argument("--calib", default=str(MODELS / "data" / "fashion_mnist_calibration.npz"))
    parser.add_argument("--test", default=str(MODELS / "data" / "fashion_mnist_test_subset.npz"))
    parser.add_argument("--method", default="percentile", help="calibration method passed to qgraph optimize")
    parser.add_argument("--qat-epochs", type=int, default=2, help="QAT epochs on the bundled images")
    parser.add_argument("--output-dir", help="where to write the optimized models (default: a temporary folder)")
    arguments = parser.parse_args()

    from qgraph.report import measure_latency

    model = Path(arguments.model)
    if not model.exists():
        sys.exit(f"{model}: the bundled model is missing (see models/trained/README.md to reproduce it)")
    test = np.load(arguments.test)
    images, labels = test["input"].astype(np.float32), test["label"].astype(np.int64)

    with tempfile.TemporaryDirectory() as scratch:
        output_dir = Path(arguments.output_dir or scratch)
        output_dir.mkdir(parents=True, exist_ok=True)
        canonical = output_dir / f"{model.stem}.opt.onnx"
        quantized = output_dir / f"{model.stem}.int8.onnx"
        qgraph = [sys.executable, "-m", "qgraph.cli"]
        run_command([*qgraph, "optimize", str(model), "-o", str(canonical)])
        run_command([*qgraph, "optimize", str(model), "-o", str(quantized), "--calib", arguments.calib,
                     "--method", arguments.method, "--report", str(output_dir / "report.md")])
        four_bit = ["--calib", arguments.calib, "--method", arguments.method, "--weight-bits", "4", "--per-tensor"]
        four_bit_ptq = output_dir / f"{model.stem}.w4.onnx"
        four_bit_qat = output_dir / f"{model.stem}.w4.qat.onnx"
        run_command([*qgraph, "optimize", str(model), "-o", str(four_bit_ptq), *four_bit])
        run_command([*qgraph, "optimize", str(model), "-o", str(four_bit_qat), *four_bit, "--qat",
                     "--train-data", arguments.calib, "--distill", "--epochs", str(arguments.qat_epochs)])

        rows = [
            ("FP32 (as exported)", model),
            ("FP32 canonical (qgraph)", canonical),
            ("INT8 PTQ (qgraph)", quantized),
            ("4-bit weights, PTQ", four_bit_ptq),
            ("4-bit weights, QAT", four_bit_qat),
        ]
        import onnx

        single = {"input": images[:1]}
        latencies = measure_latency({label: onnx.load(str(path)) for label, path in rows}, single, runs=200)
        print()
        print(f"Fashion-MNIST, {len(images)} test images; latency: batch 1, 2 threads, median")
        print(f"{'model':<26} {'top-1':>7} {'size':>10} {'latency':>10} {'speed-up':>9}")
        baseline = latencies[rows[0][0]]
        for label, path in rows:
            print(
                f"{label:<26} {accuracy(path, images, labels):>6.2f}% {path.stat().st_size / 1e6:>8.2f}MB "
                f"{latencies[label]:>8.3f}ms {baseline / latencies[label]:>8.2f}x"
            )


if __name__ == "__main__":
    main()
