"""Accuracy-driven tuning: the user's metric picks the quantization (see :mod:`qgraph.tuning.driver`).

:mod:`.configuration` (the search space, its options, a trial), :mod:`.search` (the rounds, cheapest first),
:mod:`.driver` (``tune``: scoring, trials in this process or on Ray through :mod:`qgraph.ray_trials`, the choice).
"""

from qgraph.tuning.configuration import TUNE_FOR, Trial, TrialConfiguration, TuningOptions
from qgraph.tuning.driver import (
    BoundNotMetError,
    EvaluationError,
    TuningResult,
    check_bound,
    command_evaluator,
    describe_trials,
    replay,
    sensitivity_order,
    tune,
)
from qgraph.tuning.search import SEARCH_METHODS, ModelFacts, Round, search_rounds

__all__ = [
    "SEARCH_METHODS", "TUNE_FOR", "BoundNotMetError", "EvaluationError", "ModelFacts", "Round", "Trial",
    "TrialConfiguration", "TuningOptions", "TuningResult", "check_bound", "command_evaluator", "describe_trials",
    "replay", "search_rounds", "sensitivity_order", "tune",
]
