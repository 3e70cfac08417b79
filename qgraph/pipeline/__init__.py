"""Phases, the pass registry, the instrumented pass manager and the ``optimize`` entry point."""

from qgraph.pipeline.phases import Phase

__all__ = ["Phase"]
