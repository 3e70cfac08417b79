"""The ``accuracy`` and ``qoperator-vs-qdq`` subcommands of ``tools/bench_ptq.py``.

``accuracy``: top-1 on the 10,000 Fashion-MNIST test images of each trained model (default ``models/trained/*.onnx``)
in FP32, after qgraph PTQ (ort-cpu QOperator, per-channel weights, methods minmax / entropy / percentile) and after
onnxruntime's ``quantize_static`` with the same 500 calibration images from the train split; the MobileNetV2-style
model is also quantized with per-tensor weights. Goals: within 0.3 points of FP32 for CNNs, 0.5 for transformers.
Without trained models, ``--untrained`` runs the same path on freshly initialised small models (plumbing only: the
accuracy of an untrained model means nothing).

``qoperator-vs-qdq``: one calibration, two formats. The QOperator model (integer operators) and the QDQ model
(explicit QuantizeLinear/DequantizeLinear, run with onnxruntime's graph optimisation disabled so that it computes the
reference float math) should agree within one step of the output's quantization scale.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import bench_ptq_support as support
import numpy as np
import onnx

logger = logging.getLogger("bench_ptq")

TRANSFORMER_OPERATORS = {"LayerNormalization", "Softmax", "Attention", "MultiHeadAttention"}
CNN_GOAL_POINTS = 0.3
TRANSFORMER_GOAL_POINTS = 0.5


def add_commands(commands) -> None:
    accuracy = commands.add_parser("accuracy", help="Fashion-MNIST top-1: FP32 vs qgraph PTQ vs quantize_static.")
    accuracy.add_argument("models", nargs="*", type=Path, help="Trained .onnx models (default models/trained/*.onnx).")
    accuracy.add_argument("--calibration-samples", type=int, default=500)
    accuracy.add_argument("--methods", nargs="+", default=["minmax", "entropy", "percentile"])
    accuracy.add_argument("--normalization", choices=["auto", "unit", "standard"], default="auto",
                          help="Input scaling the models were trained with (auto: the model's metadata "
                          "'normalization', else standard, as models/trained/README.md states).")
    accuracy.add_argument("--test-limit", type=int, help="Evaluate on the first N test images only.")
    accuracy.add_argument("--untrained", action="store_true",
                          help="No trained models: run the path on untrained small models (plumbing only).")
    accuracy.add_argument("--skip-ort", action="store_true")
    accuracy.add_argument("--threads", type=int, default=2)
    accuracy.add_argument("--quick", action="store_true", help="Methods minmax and entropy, 2000 test images.")
    accuracy.set_defaults(handler=command_accuracy)

    compare = commands.add_parser("qoperator-vs-qdq", help="qgraph QOperator vs QDQ outputs in quantization steps.")
    compare.add_argument("models", nargs="*", type=Path,
                         help="FP32 .onnx models on 1×28×28 inputs (default: models/trained/*.onnx, else the "
                         "untrained small ResNet and MobileNetV2 layouts).")
    compare.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile", "mse"])
    compare.add_argument("--calibration-samples", type=int, default=256)
    compare.add_argument("--evaluation-samples", type=int, default=2000)
    compare.add_argument("--normalization", choices=["auto", "unit", "standard"], default="auto")
    compare.add_argument("--threads", type=int, default=2)
    compare.add_argument("--quick", action="store_true", help="500 evaluation samples.")
    compare.set_defaults(handler=command_qoperator_vs_qdq)


# ---------------------------------------------------------------------------------------------------- helpers
def _default_models(paths: list[Path]) -> list[Path]:
    if paths:
        return paths
    return sorted((support.REPOSITORY_ROOT / "models" / "trained").glob("*.onnx"))


def _untrained_models() -> dict[str, onnx.ModelProto]:
    return {name: support.build_reference_model(name) for name in ("resnet_small", "mobilenet_v2_small")}


def _normalization_of(model: onnx.ModelProto, choice: str) -> str:
    """The model's metadata ``normalization`` if any, else ``standard``: the recipes behind models/trained/ train on
    (pixel / 255 − mean) / std (models/trained/README.md)."""
    if choice != "auto":
        return choice
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    value = metadata.get("normalization", "standard")
    return value if value in ("unit", "standard") else "standard"


def _is_transformer(model: onnx.ModelProto) -> bool:
    return bool({node.op_type for node in model.graph.node} & TRANSFORMER_OPERATORS)


def _is_mobilenet(name: str, model: onnx.ModelProto) -> bool:
    return "mobilenet" in name.lower() or any(node.op_type == "Conv" and any(
        attribute.name == "group" and attribute.i > 1 for attribute in node.attribute) for node in model.graph.node)


def _input_name(model: onnx.ModelProto) -> str:
    initializers = {initializer.name for initializer in model.graph.initializer}
    return next(graph_input.name for graph_input in model.graph.input if graph_input.name not in initializers)


def _predict(model: onnx.ModelProto, images: np.ndarray, *, threads: int, batch_size: int = 500,
             optimize: bool = True) -> np.ndarray:
    """The first output of ``model`` on ``images`` (float32 logits), batch by batch."""
    from qgraph import runtime

    session = runtime.create_session(model, optimize=optimize, threads=threads)
    name = session.get_inputs()[0].name
    outputs = [session.run(None, {name: images[start : start + batch_size]})[0]
               for start in range(0, len(images), batch_size)]
    return np.concatenate(outputs).astype(np.float32)


def _top1(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray, threads: int) -> float:
    return float(np.mean(_predict(model, images, threads=threads).argmax(axis=1) == labels) * 100.0)


def _quantized_proto(result) -> onnx.ModelProto:
    import onnx_ir as ir

    return ir.serde.serialize_model(result.model)


# --------------------------------------------------------------------------------------------------- accuracy
def command_accuracy(arguments: argparse.Namespace) -> None:
    from qgraph.data import load_fashion_mnist

    if arguments.quick:
        arguments.methods = ["minmax", "entropy"]
        arguments.test_limit = arguments.test_limit or 2000
    paths = _default_models(arguments.models)
    if paths:
        models = {path.stem: onnx.load(str(path)) for path in paths}
        plumbing = False
    elif arguments.untrained:
        models = _untrained_models()
        plumbing = True
    else:
        raise SystemExit("no trained models (models/trained/*.onnx); pass paths, or --untrained to test the plumbing")
    rows = []
    verdicts = []
    for name, float_model in models.items():
        normalization = _normalization_of(float_model, arguments.normalization)
        test_images, test_labels = load_fashion_mnist("test", limit=arguments.test_limit, normalization=normalization)
        calibration_images, _ = load_fashion_mnist("train", limit=arguments.calibration_samples,
                                                   normalization=normalization)
        input_name = _input_name(float_model)

        calibration_batch = support.even_batch_size(len(calibration_images), 32)

        def calibration(input_name=input_name, calibration_images=calibration_images,
                        calibration_batch=calibration_batch):
            return support.array_batches({input_name: calibration_images}, calibration_batch)

        goal = TRANSFORMER_GOAL_POINTS if _is_transformer(float_model) else CNN_GOAL_POINTS
        reference = _top1(float_model, test_images, test_labels, arguments.threads)
        rows.append([name, "FP32", "", reference, 0.0, ""])
        variants = [(f"qgraph {method}", "per-channel", dict(method=method, per_channel=True), "qgraph")
                    for method in arguments.methods]
        if not arguments.skip_ort:
            variants += [(f"quantize_static {method}", "per-channel", dict(method=method, per_channel=True), "ort")
                         for method in arguments.methods if method in ("minmax", "entropy", "percentile")]
        if _is_mobilenet(name, float_model):
            variants.append(("qgraph minmax", "per-tensor", dict(method="minmax", per_channel=False), "qgraph"))
            if not arguments.skip_ort:
                variants.append(("quantize_static minmax", "per-tensor", dict(method="minmax", per_channel=False),
                                 "ort"))
        for label, weights, options, quantizer in variants:
            try:
                if quantizer == "qgraph":
                    quantized = _quantized_proto(support.qgraph_quantize(
                        float_model, calibration(), batch_size=calibration_batch, threads=arguments.threads, **options
                    ))
                else:
                    quantized = support.ort_quantize_static(float_model, calibration(), **options)
                accuracy = _top1(quantized, test_images, test_labels, arguments.threads)
            except Exception as error:  # a failing variant is a finding for the table, not the end of the run
                logger.warning("%s %s %s failed: %s", name, label, weights, error, exc_info=arguments.verbose)
                rows.append([name, label, weights, float("nan"), float("nan"), f"error: {type(error).__name__}: "
                             f"{str(error).splitlines()[0][:80]}"])
                continue
            drop = reference - accuracy
            meets = "yes" if drop <= goal else "NO"
            rows.append([name, label, weights, accuracy, -drop, meets if quantizer == "qgraph" else ""])
        verdicts.append(f"{name}: normalization {normalization}, goal within {goal} points of FP32"
                        + (" (transformer)" if goal == TRANSFORMER_GOAL_POINTS else " (CNN)"))
    notes = [f"{arguments.calibration_samples} calibration images from the train split (the first ones, batches of "
             f"{support.even_batch_size(arguments.calibration_samples, 32)}), "
             f"{len(test_labels)} test images; qgraph: ort-cpu QOperator, reduce-range auto; quantize_static: "
             f"{support.ORT_SETTINGS} (per_channel=False on the per-tensor rows), after quant_pre_process.", *verdicts]
    if plumbing:
        notes.insert(0, "UNTRAINED models: plumbing check only, the accuracies mean nothing.")
    support.print_table("Fashion-MNIST top-1 (%)", ["model", "quantizer / method", "weights", "top-1", "Δ vs FP32",
                                                      "goal met"], rows, notes=notes)


# ------------------------------------------------------------------------------------------- qoperator vs qdq
def command_qoperator_vs_qdq(arguments: argparse.Namespace) -> None:
    from qgraph.data import load_fashion_mnist

    if arguments.quick:
        arguments.evaluation_samples = 500
    paths = _default_models(arguments.models)
    models = {path.stem: onnx.load(str(path)) for path in paths} if paths else _untrained_models()
    rows = []
    for name, float_model in models.items():
        normalization = _normalization_of(float_model, arguments.normalization)
        calibration_images, _ = load_fashion_mnist("train", limit=arguments.calibration_samples,
                                                   normalization=normalization)
        evaluation_images, _ = load_fashion_mnist("test", limit=arguments.evaluation_samples,
                                                  normalization=normalization)
        input_name = _input_name(float_model)
        results = {
            output_format: support.qgraph_quantize(
                float_model, support.array_batches({input_name: calibration_images}, 32), method=arguments.method,
                output_format=output_format, batch_size=32, threads=arguments.threads)
            for output_format in ("qoperator", "qdq")
        }
        qoperator = _quantized_proto(results["qoperator"])
        qdq = _quantized_proto(results["qdq"])
        parameters = results["qoperator"].quantization.parameters
        output_name = qoperator.graph.output[0].name  # _predict compares the first output
        integer = _predict(qoperator, evaluation_images, threads=arguments.threads)
        step = _output_step(parameters, output_name, results["qdq"])
        references = {
            "QDQ, ORT optimisation off (float math)": _predict(qdq, evaluation_images, threads=arguments.threads,
                                                               optimize=False),
            "QDQ, ORT_ENABLE_ALL (ORT's own QDQ fusion)": _predict(qdq, evaluation_images, threads=arguments.threads),
            "FP32 (for scale)": _predict(float_model, evaluation_images, threads=arguments.threads),
        }
        for label, reference in references.items():
            difference = np.abs(integer - reference)
            within = "" if label.startswith("FP32") else ("yes" if difference.max() <= step * 1.0001 else "NO")
            rows.append([name, label, float(difference.max()), step, float(difference.max()) / step,
                         float(np.mean(difference > step * 1.0001) * 100.0), within])
    support.print_table(
        f"qgraph QOperator vs QDQ outputs ({arguments.method}, {arguments.evaluation_samples} test images)",
        ["model", "QOperator compared with", "max |diff|", "step", "max |diff| / step", "% elements > 1 step",
         "≤ 1 step"],
        rows,
        notes=["QOperator model with ORT_ENABLE_ALL. Step: the scale of the graph output's quantization, or, when the "
               "output is float (QGemm/Gemm with a float result, as for these classifiers), of the last quantized "
               "tensor before it. The float-math QDQ reference rounds every layer in float; the integer kernels "
               "requantize with their own fixed-point rounding, and one-step flips in early layers propagate through "
               "the network (this table does not measure per-op differences)."],
    )


def _output_step(parameters, output_name: str, qdq_result) -> float:
    """The scale of the quantization the graph output comes from (the output itself or the tensor before it)."""
    if output_name in parameters:
        return float(np.max(parameters[output_name].scale))
    qdq = _quantized_proto(qdq_result)
    producers = {produced: node for node in qdq.graph.node for produced in node.output}
    node = producers.get(output_name)
    while node is not None and node.op_type != "DequantizeLinear":
        node = producers.get(node.input[0]) if node.input else None
    if node is None:
        return float("nan")
    initializers = {initializer.name: initializer for initializer in qdq.graph.initializer}
    scale = onnx.numpy_helper.to_array(initializers[node.input[1]])
    return float(np.max(scale))
