"""The registry of passes by name, which the CLI lists and pipelines are assembled from."""

from __future__ import annotations

from typing import TypeVar

from qgraph.errors import PipelineError

PassClass = TypeVar("PassClass", bound=type)

_PASSES: dict[str, type] = {}


def register(pass_class: PassClass) -> PassClass:
    """Class decorator: make a pass available by its class name."""
    name = pass_class.__name__
    if name in _PASSES and _PASSES[name] is not pass_class:
        raise ValueError(f"two passes are named {name}")
    _PASSES[name] = pass_class
    return pass_class


def _ensure_loaded() -> None:
    import qgraph.passes.catalog  # noqa: F401  (importing registers every pass)


def available_passes() -> dict[str, type]:
    """Every registered pass by name, ordered by phase and then name."""
    _ensure_loaded()
    return dict(sorted(_PASSES.items(), key=lambda item: (item[1].phase, item[0])))


def get_pass(name: str) -> type:
    passes = available_passes()
    if name not in passes:
        raise PipelineError(f"unknown pass {name!r}; `qgraph passes` lists the {len(passes)} available passes")
    return passes[name]
