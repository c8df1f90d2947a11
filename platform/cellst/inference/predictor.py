"""Whole-image HoVer-Net inference: any image size, sliding window, flip TTA, bounded memory.

``predict_maps`` turns an ``(H, W, 3) uint8`` image into the nuclear-pixel probability
``(H, W)`` and the HoVer map ``(2, H, W)`` (channel 0 horizontal, 1 vertical):

* images smaller than the network input are padded, larger ones run as a sliding window
  with overlap and Gaussian blending (MONAI ``sliding_window_inference``; for MONAI's
  fixed-size HoVer-Net, ``SlidingWindowHoVerNetInferer`` pads so output and input align);
* optional flip test-time augmentation: each flipped prediction is flipped back, and the
  HoVer channel along the flipped axis changes sign;
* images larger than ``block`` pixels are processed block by block (each block with a
  margin that is discarded), so the memory needed is set by the block, not the image;
  outputs are float16;
* optional cell-size rescaling (``rescale_diameter``): an image whose cells, as a first
  segmentation finds them, are smaller than that diameter is upsampled so that they reach
  it and predicted again, as Cellpose rescales images to its cells' size. Its maps are then
  of the upsampled size: :func:`cellst.postprocess.postprocess_hover` with the image's
  ``shape`` post-processes them there and resizes the labels back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np
import torch

from cellst.inference.config import InferenceConfig

NP_KEY = "nucleus_prediction"
HV_KEY = "horizontal_vertical"


def to_input(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8`` to the network's ``(1, 3, H, W)`` float input in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255)[None]


def pad_image(x: torch.Tensor, bottom: int, right: int) -> torch.Tensor:
    """Pad a ``(B, C, H, W)`` batch at the bottom and right by mirroring the image.

    Zero padding would show the network a black border that it was never trained on (a
    bright-background modality then gets a false cell along the edge); reflection keeps the
    image statistics. Pads wider than the image reflect repeatedly (edge-replicated last).
    """
    while bottom > 0 or right > 0:
        h, w = x.shape[-2:]
        b, r = min(bottom, h - 1), min(right, w - 1)
        if b == 0 and r == 0:  # a 1-pixel side cannot be mirrored
            return torch.nn.functional.pad(x, (0, right, 0, bottom), mode="replicate")
        x = torch.nn.functional.pad(x, (0, r, 0, b), mode="reflect")
        bottom, right = bottom - b, right - r
    return x


def _flips(tta: bool) -> list[tuple[int, ...]]:
    return [(), (3,), (2,), (2, 3)] if tta else [()]


def _window_predictor(model: torch.nn.Module):
    def predict(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model(x)
        return {NP_KEY: torch.softmax(out[NP_KEY].float(), 1)[:, 1:2], HV_KEY: out[HV_KEY].float()}

    return predict


def _run_windows(model: torch.nn.Module, x: torch.Tensor, cfg: InferenceConfig) -> dict:
    """Sliding-window prediction of one ``(1, 3, H, W)`` tensor; outputs have its size."""
    in_size = getattr(model, "input_size", None)
    if in_size is None:
        from monai.inferers import sliding_window_inference

        roi = cfg.roi
        h, w = x.shape[-2:]
        # pad to a multiple of 32 (the lite network's stride) and at least one window
        ph, pw = max(roi, math.ceil(h / 32) * 32), max(roi, math.ceil(w / 32) * 32)
        xp = pad_image(x, ph - h, pw - w)
        out = sliding_window_inference(
            xp,
            roi,
            cfg.sw_batch_size,
            _window_predictor(model),
            overlap=cfg.overlap,
            mode="gaussian",
            padding_mode="reflect",  # never used: xp already holds at least one window
        )
        return {k: v[..., :h, :w] for k, v in out.items()}
    from monai.apps.pathology.inferers import SlidingWindowHoVerNetInferer

    out_size = model.output_size(in_size)
    pad = (in_size - out_size) // 2
    inferer = SlidingWindowHoVerNetInferer(
        roi_size=in_size,
        sw_batch_size=cfg.sw_batch_size,
        overlap=1 - out_size / in_size,
        mode="gaussian",
        padding_mode="reflect",
        extra_input_padding=(pad,) * 4,
    )
    # mirror small images up to one window first, so every pad the inferer adds can reflect
    h, w = x.shape[-2:]
    out = inferer(pad_image(x, max(0, in_size - h), max(0, in_size - w)), _window_predictor(model))
    return {k: v[..., :h, :w] for k, v in out.items()}


@torch.no_grad()
def predict_block(
    model: torch.nn.Module, image: np.ndarray, cfg: InferenceConfig, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Probability ``(H, W)`` and HoVer ``(2, H, W)`` maps (float32) of one image or block."""
    x = to_input(image).to(device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cfg.amp and device.type == "cuda"
        else nullcontext()
    )
    prob = hv = None
    with autocast:
        for dims in _flips(cfg.tta):
            xin = torch.flip(x, dims) if dims else x
            out = _run_windows(model, xin, cfg)
            p, m = out[NP_KEY].float(), out[HV_KEY].float()
            if dims:
                p, m = torch.flip(p, dims), torch.flip(m, dims).clone()
                if 3 in dims:  # flipped along x: horizontal offsets change sign
                    m[:, 0] = -m[:, 0]
                if 2 in dims:  # flipped along y: vertical offsets change sign
                    m[:, 1] = -m[:, 1]
            prob = p if prob is None else prob + p
            hv = m if hv is None else hv + m
    n = len(_flips(cfg.tta))
    return (prob[0, 0] / n).cpu().numpy(), (hv[0] / n).cpu().numpy()


