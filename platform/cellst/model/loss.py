"""HoVer-Net loss with an ignore mask.

Same terms and formulas as :class:`monai.apps.pathology.losses.HoVerNetLoss` (no type
branch); with no ignored pixels the total equals MONAI's to float precision:

* ``np_dice``: soft Dice of the softmaxed NP logits against the one-hot NP target, batch-wise
  (sums over batch and pixels per channel), smoothing 1e-3, summed over the two channels
  (MONAI ``DiceLoss(softmax=True, smooth_nr=1e-3, smooth_dr=1e-3, reduction="sum",
  batch=True)``);
* ``np_ce``: cross-entropy of the NP logits, averaged over pixels;
* ``hv_mse``: mean squared error of the HV maps, averaged over pixels and both channels;
* ``hv_mse_grad``: squared error of the 5x5 Sobel gradients (horizontal gradient of the
  horizontal map, vertical gradient of the vertical map), averaged over foreground pixels of
  the NP target (both channels).

Weights (:class:`LossConfig`, MONAI's defaults): ``hv_mse`` 2.0, ``hv_mse_grad`` 1.0,
``np_ce`` 1.0, ``np_dice`` 1.0. ``loss`` is the weighted sum; the returned per-term values are
unweighted.

Ignore mask (``1`` = ignore, e.g. ST++ Cutout): ignored pixels are removed from every sum and
every normaliser (Dice sums, CE / MSE means, gradient focus). Because the Sobel kernel reaches
2 pixels, pixels within 2 pixels of an ignored pixel are also dropped from the gradient term,
so the loss does not depend on the predictions inside the ignored region at all. When the
network output is smaller than the targets (hovernet-fast 164 of 256, hovernet-original 80 of
270) the targets and the mask are centre-cropped to the output size first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.transforms import SobelGradients

from cellst.model.config import LossConfig
from cellst.model.networks import HV_KEY, NP_KEY

__all__ = ["HoVerLoss", "LossConfig", "center_crop"]

_SOBEL_REACH = 2  # the 5x5 Sobel kernel reads 2 pixels on each side


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre crop of the last two dims of ``x`` to ``size`` (HoVer-Net's valid-conv output)."""
    h, w = x.shape[-2:]
    th, tw = size
    if (h, w) == (th, tw):
        return x
    if th > h or tw > w:
        raise ValueError(f"cannot centre-crop {h}x{w} to the larger {th}x{tw}")
    if (h - th) % 2 or (w - tw) % 2:
        raise ValueError(f"centre crop {h}x{w} -> {th}x{tw} is not symmetric")
    y0, x0 = (h - th) // 2, (w - tw) // 2
    return x[..., y0 : y0 + th, x0 : x0 + tw]


class HoVerLoss(torch.nn.Module):
    """HoVer-Net NP + HV loss; ``forward(prediction, targets, ignore=None) -> dict``.

    ``prediction``: the network output dict (``"nucleus_prediction"`` ``(B, 2, h, w)`` logits,
    ``"horizontal_vertical"`` ``(B, 2, h, w)``). ``targets``: :func:`~cellst.model.targets.
    make_targets` output (``np_onehot`` and ``hv``, ``(B, 2, H, W)``), with ``H >= h``.
    ``ignore``: optional ``(B, 1, H, W)`` or ``(B, H, W)`` mask, 1 = ignored pixel.
    Returns ``{"loss", "np_dice", "np_ce", "hv_mse", "hv_mse_grad"}`` (scalars; the terms
    unweighted, ``loss`` the weighted sum), finite for all-background or all-ignored batches.
    """

    def __init__(self, cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or LossConfig()
        self.dice = DiceLoss(
            softmax=False, smooth_dr=1e-03, smooth_nr=1e-03, reduction="sum", batch=True
        )
        self.sobel_v = SobelGradients(kernel_size=5, spatial_axes=0)
        self.sobel_h = SobelGradients(kernel_size=5, spatial_axes=1)

    def _sobel(self, hv: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.sobel_h(hv[:, 0]), self.sobel_v(hv[:, 1])], dim=1)

    def forward(
        self,
        prediction: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        ignore: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        np_logits, hv_pred = prediction[NP_KEY], prediction[HV_KEY]
        size = tuple(np_logits.shape[-2:])
        if tuple(hv_pred.shape[-2:]) != size:
            raise ValueError(f"NP {size} and HV {tuple(hv_pred.shape[-2:])} outputs differ in size")
        np_t = center_crop(targets["np_onehot"], size).to(np_logits.dtype)
        hv_t = center_crop(targets["hv"], size).to(hv_pred.dtype)
        if np_t.shape != np_logits.shape or hv_t.shape != hv_pred.shape:
            raise ValueError(
                f"target shapes {tuple(np_t.shape)}/{tuple(hv_t.shape)} do not match the "
                f"prediction {tuple(np_logits.shape)}/{tuple(hv_pred.shape)}"
            )

        if ignore is None:
            valid = None
            grad_valid = None
        else:
            if ignore.ndim == 3:
                ignore = ignore[:, None]
            ign = center_crop(ignore, size).to(np_logits.dtype)
            if ign.shape != (np_logits.shape[0], 1, *size):
                raise ValueError(
                    f"ignore mask shape {tuple(ignore.shape)} does not match the batch"
                )
            ign = (ign > 0.5).to(np_logits.dtype)
            valid = 1.0 - ign
            k = 2 * _SOBEL_REACH + 1
            grad_valid = 1.0 - F.max_pool2d(ign, k, stride=1, padding=_SOBEL_REACH)

        # NP: Dice (batch-wise) + CE
        prob = torch.softmax(np_logits, dim=1)
        if valid is None:
            dice = self.dice(prob, np_t)
        else:
            dice = self.dice(prob * valid, np_t * valid)
        ce_map = F.cross_entropy(np_logits, np_t.argmax(dim=1), reduction="none")
        # HV: MSE + gradient MSE on the foreground
        sq = (hv_pred - hv_t).square()
        gdiff = (self._sobel(hv_pred) - self._sobel(hv_t)).square()
        focus = np_t[:, 1:2]
        if valid is None:
            ce = ce_map.mean()
            mse = sq.mean()
        else:
            n_valid = valid.sum()
            ce = (ce_map * valid[:, 0]).sum() / n_valid.clamp_min(1.0)
            mse = (sq * valid).sum() / (2.0 * n_valid).clamp_min(1.0)
            focus = focus * grad_valid
        mse_grad = (gdiff * focus).sum() / (2.0 * focus.sum() + 1.0e-8)

        c = self.cfg
        total = c.np_dice * dice + c.np_ce * ce + c.hv_mse * mse + c.hv_mse_grad * mse_grad
        return {"loss": total, "np_dice": dice, "np_ce": ce, "hv_mse": mse, "hv_mse_grad": mse_grad}
