"""Reference models built in code (installed as ``qgraph.models``) and their training recipes."""
