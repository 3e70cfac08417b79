"""Top-1 accuracy (%) of a Fashion-MNIST classifier on the bundled 2000-image test subset, printed on the last line.

The scorer of the tuning examples and benchmarks (``--eval "python tools/score_fmnist.py {model}"``): onnxruntime
runs with as many intra-op threads as ``QGRAPH_THREADS`` says (qgraph's tuning sets it to cores / workers for each
trial, so that parallel trials do not oversubscribe the cores), all of them when it is unset.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

DATA = Path(__file__).resolve().parent.parent / "models" / "data" / "fashion_mnist_test_subset.npz"


def accuracy(path: str, data: Path = DATA, batch_size: int = 500) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("QGRAPH_THREADS", "0"))
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    arrays = np.load(data)
    images, labels = arrays["input"], arrays["label"]
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = session.run(None, {name: images[start:start + batch_size]})[0]
        correct += int(np.sum(np.argmax(logits, axis=1) == labels[start:start + batch_size]))
    return 100.0 * correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", type=Path, default=DATA)
    arguments = parser.parse_args()
    print(f"{accuracy(arguments.model, arguments.data):.2f}")


if __name__ == "__main__":
    main()
