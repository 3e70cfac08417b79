"""The command line's tuning options: --tune-for speed, --tune-workers, and the bad inputs not covered elsewhere.

tests/test_tuning.py has the failing, number-less and NaN FP32 evaluations and the unmet bound; tests/test_tuning_ray.py
the Ray address that does not answer, Ray missing with --ray-address, and --tune-workers 2 on a real Ray.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from click.testing import CliRunner

from qgraph.cli.main import cli
from tests.tuning_files import write_tuning_files

# scores the FP32 model 1.0 (its path is m.onnx), a quantized one from its QuantizeLinear count or NaN
SCORE_SCRIPT = textwrap.dedent("""
    import sys
    import onnx
    path, mode = sys.argv[1:3]
    if path.endswith("m.onnx"):
        print(1.0)
    elif mode == "nan":
        print("nan")
    else:
        print(1.0 - 0.001 * sum(node.op_type == "QuantizeLinear" for node in onnx.load(path).graph.node))
""")


@pytest.fixture()
def files(tmp_path):
    return write_tuning_files(tmp_path, SCORE_SCRIPT)


def _arguments(files, mode: str = "count") -> list[str]:
    return ["optimize", str(files / "m.onnx"), "-o", str(files / "out.onnx"), "--calib", str(files / "calib.npz"),
            "--eval", f"{sys.executable} {files / 'score.py'} {{model}} {mode}"]


def test_tune_for_speed_goes_on_past_the_first_trial_that_meets_the_bound(files):
    result = CliRunner().invoke(cli, _arguments(files) + ["--max-drop", "0.5", "--tune-for", "speed",
                                                          "--tune-budget", "7"])
    assert result.exit_code == 0, result.output
    summary = json.loads((files / "out.trials.json").read_text())
    assert summary["tune_for"] == "speed" and len(summary["trials"]) == 7
    assert all(trial["meets_bound"] for trial in summary["trials"])  # --tune-for accuracy would stop at the first
    assert all(trial["latency_ms"] > 0 for trial in summary["trials"])
    chosen = summary["chosen"]
    assert f"* #{chosen} " in result.output and "tuning: 7 trials" in result.output
    assert (files / "out.onnx").exists() and (files / "out.toml").exists()


def test_trials_that_score_nan_miss_the_bound_and_say_so(files):
    result = CliRunner().invoke(cli, _arguments(files, "nan") + ["--max-drop", "0.5", "--tune-budget", "2"])
    assert result.exit_code == 2, result.output
    assert "every trial scored NaN" in result.output and "Traceback" not in result.output
    summary = json.loads((files / "out.trials.json").read_text())
    assert [trial["meets_bound"] for trial in summary["trials"]] == [False, False]


@pytest.mark.parametrize("extra, message", [
    (["--tune-workers", "0"], "--tune-workers"),
    (["--tune-for", "size"], "--tune-for"),
    (["--tune-budget", "many"], "--tune-budget"),
    (["--tune-budget", "0"], "--tune-budget"),
    (["--max-drop", "-1"], "--max-drop"),
])
def test_bad_tuning_options_are_clear_errors(files, extra, message):
    arguments = _arguments(files) + (["--max-drop", "0.5"] if "--max-drop" not in extra else []) + extra
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (files / "out.onnx").exists()
