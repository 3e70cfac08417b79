"""Micro-benchmark of observer updates: millions of float32 values observed per second.

The default batch is ResNet-18's largest activation at batch 32 (32×64×112×112 ≈ 25.7 M floats, 103 MB), a
standard-normal tensor passed through ReLU half of the time, like the streams calibration sees. Run
``python -m qgraph.calibrate.observers.benchmark`` for a table; the numbers depend on the CPU and on its load.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np

from qgraph.calibrate.observers.factory import OBSERVER_METHODS, create_observer
from qgraph.quant.spec import QuantSpec

logger = logging.getLogger(__name__)

RESNET18_LARGEST_ACTIVATION = (32, 64, 112, 112)


def measure_update_throughput(
    method: str,
    *,
    shape: tuple[int, ...] = RESNET18_LARGEST_ACTIVATION,
    updates: int = 3,
    spec: QuantSpec | None = None,
    seed: int = 0,
) -> float:
    """Best-of-``updates`` throughput of ``update`` in millions of values per second."""
    rng = np.random.default_rng(seed)
    batch = rng.standard_normal(shape, dtype=np.float32)
    observer = create_observer(method, spec if spec is not None else QuantSpec.uint8())
    best = float("inf")
    for index in range(updates):
        data = np.maximum(batch, 0.0) if index % 2 else batch
        start = time.perf_counter()
        observer.update(data)
        best = min(best, time.perf_counter() - start)
    throughput = batch.size / best / 1e6
    logger.debug("%s update: %.0f M values/s", method, throughput)
    return throughput


def main() -> None:
    for method in OBSERVER_METHODS:
        sys.stdout.write(f"{method:>10}: {measure_update_throughput(method):8.0f} M float32 values/s\n")


if __name__ == "__main__":
    main()
