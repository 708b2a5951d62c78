"""Kernels of omnicompile: each op's Triton kernels beside its pure-PyTorch reference.

Installed as ``omnicompile.kernels``. Python started at the repository root finds this folder as a
top-level ``kernels`` first, which would shadow the PyPI package of that name (transformers >= 5.25
imports it). Imported under that name, the folder steps aside: it loads the ``kernels`` found on
the rest of ``sys.path`` in its place, or fails as a missing package does.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    )
    if _spec is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (this repository's kernels/ folder is omnicompile.kernels)",
            name="kernels",
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import system returns what sys.modules holds after this file runs
    _spec.loader.exec_module(_module)
