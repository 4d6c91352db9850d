"""Installs the test suite's network guard in every Python process started by the tests.

``tests/conftest.py`` puts this folder on ``PYTHONPATH`` and sets ``GRADLIGHT_NETGUARD_LOG``; outside the tests
(the variable unset) this module does nothing but chain to any other ``sitecustomize`` on the path.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _chain_next_sitecustomize() -> None:
    """Run the ``sitecustomize`` this one shadows (e.g. a distribution's), if any."""
    path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get("GRADLIGHT_NETGUARD_LOG"):
    import gradlight_netguard

    gradlight_netguard.install()
_chain_next_sitecustomize()
