"""Environment variables of this process set for one block: stdlib only.

Ray Train and MLflow read their settings from ``os.environ`` (Ray Train when ``fit()``
starts its controller, MLflow at every HTTP request), so cellst sets them around the call
that reads them and puts the previous values back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

__all__ = ["environ"]


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set for the block; afterwards each variable is as it
    was (removed again where it was not set)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
