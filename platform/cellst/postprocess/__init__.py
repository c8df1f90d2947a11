"""Post-processing of network outputs into instance maps: the HoVer-Net marker watershed
(:func:`hover_to_instances`), its tiled form for very large images
(:func:`hover_to_instances_tiled`), and the map of each of its named steps (mask, border,
distance, markers, watershed) for inspection (:func:`hover_steps`).

Names are imported lazily, so the section schema (:mod:`cellst.postprocess.config`) can be
read without importing scipy and scikit-image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellst._lazy import lazy_getattr

_NAMES = {
    "HoverParams": "config",
    "PostprocessConfig": "config",
    "halo_width": "config",
    "HoverSteps": "hover",
    "hover_steps": "hover",
    "hover_to_instances": "hover",
    "relabel_sequential": "hover",
    "sobel_kernels": "hover",
    "hover_to_instances_tiled": "tiled",
    "postprocess_hover": "tiled",
    "tile_layout": "tiled",
}
__all__ = [
    "HoverParams",
    "HoverSteps",
    "PostprocessConfig",
    "halo_width",
    "hover_steps",
    "hover_to_instances",
    "hover_to_instances_tiled",
    "postprocess_hover",
    "relabel_sequential",
    "sobel_kernels",
    "tile_layout",
]

if TYPE_CHECKING:
    from cellst.postprocess.config import HoverParams, PostprocessConfig, halo_width
    from cellst.postprocess.hover import (
        HoverSteps,
        hover_steps,
        hover_to_instances,
        relabel_sequential,
        sobel_kernels,
    )
    from cellst.postprocess.tiled import hover_to_instances_tiled, postprocess_hover, tile_layout

__getattr__ = lazy_getattr(__name__, _NAMES)
