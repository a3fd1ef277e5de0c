"""The command lines of ``python -m serve_demo``: read arguments, call the package, print."""
