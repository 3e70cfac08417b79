"""Issue #6's transformer check: the trained Fashion-MNIST ViT-style model quantized by qgraph (ort-cpu), compared
with FP32 on the Fashion-MNIST test set: output cosine similarity (mean and worst sample) and top-1 accuracy.

    python tools/bench_transformer.py [--model models/trained/vit_small_fmnist.onnx] [--test-limit N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qgraph import runtime
from qgraph.calibrate.driver import CalibrationConfig
from qgraph.data import load_fashion_mnist
from qgraph.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from qgraph.ir import load_model
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions

ROOT = Path(__file__).resolve().parent.parent


def standardized(split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_fashion_mnist(split, limit=limit)
    return ((images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD).astype(np.float32), labels


def logits(session, images: np.ndarray, batch: int = 250) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "trained" / "vit_small_fmnist.onnx"))
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--calibration-samples", type=int, default=500)
    parser.add_argument("--methods", nargs="+", default=["minmax", "percentile", "entropy"])
    arguments = parser.parse_args()

    calibration, _ = standardized("train", arguments.calibration_samples)
    test_images, test_labels = standardized("test", arguments.test_limit)
    float_session = runtime.create_session(arguments.model, optimize=True)
    reference = logits(float_session, test_images)
    float_top1 = 100.0 * np.mean(np.argmax(reference, 1) == test_labels)
    print(f"{'model':<34} {'top-1':>7} {'Δ':>6} {'cos mean':>9} {'cos min':>8} {'seconds':>8}")
    print(f"{'FP32':<34} {float_top1:>6.2f}% {'':>6} {'':>9} {'':>8} {'':>8}")
    for method in arguments.methods:
        start = time.perf_counter()
        options = OptimizeOptions(quantization=QuantizeOptions(calibration=CalibrationConfig(method=method)))
        result = optimize(load_model(arguments.model), None, options,
                          calibration_data=[{"input": calibration[i:i + 25]} for i in range(0, len(calibration), 25)])
        session = runtime.create_session(ir.serde.serialize_model(result.model), optimize=True)
        quantized = logits(session, test_images)
        seconds = time.perf_counter() - start
        cosine = np.sum(reference * quantized, 1) / (
            np.linalg.norm(reference, axis=1) * np.linalg.norm(quantized, axis=1) + 1e-12)
        top1 = 100.0 * np.mean(np.argmax(quantized, 1) == test_labels)
        kept = len(result.quantization.plan.fp32_nodes)
        print(f"{'qgraph int8 ' + method + f' ({kept} FP32)':<34} {top1:>6.2f}% {top1 - float_top1:>+6.2f} "
              f"{cosine.mean():>9.5f} {cosine.min():>8.5f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
