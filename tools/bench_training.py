"""Training throughput of the small ResNet in onnxruntime-training against its forward-only inference throughput.

Builds ``qgraph.models.resnet.build_resnet(layout="small")`` (1×28×28, 10 classes), creates training artifacts
(AdamW, cross-entropy, gradient clipping) with :mod:`qgraph.train`, and times on the same random batches:

- ``train step``: training-mode forward + backward + optimizer step (what one ``Trainer`` step costs);
- ``eval forward``: the training module's eval mode (forward + loss, BatchNorm on running statistics);
- ``inference``: a plain ``onnxruntime.InferenceSession`` on the inference model (all graph optimisations on, so
  BatchNormalization folds into the convolutions, which a training graph cannot do), and the same session with
  graph optimisation off, to show how much of the gap is fusion.

All three use the same batch size and intra-op thread count. Prints a table with samples/s, the throughput ratio of
each row to inference (train/inference) and its inverse, the time ratio.

    python tools/bench_training.py --steps 30 --batch-size 64 --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from qgraph.models.resnet import build_resnet
from qgraph.runtime import create_session
from qgraph.train import TrainingConfig
from qgraph.train.artifacts import build_training_artifacts
from qgraph.train.session import TrainingSession


def timed(function, steps: int, warmup: int) -> float:
    """Seconds per call of ``function`` over ``steps`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        function()
    started = time.perf_counter()
    for _ in range(steps):
        function()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every session")
    arguments = parser.parse_args()

    model = build_resnet(layout="small", input_shape=(1, 28, 28), num_classes=10, seed=0)
    generator = np.random.default_rng(0)
    feeds = {"input": generator.standard_normal((arguments.batch_size, 1, 28, 28)).astype(np.float32)}
    labels = generator.integers(0, 10, arguments.batch_size).astype(np.int64)
    config = TrainingConfig(batch_size=arguments.batch_size, learning_rate=1e-4, optimizer="adamw",
                            weight_decay=1e-4, max_grad_norm=5.0, threads=arguments.threads)

    with tempfile.TemporaryDirectory(prefix="qgraph-bench-training-") as directory:
        artifacts = build_training_artifacts(model, directory, config)
        session = TrainingSession(artifacts, config, artifacts.checkpoint)

        def train_step() -> None:
            session.forward_backward(feeds, labels)
            session.update(config.learning_rate)

        def eval_forward() -> None:
            session.evaluate(feeds, labels)

        inference = create_session(model, optimize=True, threads=arguments.threads)
        unoptimized = create_session(model, optimize=False, threads=arguments.threads)

        def inference_forward() -> None:
            inference.run(["logits"], feeds)

        def unoptimized_forward() -> None:
            unoptimized.run(["logits"], feeds)

        seconds = {
            "train step (fwd+bwd+AdamW)": timed(train_step, arguments.steps, arguments.warmup),
            "eval forward (training module)": timed(eval_forward, arguments.steps, arguments.warmup),
            "inference, no graph optimisation": timed(unoptimized_forward, arguments.steps, arguments.warmup),
            "inference (InferenceSession)": timed(inference_forward, arguments.steps, arguments.warmup),
        }

    reference = seconds["inference (InferenceSession)"]
    print(f"small ResNet 1x28x28, 10 classes, batch {arguments.batch_size}, {arguments.threads} threads, "
          f"{arguments.steps} timed steps after {arguments.warmup} warm-up")
    print(f"{'mode':32s} {'ms/batch':>9s} {'samples/s':>10s} {'samples/s ratio':>16s} {'time ratio':>11s}")
    for mode, value in seconds.items():
        print(f"{mode:32s} {value * 1e3:9.2f} {arguments.batch_size / value:10.1f} {reference / value:16.3f} "
              f"{value / reference:10.2f}x")


if __name__ == "__main__":
    main()
