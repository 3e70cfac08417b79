"""Sensitivity analysis and automatic fallback: the per-layer table and the output SQNR before and after fallback.

For each model: canonicalize, calibrate, measure every layer's single-layer output SQNR (the model with only that
layer quantized, see qgraph.sensitivity) and let the fallback put layers back to FP32 until the output SQNR
meets --min-sqnr. Models: the destructive MLP of tools/sensitivity_models.py (one Gemm whose int8 weights lose
everything but an outlier), and the reference models (models/trained/*.onnx when present, else untrained small
ResNet built in code), calibrated on the bundled Fashion-MNIST subset; top-1 on the test subset where the model is
trained.

    python tools/bench_sensitivity.py                       # default bound, int8
    python tools/bench_sensitivity.py --settings int8 w4 w4pt --min-sqnr 10
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qgraph import runtime  # noqa: E402
from qgraph.calibrate.driver import CalibrationConfig  # noqa: E402
from qgraph.pipeline import OptimizeOptions, optimize  # noqa: E402
from qgraph.ptq import QuantizeOptions  # noqa: E402
from qgraph.report import output_errors  # noqa: E402
from qgraph.sensitivity import DEFAULT_MIN_SQNR_DB  # noqa: E402
from qgraph.targets import TargetOptions  # noqa: E402
from tools.sensitivity_models import feature_batches, outlier_mlp  # noqa: E402

SETTINGS = {
    "int8": dict(),
    "w8pt": dict(per_channel=False),
    "w4": dict(weight_bits=4),
    "w4pt": dict(weight_bits=4, per_channel=False),
}
DATA = ROOT / "models" / "data"


def reference_models() -> list[tuple[str, onnx.ModelProto, bool]]:
    trained = sorted((ROOT / "models" / "trained").glob("*.onnx"))
    if trained:
        return [(path.stem, onnx.load(str(path)), True) for path in trained]
    from qgraph.models.resnet import build_resnet

    return [("resnet-small (untrained)", build_resnet("small"), False)]


def fashion_batches(samples: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    inputs = np.load(DATA / "fashion_mnist_calibration.npz")["input"][:samples].astype(np.float32)
    return [{"input": inputs[start:start + batch_size]} for start in range(0, len(inputs), batch_size)]


def top1(model: onnx.ModelProto, samples: int) -> float:
    data = np.load(DATA / "fashion_mnist_test_subset.npz")
    inputs, labels = data["input"][:samples].astype(np.float32), data["label"][:samples]
    session = runtime.create_session(model, optimize=True, threads=2)
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: inputs[start:start + 250]})[0]
                             for start in range(0, len(inputs), 250)])
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def run(name: str, model: onnx.ModelProto, batches, setting: str, arguments, trained: bool) -> None:
    def quantize_with(min_sqnr):
        options = QuantizeOptions(
            target_options=TargetOptions(reduce_range=arguments.reduce_range, **SETTINGS[setting]),
            calibration=CalibrationConfig(batch_size=arguments.batch_size, threads=2),
            min_sqnr=min_sqnr, sensitivity_table=True, sensitivity_batches=arguments.sensitivity_batches,
        )
        started = time.perf_counter()
        result = optimize(ir.serde.deserialize_model(model), None, OptimizeOptions(quantization=options),
                          calibration_data=iter(batches))
        return result, time.perf_counter() - started

    result, seconds = quantize_with(arguments.min_sqnr)
    sensitivity = result.quantization.sensitivity
    lowered = ir.serde.serialize_model(result.model)
    lowered_sqnr = min(output_errors(result.float_model, lowered, batches[:arguments.sensitivity_batches]).values())
    print(f"\n### {name} — {setting}, bound {arguments.min_sqnr:g} dB\n")
    print("| layer | op | single-layer output SQNR (dB) | fell back |")
    print("| --- | --- | ---: | :---: |")
    for layer in sensitivity.layers:
        print(f"| {layer.node} | {layer.op_type} | {layer.output_sqnr_db:.1f} | {'yes' if layer.fell_back else ''} |")
    print()
    print(f"- output SQNR (QDQ, {sensitivity.batches} calibration batches): fully quantized "
          f"{sensitivity.output_sqnr_db:.1f} dB → after fallback {sensitivity.final_output_sqnr_db:.1f} dB; "
          f"lowered model {lowered_sqnr:.1f} dB")
    print(f"- fell back: {', '.join(sensitivity.fell_back) or 'nothing'}; analysis {sensitivity.seconds:.2f} s "
          f"({len(sensitivity.layers)} layers) of {seconds:.2f} s for canonicalize + quantize")
    if trained:
        off, _ = quantize_with(None)
        print(f"- top-1 on {arguments.test_samples} test images: "
              f"FP32 {top1(result.float_model, arguments.test_samples):.4f}, "
              f"int8 without fallback {top1(ir.serde.serialize_model(off.model), arguments.test_samples):.4f}, "
              f"with fallback {top1(lowered, arguments.test_samples):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-sqnr", type=float, default=DEFAULT_MIN_SQNR_DB)
    parser.add_argument("--settings", nargs="*", default=["int8"], choices=sorted(SETTINGS))
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sensitivity-batches", type=int, default=4)
    parser.add_argument("--test-samples", type=int, default=2000)
    parser.add_argument("--reduce-range", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--skip-reference", action="store_true")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("command: python " + " ".join(shlex.quote(part) for part in sys.argv))
    for setting in arguments.settings:
        run("outlier_mlp (destructive fc2)", outlier_mlp(), feature_batches(), setting, arguments, False)
        if arguments.skip_reference:
            continue
        batches = fashion_batches(arguments.calib_samples, arguments.batch_size)
        for name, model, trained in reference_models():
            run(name, model, batches, setting, arguments, trained)


if __name__ == "__main__":
    main()