def blocks(h: int, w: int, block: int, margin: int) -> Iterator[tuple[tuple[int, ...], ...]]:
    """Core windows tiling the image and the margin-extended windows to compute them from.

    Yields ``((cy0, cy1, cx0, cx1), (ey0, ey1, ex0, ex1))``.
    """
    for cy0 in range(0, h, block):
        for cx0 in range(0, w, block):
            cy1, cx1 = min(cy0 + block, h), min(cx0 + block, w)
            ey0, ex0 = max(cy0 - margin, 0), max(cx0 - margin, 0)
            ey1, ex1 = min(cy1 + margin, h), min(cx1 + margin, w)
            yield (cy0, cy1, cx0, cx1), (ey0, ey1, ex0, ex1)


def predict_maps(
    model: torch.nn.Module,
    image: np.ndarray,
    cfg: InferenceConfig | None = None,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclear probability ``(H, W)`` and HoVer map ``(2, H, W)`` of a whole image, float16.

    Parameters
    ----------
    model : torch.nn.Module
        A cellst model (``cellst.model.build_model``) in eval mode.
    image : ndarray
        ``(H, W, 3) uint8`` (as stored), any size.

    With ``cfg.rescale_diameter`` set, the maps of an image of small cells are those of its
    upsampled copy, ``(sH, sW)`` for the factor ``s`` of :func:`rescale_factor`; post-process
    them with ``postprocess_hover(prob, hv, post, shape=image.shape[:2])``.
    """
    cfg = cfg or InferenceConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    prob, hv = _predict_whole(model, image, cfg, device)
    scale = rescale_factor(prob, hv, cfg)
    if scale > 1.0:
        prob, hv = _predict_whole(model, upsample_image(image, scale), cfg, device)
    return prob, hv


def median_cell_diameter(label: np.ndarray) -> float:
    """Diameter of the circle of the median cell area of an instance map (0 without cells)."""
    areas = np.bincount(np.asarray(label).ravel())[1:]
    areas = areas[areas > 0]
    return float(np.sqrt(4.0 * np.median(areas) / np.pi)) if areas.size else 0.0


def rescale_factor(prob: np.ndarray, hv: np.ndarray, cfg: InferenceConfig) -> float:
    """Upsampling factor that brings the image's cells to ``cfg.rescale_diameter``.

    The cells are those of the maps post-processed with the default settings; the factor is
    ``rescale_diameter / median diameter``, clipped to ``[1, cfg.max_upscale]`` and rounded
    to eighths (so that near-equal images share a size). 1.0 when rescaling is off, the
    cells are large enough, or none are found.
    """
    if cfg.rescale_diameter is None:
        return 1.0
    from cellst.postprocess.tiled import postprocess_hover

    diameter = median_cell_diameter(postprocess_hover(prob, hv))
    if diameter <= 0:
        return 1.0
    scale = min(cfg.max_upscale, max(1.0, cfg.rescale_diameter / diameter))
    return round(scale * 8) / 8


def upsample_image(image: np.ndarray, scale: float) -> np.ndarray:
    """``(H, W, 3) uint8`` image resized by ``scale`` (bilinear), uint8."""
    from skimage.transform import resize

    h, w = image.shape[:2]
    out = resize(
        image,
        (round(h * scale), round(w * scale)),
        order=1,
        preserve_range=True,
        anti_aliasing=False,
    )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _predict_whole(
    model: torch.nn.Module, image: np.ndarray, cfg: InferenceConfig, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predict_maps` without rescaling: whole image, or block by block."""
    h, w = image.shape[:2]
    if max(h, w) <= cfg.block + 2 * cfg.block_margin:
        p, m = predict_block(model, image, cfg, device)
        return p.astype(np.float16), m.astype(np.float16)
    prob = np.empty((h, w), np.float16)
    hv = np.empty((2, h, w), np.float16)
    for (cy0, cy1, cx0, cx1), (ey0, ey1, ex0, ex1) in blocks(h, w, cfg.block, cfg.block_margin):
        p, m = predict_block(model, image[ey0:ey1, ex0:ex1], cfg, device)
        sy, sx = cy0 - ey0, cx0 - ex0
        prob[cy0:cy1, cx0:cx1] = p[sy : sy + cy1 - cy0, sx : sx + cx1 - cx0]
        hv[:, cy0:cy1, cx0:cx1] = m[:, sy : sy + cy1 - cy0, sx : sx + cx1 - cx0]
    return prob, hv
