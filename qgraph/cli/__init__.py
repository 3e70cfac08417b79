"""The ``qgraph`` command line: click commands that build the options and call the Python API."""

from qgraph.cli.main import cli, main

__all__ = ["cli", "main"]
