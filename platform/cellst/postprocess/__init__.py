"""Post-processing of network outputs into instance maps: the HoVer-Net marker watershed
(:func:`hover_to_instances`) and its tiled form for very large images
(:func:`hover_to_instances_tiled`)."""

from cellst.postprocess.hover import (
    HoverParams,
    PostprocessConfig,
    halo_width,
    hover_to_instances,
    relabel_sequential,
    sobel_kernels,
)
from cellst.postprocess.tiled import hover_to_instances_tiled, postprocess_hover, tile_layout

__all__ = [
    "HoverParams",
    "PostprocessConfig",
    "halo_width",
    "hover_to_instances",
    "hover_to_instances_tiled",
    "postprocess_hover",
    "relabel_sequential",
    "sobel_kernels",
    "tile_layout",
]
