"""What one tuning trial is: a point of the search space, the options of the search, and what a trial measured.

A :class:`TrialConfiguration` is written as a TOML recipe (:mod:`qgraph.annotate.config_file`) and the trial runs
*from that recipe*: the recipe of the chosen trial is what ``--config`` replays, byte for byte the same model (QAT,
which no config setting expresses, is recorded in the recipe's header as the command-line flags that replay it).
Trials run the target's plain lowering (see :meth:`TrialConfiguration.quantization`): the recipe's header gives
the replay's command line with ``--no-speed-choice``.
"""

from __future__ import annotations

import dataclasses
import json
import math

from qgraph.errors import QGraphError
from qgraph.ptq import QuantizeOptions

#: What ``--tune-for`` may ask: the first configuration that meets the bound, or the fastest that does.
TUNE_FOR = ("accuracy", "speed")


@dataclasses.dataclass(frozen=True)
class TuningOptions:
    #: The largest acceptable drop of the score from the FP32 model's.
    max_drop: float
    higher_is_better: bool = True
    #: At most this many trials (None: the whole search).
    budget: int | None = None
    #: At most this many minutes of search: no round of trials starts after them (None: no limit).
    budget_minutes: float | None = None
    #: Measure each trial's latency (batch 1, median of this many runs; 0 skips it).
    latency_runs: int = 20
    #: "accuracy": stop at the first configuration that meets the bound; "speed": keep searching for the fastest.
    tune_for: str = "accuracy"
    #: Trials run at once: 1 runs them in this process; more run them as Ray tasks (see :mod:`qgraph.ray_trials`).
    workers: int = 1
    #: An existing Ray cluster (``ray.init(address=...)``); None starts a local instance when ``workers > 1``.
    ray_address: str | None = None
    #: QAT with distillation on the calibration data as the last stage (needs onnxruntime-training).
    qat_epochs: int = 2

    def __post_init__(self) -> None:
        if not math.isfinite(self.max_drop) or self.max_drop < 0:
            raise QGraphError(f"--max-drop must be a finite number >= 0, got {self.max_drop!r}")
        if self.budget is not None and self.budget < 1:
            raise QGraphError(f"--tune-budget must be at least 1 trial, got {self.budget}")
        if self.budget_minutes is not None and not (self.budget_minutes > 0 and math.isfinite(self.budget_minutes)):
            raise QGraphError(f"--tune-budget in minutes must be positive, got {self.budget_minutes}")
        if self.tune_for not in TUNE_FOR:
            raise QGraphError(f"--tune-for must be one of {', '.join(TUNE_FOR)}, got {self.tune_for!r}")
        if self.workers < 1:
            raise QGraphError(f"--tune-workers must be at least 1, got {self.workers}")
        if self.qat_epochs < 1:
            raise QGraphError(f"qat_epochs must be at least 1, got {self.qat_epochs}")

    def drop(self, fp32_score: float, score: float) -> float:
        """How much worse ``score`` is than ``fp32_score`` (negative: better)."""
        return fp32_score - score if self.higher_is_better else score - fp32_score

    def meets(self, fp32_score: float, score: float) -> bool:
        return not math.isnan(score) and self.drop(fp32_score, score) <= self.max_drop

    def bound_text(self) -> str:
        return f"drop at most {self.max_drop:g} ({'higher' if self.higher_is_better else 'lower'} is better)"


