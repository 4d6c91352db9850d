"""The examples in gradlight's docstrings run and print what they say (``+SKIP`` ones need a Trainer)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import gradlight

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(gradlight.__path__, "gradlight.") if not name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
