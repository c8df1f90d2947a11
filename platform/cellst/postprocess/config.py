"""Schema of the ``postprocess`` section (HoVer watershed parameters), free of scipy,
scikit-image and torch.

Re-exported by :mod:`cellst.postprocess.hover`, which implements the watershed; defined
here so configurations load without importing it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from cellst.config import Section

__all__ = ["HoverParams", "PostprocessConfig", "halo_width"]


class HoverParams(Section):
    """Parameters of :func:`hover_to_instances` (see :class:`PostprocessConfig`)."""

    mask_threshold: float = Field(0.5, gt=0.0, le=1.0, description="foreground: prob >= this")
    marker_threshold: float = Field(
        0.4, gt=0.0, le=1.0, description="border energy >= this is not a marker"
    )
    sobel_kernel: int = Field(21, ge=3, le=101, description="odd Sobel kernel size")
    min_object_size: int = Field(10, ge=0, le=1_000_000, description="minimum object pixels")
    marker_radius: int = Field(2, ge=0, le=32, description="disk radius of the marker opening")
    distance_sigma: float = Field(1.0, ge=0.0, le=16.0, description="distance-map smoothing")

    @field_validator("sobel_kernel")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"sobel_kernel must be odd, got {value}")
        return value

    def hover_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`hover_to_instances`."""
        return {name: getattr(self, name) for name in HoverParams.model_fields}

    def halo(self) -> int:
        """Context (pixels) the local filters need around a region; see :func:`halo_width`."""
        return halo_width(self.sobel_kernel, self.marker_radius, self.distance_sigma)


class PostprocessConfig(HoverParams):
    """Parameters of the HoVer watershed post-processing (untiled and tiled).

    Attributes
    ----------
    mask_threshold : float
        Nuclear probability at or above which a pixel is foreground (0.5).
    marker_threshold : float
        Border energy (``overall``) at or above which a foreground pixel is not a marker
        (0.4, as the original ``__proc_np_hv``).
    sobel_kernel : int
        Odd size (>= 3) of the Sobel kernel applied to the HoVer maps (21 as the original
        HoVer-Net; MONAI's transform defaults to 5).
    min_object_size : int
        Foreground components and markers with fewer pixels are removed (10; 0 disables).
    marker_radius : int
        Radius of the ``disk`` footprint of the marker opening (2; 0 disables the opening).
    distance_sigma : float
        Sigma of the Gaussian smoothing of the distance map (1.0; 0 disables it).
    tile, tile_overlap : int
        Tile side and overlap of :func:`cellst.postprocess.hover_to_instances_tiled`
        (2048, 256). The overlap must exceed the largest cell diameter for tiling to be
        exact, be at least twice the filter halo (:meth:`halo`) and below ``tile / 2``.
    """

    tile: int = Field(2048, ge=128, le=65536, description="tile side of the tiled mode")
    tile_overlap: int = Field(256, ge=0, le=16384, description="overlap between tiles")

    @model_validator(mode="after")
    def _tiling(self) -> PostprocessConfig:
        if 2 * self.tile_overlap >= self.tile:
            raise ValueError(
                f"tile_overlap ({self.tile_overlap}) must be smaller than tile / 2 ({self.tile})"
            )
        need = 2 * self.halo()
        if self.tile_overlap < need:
            raise ValueError(
                f"tile_overlap ({self.tile_overlap}) must be at least {need} (twice the filter "
                f"halo of sobel_kernel={self.sobel_kernel}, marker_radius={self.marker_radius}, "
                f"distance_sigma={self.distance_sigma})"
            )
        return self


def halo_width(sobel_kernel: int, marker_radius: int, distance_sigma: float) -> int:
    """Pixels of context the local filters need beyond a region (Sobel + Gaussian + opening)."""
    return sobel_kernel // 2 + _gauss_tail(distance_sigma) + 2 * marker_radius + 1


def _gauss_tail(sigma: float) -> int:
    """Half-width of MONAI's ``gaussian_1d`` kernel (``truncated=4``)."""
    return int(max(float(sigma) * 4.0, 0.5) + 0.5) if sigma > 0 else 0