@dataclasses.dataclass(frozen=True)
class TrialConfiguration:
    """One point of the search space (every field a setting of the recipe)."""

    method: str = "minmax"
    per_channel: bool = True
    #: SmoothQuant alpha (None: off).
    smooth_quant: float | None = None
    bias_correction: str = "off"
    activations: str = "static"
    #: Weight initializers quantized to 4 bits (the rest 8).
    four_bit_weights: tuple[str, ...] = ()
    #: Nodes kept in FP32 (most damaging first).
    fp32_layers: tuple[str, ...] = ()
    #: Fine-tuned by QAT with distillation on the calibration data after calibration.
    qat: bool = False
    #: The search stage that proposed it (not a setting: two stages proposing the same point are the same point).
    stage: str = dataclasses.field(default="method", compare=False)

    def describe(self) -> str:
        parts = [f"method={self.method}", "per-channel weights" if self.per_channel else "per-tensor weights"]
        if self.smooth_quant is not None:
            parts.append(f"SmoothQuant alpha={self.smooth_quant:g}")
        if self.bias_correction != "off":
            parts.append(f"bias correction {self.bias_correction}")
        if self.activations != "static":
            parts.append(f"{self.activations} activations")
        if self.four_bit_weights:
            parts.append(f"{len(self.four_bit_weights)} weight(s) 4-bit")
        if self.fp32_layers:
            parts.append(f"{len(self.fp32_layers)} layer(s) FP32 ({', '.join(self.fp32_layers)})")
        if self.qat:
            parts.append("QAT (distillation)")
        return ", ".join(parts)

    def quantization(self, base: QuantizeOptions, recipe_path) -> QuantizeOptions:
        """``base`` running this configuration's recipe (written at ``recipe_path``), the automatic fallback off, and
        the speed choice off: it times candidates on the machine as loaded at that moment and may keep layers in
        FP32, so trials (and their replay) would not be reproducible; ``--tune-for speed`` measures instead."""
        return dataclasses.replace(base, config=recipe_path, min_sqnr=None, sensitivity_table=False,
                                   speed_choice=False)

    def to_recipe(self, base: QuantizeOptions, qat_epochs: int = 2, min_sqnr: float | None = None) -> str:
        """The configuration as a ``--config`` file (see :mod:`qgraph.annotate.config_file`); ``min_sqnr`` turns
        the automatic fallback on (the sensitivity analysis of the search), off by default."""
        exclude = sorted(base.overrides.exclude | frozenset(self.fp32_layers))
        header = ("# qgraph tuning recipe: qgraph optimize MODEL -o OUT --calib CALIB --no-speed-choice --config "
                  "THIS_FILE replays it")
        if self.qat:
            header += f"\n# with QAT: add --qat --distill --train-data CALIB --epochs {qat_epochs}"
        lines = [
            header,
            "exclude = [" + ", ".join(json.dumps(name) for name in exclude) + "]",
            "",
            "[quantization]",
            f"method = {json.dumps(self.method)}",
            f"per_channel = {'true' if self.per_channel else 'false'}",
            "min_sqnr = " + ('"off"' if min_sqnr is None else repr(float(min_sqnr))),
            "smooth_quant = " + ('"off"' if self.smooth_quant is None else repr(float(self.smooth_quant))),
            f"bias_correction = {json.dumps(self.bias_correction)}",
            f"activations = {json.dumps(self.activations)}",
            "",
        ]
        for weight in sorted(self.four_bit_weights):
            lines += [f"[weight.{json.dumps(weight)}]", "bits = 4", ""]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Trial:
    configuration: TrialConfiguration
    score: float
    meets_bound: bool
    latency_ms: float | None
    size_bytes: int
    seconds: float
    #: Which worker ran it ("local", or the Ray node and process).
    worker: str = "local"


def budget_fields(text: str | None) -> dict[str, float | int | None]:
    """``--tune-budget``: ``N`` trials, or ``Nmin`` minutes, as :class:`TuningOptions` fields."""
    if text is None:
        return {}
    value = text.strip().lower()
    try:
        if value.endswith(("min", "m")):
            return {"budget_minutes": float(value.removesuffix("min").removesuffix("m"))}
        return {"budget": int(value)}
    except ValueError:
        raise QGraphError(f"--tune-budget takes N trials or Nmin minutes (e.g. 12 or 30min), got {text!r}") from None
