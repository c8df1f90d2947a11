"""Schemas of the ``inference``, ``predict`` and ``segment`` sections, free of torch, MONAI and Ray.

:class:`InferenceConfig` and :class:`PredictConfig` are re-exported by
:mod:`cellst.inference.predictor` and :mod:`cellst.inference.batch`, which use them; they
are defined here so configurations load without importing those.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from cellst.config import Section

__all__ = [
    "SPEED_ONLY_INFERENCE",
    "InferenceConfig",
    "PredictConfig",
    "SegmentConfig",
    "inference_identity",
]


class InferenceConfig(Section):
    """How whole images are run through the network."""

    # a window hovernet-lite cannot take is one config error, not a failure per image
    roi: int = Field(
        256, ge=32, multiple_of=32, description="sliding-window size for hovernet-lite"
    )
    overlap: float = Field(0.25, ge=0, lt=1, description="sliding-window overlap fraction")

    sw_batch_size: int = Field(8, ge=1, description="windows per forward pass")
    tta: bool = Field(False, description="flip test-time augmentation (4 flips)")
    block: int = Field(2048, ge=256, description="images larger than this run block by block")
    block_margin: int = Field(128, ge=0, description="context kept around each block")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    rescale_diameter: float | None = Field(
        None,
        gt=0,
        description="cell-size rescaling: an image whose cells (median diameter of a first "
        "segmentation) are smaller than this many pixels is upsampled so that they reach it, "
        "at most max_upscale times, and segmented again; the labels are resized back "
        "(Cellpose's diameter rescaling). None: off",
    )
    max_upscale: float = Field(
        2.0, ge=1.0, le=4.0, description="largest upsampling factor of rescale_diameter"
    )


class PredictConfig(Section):
    """Resources of the batch-prediction actor pool."""

    num_actors: int = Field(
        1,
        ge=0,
        description="model replicas (actors); 0: predict in this process (no actor to start, "
        "about 5 s less per call on 2 CPUs; images are still read by Ray Data tasks)",
    )
    num_gpus_per_actor: float = Field(0, ge=0, description="GPUs per actor; 0 runs on CPU")
    num_cpus_per_actor: float = Field(1, gt=0, description="CPUs per actor")
    postprocess_cpus: float = Field(1, gt=0, description="CPUs per post-processing task")


class SegmentConfig(Section):
    """What ``cellst segment`` writes and when it runs on Ray instead of in-process.

    Small jobs (at most ``in_process_max_images`` images and ``in_process_max_mpx``
    megapixels in all) run in the calling process, with no Ray start-up; larger ones, or
    ``--ray``, use the distributed batch path of ``cellst predict``.
    """

    exclude_on_edges: bool = Field(False, description="drop cells touching the image border")
    min_size: int = Field(
        0, ge=0, description="drop cells of fewer pixels, after post-processing (0: keep all)"
    )
    save_png: bool = Field(False, description="write NAME_overlay.png (outlines and ids)")
    save_csv: bool = Field(False, description="write per-cell measurements NAME_cells.csv")
    save_geojson: bool = Field(False, description="write NAME.geojson (QuPath detections)")
    save_ome_zarr: bool = Field(False, description="write NAME.ome.zarr (image and labels)")
    in_process_max_images: int = Field(
        64, ge=0, description="jobs of more images run on Ray (the cellst predict path)"
    )
    in_process_max_mpx: float = Field(
        256.0, ge=0, description="jobs of more megapixels in all run on Ray"
    )


#: inference settings that change only speed and memory, never a prediction
SPEED_ONLY_INFERENCE = frozenset({"sw_batch_size"})


def inference_identity(infer: InferenceConfig) -> dict[str, Any]:
    """The inference settings of ``infer`` that make other predictions than the defaults
    (flip TTA, cell-size rescaling, window size and overlap...): part of a pseudo-label
    set's model identity, and recorded with a checkpoint's calibration."""
    dump = infer.model_dump(mode="json", exclude_defaults=True)
    return {k: v for k, v in sorted(dump.items()) if k not in SPEED_ONLY_INFERENCE}
