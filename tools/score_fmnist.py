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
from example import top1  # tools/ is the script's folder, first on sys.path

DATA = Path(__file__).resolve().parent.parent / "models" / "data" / "fashion_mnist_test_subset.npz"


def accuracy(path: str, data: Path = DATA, batch_size: int = 500) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("QGRAPH_THREADS", "0"))
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    arrays = np.load(data)
    return top1(session, arrays["input"], arrays["label"], batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", type=Path, default=DATA)
    arguments = parser.parse_args()
    print(f"{accuracy(arguments.model, arguments.data):.2f}")


if __name__ == "__main__":
    main()
