"""Lazy package attributes: ``from cellst.stpp import run_stpp`` without importing Ray early."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``package.<names[name]>`` on first access.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    names : mapping
        Public name -> submodule that defines it.
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        namespace[name] = value  # later lookups skip this function
        return value

    return __getattr__
