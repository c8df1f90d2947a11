"""Data stage: synthetic data, ingest into the zarr store, and Ray Data streams over it."""

from cellst.data.store import CellStore, ItemRef, StoreError

__all__ = ["CellStore", "ItemRef", "StoreError"]
