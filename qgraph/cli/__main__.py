"""``python -m qgraph.cli``: the same command line as ``qgraph``."""

from qgraph.cli.main import main

main()
