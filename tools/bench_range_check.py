"""The range check (:mod:`qgraph.range_check`) on the paddle-style recogniser: each method with and without it.

For each calibration method, the recogniser of :mod:`qgraph.models.paddle_recognizer` (opset 13, 100+ quantizable
layers, random weights with outlier channels) is quantized by ``optimize`` on 64 generated text lines, with the
sensitivity search off (``min_sqnr=None``: what the check alone does), once with the range check and once without;
the written (lowered) model's output SQNR against FP32 is measured on 16 other text lines, and the check's decision
is printed::

    python tools/bench_range_check.py                        # minmax, entropy, percentile
    python tools/bench_range_check.py --methods entropy mse --search
"""

from __future__ import annotations

import argparse
import logging
import time

import onnx_ir as ir

from qgraph.calibrate.driver import CalibrationConfig
from qgraph.models import paddle_recognizer
from qgraph.output_comparison import OutputComparison
from qgraph.pipeline import OptimizeOptions, optimize
from qgraph.ptq import QuantizeOptions

logger = logging.getLogger("bench_range_check")


def run(method: str, range_check: bool, search: bool, calibration, held_out) -> tuple[float, float, object]:
    """(held-out output SQNR of the written model, seconds, the RangeCheck or None)."""
    options = QuantizeOptions(calibration=CalibrationConfig(method=method, range_check=range_check),
                              min_sqnr=QuantizeOptions.min_sqnr if search else None, speed_choice=False)
    model = ir.serde.deserialize_model(paddle_recognizer.build_paddle_recognizer())
    started = time.perf_counter()
    result = optimize(model, options=OptimizeOptions(quantization=options),
                      calibration_data=[{paddle_recognizer.INPUT_NAME: calibration[start:start + 16]}
                                        for start in range(0, len(calibration), 16)])
    seconds = time.perf_counter() - started
    feeds = [{paddle_recognizer.INPUT_NAME: held_out}]
    reference = OutputComparison(result.float_model, feeds).outputs()
    sqnr = OutputComparison(ir.serde.serialize_model(result.model), feeds).sqnr(reference)
    return sqnr, seconds, result.quantization.range_check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["minmax", "entropy", "percentile"])
    parser.add_argument("--search", action="store_true", help="keep the sensitivity search on (default bound)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    calibration = paddle_recognizer.calibration_images(64, seed=0)
    held_out = paddle_recognizer.calibration_images(16, seed=1)
    search = "on" if arguments.search else "off"
    print(f"paddle-style recogniser, 64 calibration / 16 held-out text lines, sensitivity search {search}")
    print("| method | check | held-out output SQNR dB | seconds | decision |")
    print("|---|---|---|---|---|")
    for method in arguments.methods:
        for range_check in (False, True):
            sqnr, seconds, check = run(method, range_check, arguments.search, calibration, held_out)
            decision = "" if check is None else f"{check.action}: {check.describe()}"
            print(f"| {method} | {'on' if range_check else 'off'} | {sqnr:.2f} | {seconds:.1f} | {decision[:160]} |",
                  flush=True)


if __name__ == "__main__":
    main()
