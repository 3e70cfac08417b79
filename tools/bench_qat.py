"""QAT benchmark: FP32 / PTQ / QAT top-1 on the Fashion-MNIST reference models, and the cost of one QAT step.

For every trained reference model (``models/trained/*.onnx``) and every low-precision setting where post-training
quantization is expected to lose accuracy (``w4``: 4-bit per-channel weights; ``w8pt``: 8-bit per-tensor weights,
the MobileNetV2 case; ``w4pt``: 4-bit per-tensor), it runs the real ``optimize`` path (canonicalize ─▶ calibrate on
``models/data/fashion_mnist_calibration.npz`` ─▶ QDQ ─▶ [QAT] ─▶ lower for ort-cpu) and measures top-1 of the
lowered model in a plain ``onnxruntime.InferenceSession`` on the Fashion-MNIST test split:

- ``FP32``: the canonical float model; ``PTQ``: quantized without training;
- ``QAT labels``: cross-entropy against the labels, learnable scales (LSQ);
- ``QAT fixed``: same, calibrated scales kept (the ablation);
- ``QAT distill``: no labels, MSE against the FP32 model's logits.

QAT trains on the first ``--train-samples`` images of the training split and validates on ``--val-samples`` images
from the tail of the training split (the images the reference recipes held out), so the test split stays unseen.

``--cost`` times one training step (forward + backward + AdamW, batch ``--batch-size``) of the QAT graph against an
FP32 training step of the same model through onnxruntime-training: the canonical model (BatchNorm folded, the graph
QAT trains) and the original model with BatchNorm in training mode.

    python tools/bench_qat.py --models resnet_small --settings w4 --epochs 2 --train-samples 10000
    python tools/bench_qat.py --cost-only --models mobilenet_v2_small
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.calibrate.driver import CalibrationConfig
from qgraph.data import dataset_from_arrays, load_fashion_mnist
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions
from qgraph.qat import QATOptions
from qgraph.targets import TargetOptions

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "models" / "trained"
CALIBRATION = ROOT / "models" / "data" / "fashion_mnist_calibration.npz"
SETTINGS = {
    "w4": dict(weight_bits=4, per_channel=True),
    "w8pt": dict(weight_bits=8, per_channel=False),
    "w4pt": dict(weight_bits=4, per_channel=False),
}


def top1(model: ir.Model | onnx.ModelProto, inputs: np.ndarray, labels: np.ndarray, threads: int) -> float:
    import onnxruntime

    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(inputs), 500):
        logits = session.run(None, {name: inputs[start:start + 500]})[0]
        correct += int(np.count_nonzero(np.argmax(logits, axis=-1) == labels[start:start + 500]))
    return 100.0 * correct / len(inputs)


def quantize_options(setting: str) -> QuantizeOptions:
    return QuantizeOptions(target_options=TargetOptions(format="qoperator", **SETTINGS[setting]),
                           calibration=CalibrationConfig(method="minmax", batch_size=100))


def run_setting(path: Path, setting: str, data: dict, arguments) -> list[dict]:
    rows = []
    base = OptimizeOptions(quantization=quantize_options(setting))
    started = time.perf_counter()
    ptq = optimize(path, None, base, calibration_data=CALIBRATION)
    fp32 = top1(ptq.float_model, *data["test"], arguments.threads)
    ptq_top1 = top1(ptq.model, *data["test"], arguments.threads)
    rows.append(dict(model=path.stem, setting=setting, method="FP32", top1=fp32, epochs=0, seconds=0.0))
    rows.append(dict(model=path.stem, setting=setting, method="PTQ", top1=ptq_top1, epochs=0,
                     seconds=time.perf_counter() - started))
    print(f"{path.stem} {setting}: FP32 {fp32:.2f}  PTQ {ptq_top1:.2f}", flush=True)
    variants = [("QAT labels", dict(loss="labels")), ("QAT fixed scales", dict(loss="labels", learn_scales=False)),
                ("QAT distill", dict(loss="distill"))]
    for method, changes in variants:
        if method not in arguments.methods:
            continue
        qat = QATOptions(epochs=arguments.epochs, batch_size=arguments.batch_size, learning_rate=arguments.lr,
                         threads=arguments.threads, patience=None, **changes)
        started = time.perf_counter()
        result = optimize(path, None, OptimizeOptions(quantization=quantize_options(setting), qat=qat),
                          calibration_data=CALIBRATION, train_data=data["train"], validation_data=data["validation"])
        seconds = time.perf_counter() - started
        accuracy = top1(result.model, *data["test"], arguments.threads)
        rows.append(dict(model=path.stem, setting=setting, method=method, top1=accuracy,
                         epochs=result.qat.epochs_completed, seconds=seconds, best_epoch=result.qat.best_epoch))
        print(f"{path.stem} {setting}: {method} {accuracy:.2f} ({result.qat.epochs_completed} epochs, "
              f"{seconds:.0f} s)", flush=True)
    return rows


def step_cost(path: Path, arguments) -> dict:
    """Seconds per training step: QAT graph (w4; learnable or fixed scales) vs FP32 canonical and FP32 with
    BatchNorm."""
    from qgraph.ptq import quantize
    from qgraph.qat import build_fake_quant_graph
    from qgraph.train import TrainingConfig
    from qgraph.train.artifacts import build_training_artifacts
    from qgraph.train.session import TrainingSession

    original = onnx.load(path)
    canonical = optimize(path, None, OptimizeOptions())
    canonical_proto = ir.serde.serialize_model(canonical.model)
    calibration = np.load(CALIBRATION)["input"][:200]
    quantized = quantize(ir.serde.deserialize_model(canonical_proto),
                         [{"input": calibration[i:i + 100]} for i in range(0, 200, 100)],
                         quantize_options("w4"), lower=False)
    graph = build_fake_quant_graph(quantized.qdq_model, quantized.plan, quantized.parameters,
                                   float_model=canonical_proto)
    fixed = build_fake_quant_graph(quantized.qdq_model, quantized.plan, quantized.parameters,
                                   float_model=canonical_proto, learn_scales=False)
    generator = np.random.default_rng(0)
    feeds = {"input": generator.standard_normal((arguments.batch_size, 1, 28, 28)).astype(np.float32)}
    labels = generator.integers(0, 10, arguments.batch_size).astype(np.int64)
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="qgraph-bench-qat-") as directory:
        for name, model, trainable in (("fp32_batchnorm", original, None), ("fp32_canonical", canonical_proto, None),
                                       ("qat", graph.model, graph.trainable),
                                       ("qat_fixed_scales", fixed.model, fixed.trainable)):
            config = TrainingConfig(batch_size=arguments.batch_size, learning_rate=1e-4, max_grad_norm=5.0,
                                    threads=arguments.threads, trainable=trainable)
            artifacts = build_training_artifacts(model, Path(directory) / name, config)
            sessions[name] = TrainingSession(artifacts, config, artifacts.checkpoint)
        samples: dict[str, list[float]] = {name: [] for name in sessions}
        # Rounds interleave the three sessions, so that load from other processes on the shared CPU hits them
        # alike; the median over rounds is reported.
        for round_index in range(arguments.cost_rounds + 1):
            for name, session in sessions.items():
                started = time.perf_counter()
                for _ in range(arguments.cost_steps):
                    session.forward_backward(feeds, labels)
                    session.update(1e-4)
                if round_index:  # the first round warms up
                    samples[name].append((time.perf_counter() - started) / arguments.cost_steps)
        timings = {name: float(np.median(values)) for name, values in samples.items()}
    result = dict(model=path.stem, batch=arguments.batch_size, **{f"{k}_ms": v * 1000 for k, v in timings.items()})
    result["qat_vs_fp32_canonical"] = timings["qat"] / timings["fp32_canonical"]
    result["qat_vs_fp32_batchnorm"] = timings["qat"] / timings["fp32_batchnorm"]
    result["qat_fixed_vs_fp32_canonical"] = timings["qat_fixed_scales"] / timings["fp32_canonical"]
    print(f"{path.stem} cost: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in result.items() if k != "model"), flush=True)
    return result


def load_data(arguments) -> dict:
    train_inputs, train_labels = load_fashion_mnist("train", normalization="standard")
    test_inputs, test_labels = load_fashion_mnist("test", normalization="standard", limit=arguments.test_samples)
    train = dataset_from_arrays({"input": train_inputs[:arguments.train_samples],
                                 "label": train_labels[:arguments.train_samples]}, label_key="label")
    tail = slice(len(train_inputs) - arguments.val_samples, len(train_inputs))
    validation = dataset_from_arrays({"input": train_inputs[tail], "label": train_labels[tail]}, label_key="label")
    return dict(train=train, validation=validation, test=(test_inputs, test_labels))


def markdown(rows: list[dict], costs: list[dict]) -> str:
    lines = ["| model | setting | method | top-1 % | Δ vs FP32 | epochs | wall s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    fp32 = {(row["model"], row["setting"]): row["top1"] for row in rows if row["method"] == "FP32"}
    for row in rows:
        delta = row["top1"] - fp32[(row["model"], row["setting"])]
        lines.append(f"| {row['model']} | {row['setting']} | {row['method']} | {row['top1']:.2f} | {delta:+.2f} | "
                     f"{row['epochs']} | {row['seconds']:.0f} |")
    if costs:
        lines += ["", "| model | batch | FP32+BN step ms | FP32 folded step ms | QAT step ms | QAT / FP32 folded | "
                  "QAT / FP32+BN | QAT fixed scales / FP32 folded |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for cost in costs:
            lines.append(f"| {cost['model']} | {cost['batch']} | {cost['fp32_batchnorm_ms']:.1f} | "
                         f"{cost['fp32_canonical_ms']:.1f} | {cost['qat_ms']:.1f} | "
                         f"{cost['qat_vs_fp32_canonical']:.2f}× | {cost['qat_vs_fp32_batchnorm']:.2f}× | "
                         f"{cost['qat_fixed_vs_fp32_canonical']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="model stems in models/trained (default: all)")
    parser.add_argument("--settings", nargs="*", default=["w4", "w8pt"], choices=sorted(SETTINGS))
    parser.add_argument("--methods", nargs="*", default=["QAT labels", "QAT fixed scales", "QAT distill"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--val-samples", type=int, default=2000)
    parser.add_argument("--test-samples", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cost", action="store_true", help="also time one QAT step against one FP32 step")
    parser.add_argument("--cost-only", action="store_true")
    parser.add_argument("--cost-steps", type=int, default=3)
    parser.add_argument("--cost-rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    parser.add_argument("--trained-dir", type=Path, default=TRAINED, help="folder of the trained .onnx models")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    paths = sorted(arguments.trained_dir.glob("*.onnx"))
    if arguments.models:
        paths = [path for path in paths if path.stem in arguments.models]
    if not paths:
        raise SystemExit(f"no trained models in {arguments.trained_dir} (tools/train_reference_models.py trains them)")
    rows, costs = [], []
    if not arguments.cost_only:
        data = load_data(arguments)
        for path in paths:
            for setting in arguments.settings:
                if setting == "w8pt" and "mobilenet" not in path.stem and not arguments.models:
                    continue  # per-tensor int8 hurts depthwise convolutions; the other models barely notice it
                rows.extend(run_setting(path, setting, data, arguments))
    if arguments.cost or arguments.cost_only:
        costs = [step_cost(path, arguments) for path in paths]
    print(markdown(rows, costs))
    if arguments.output:
        arguments.output.write_text(json.dumps(dict(rows=rows, costs=costs), indent=2))


if __name__ == "__main__":
    main()
