"""The files a tuning test starts from: the residual CNN, two calibration batches as an .npz, and a scoring script."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from tests.ptq.small_models import calibration_batches, residual_cnn


def write_tuning_files(folder: Path, score_script: str) -> Path:
    """``folder`` with ``m.onnx``, ``calib.npz`` and ``score.py`` (``score_script``) written into it."""
    onnx.save(residual_cnn(), folder / "m.onnx")
    np.savez(folder / "calib.npz", input=np.concatenate([batch["input"] for batch in calibration_batches(count=2)]))
    (folder / "score.py").write_text(score_script)
    return folder
