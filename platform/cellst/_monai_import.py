"""MONAI's import without the optional packages cellst never uses through MONAI.

MONAI's package ``__init__`` imports every submodule, and several of them import, through
``monai.utils.optional_import``, packages that happen to be installed beside it: mlflow
(for MONAI's MLflow handler, with FastAPI and the rest of mlflow's server), matplotlib,
pandas, scikit-learn and scipy.signal. cellst uses MONAI's networks, transforms and
inferers, none of which needs them, yet every process that imports MONAI paid for them:
``import monai`` took 3.9 s here, 1.4 s without them (torch itself 1.3 s more). Every
Ray Train worker, prediction actor and crop-reading task cellst starts imports MONAI once.

:func:`skip_monai_extras` installs an import hook that answers "not installed" for those
packages *only to the thread running MONAI's own ``__init__``, while it runs*. MONAI's
``optional_import`` then records them as missing (its documented behaviour for an absent
optional package), and MONAI's import goes on. ``import mlflow``, ``import pandas``... in
any other thread, or later (cellst's tracking, Ray Data), import them as usual. What stops
working is only the MONAI features built on them, none of which cellst uses (listed by
comparing MONAI's optional-import flags with and without the hook, MONAI 1.6):
``MLFlowHandler``, the pandas parts of ``monai.data`` (``CSVDataset``,
``CSVIterableDataset``, table helpers) and TCIA downloads, ``monai.visualize`` and the LR
finder's plots, the ``embedding_collapse`` metric, the ultrasound confidence map and the
signal transforms' notch filter. cellst installs the hook in the processes it starts
itself (the ``cellst`` command and its Ray workers), not in a user's own Python session
that merely imports cellst.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import threading
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

#: top-level packages (or modules) MONAI imports optionally that cellst never needs from it
#: (scipy.stats only through scipy.signal)
SKIPPED: frozenset[str] = frozenset(
    {"mlflow", "matplotlib", "pandas", "sklearn", "scipy.signal", "scipy.stats"}
)

#: set to 1 to import MONAI whole (e.g. to use MONAI's MLflow handler in a worker)
FULL_IMPORT_ENV = "CELLST_FULL_MONAI_IMPORT"


def _skipped(name: str) -> bool:
    return any(name == s or name.startswith(s + ".") for s in SKIPPED)


def monai_initialising() -> bool:
    """Whether MONAI's package ``__init__`` is running in this process right now."""
    spec = getattr(sys.modules.get("monai"), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


class SkipWhileMonaiImports(importlib.abc.MetaPathFinder):
    """Import hook: the packages in :data:`SKIPPED` are "not installed" to the thread that
    runs MONAI's ``__init__``, while it runs; importable as usual at any other time and in
    any other thread (a training worker's stream and metric threads import pandas and
    mlflow while its main thread imports MONAI)."""

    def __init__(self) -> None:
        self._monai_thread: int | None = None  # the thread that began importing MONAI

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname == "monai":
            self._monai_thread = threading.get_ident()
        elif (  # cheapest test first: this runs for every module a process imports
            threading.get_ident() == self._monai_thread
            and monai_initialising()
            and _skipped(fullname)
        ):
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (skipped while MONAI imports; see cellst)",
                name=fullname,
            )
        return None  # let the other finders find it


def skip_monai_extras() -> None:
    """Install :class:`SkipWhileMonaiImports` in this process, once.

    Does nothing when MONAI is already imported or ``CELLST_FULL_MONAI_IMPORT=1``.
    """
    if os.environ.get(FULL_IMPORT_ENV) == "1" or "monai" in sys.modules:
        return
    if not any(isinstance(f, SkipWhileMonaiImports) for f in sys.meta_path):
        sys.meta_path.insert(0, SkipWhileMonaiImports())
