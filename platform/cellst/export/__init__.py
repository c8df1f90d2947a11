"""Export of segmentation results for downstream tools.

Per-cell measurement tables (:mod:`cellst.export.measure`), QuPath GeoJSON detections
(:mod:`cellst.export.geojson`) and OME-Zarr stores (:mod:`cellst.export.omezarr`). Names are
imported lazily so that importing the package stays cheap.
"""

from __future__ import annotations

from cellst._lazy import lazy_getattr

_NAMES = {
    "cell_table": "measure",
    "combine_tables": "measure",
    "write_cell_tables": "measure",
    "write_image_table": "measure",
    "label_to_features": "geojson",
    "write_geojson": "geojson",
    "is_cellst_geojson": "geojson",
    "write_ome_zarr": "omezarr",
    "read_ome_zarr": "omezarr",
    "export_store": "omezarr",
    "cellst_provenance": "omezarr",
}
__all__ = sorted(_NAMES)


__getattr__ = lazy_getattr(__name__, _NAMES)
