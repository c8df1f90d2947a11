"""Data stage: synthetic data, ingest into the zarr store, and Ray Data streams over it.

Names are imported lazily, so :mod:`cellst.data.images` (reading image files) does not
import zarr and pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellst._lazy import lazy_getattr

__all__ = ["CellStore", "ItemRef", "StoreError"]

if TYPE_CHECKING:
    from cellst.data.store import CellStore, ItemRef, StoreError

__getattr__ = lazy_getattr(__name__, dict.fromkeys(__all__, "store"))
