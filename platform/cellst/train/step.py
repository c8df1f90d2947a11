"""One training step, shared by the Ray Train worker loop and the plain-PyTorch benchmark.

A batch from the crop stream (numpy: ``image`` (B, c, c, 3) uint8, ``label`` (B, c, c) int32,
``source`` (B,) 0 = labelled / 1 = pseudo) is augmented per sample (``standard`` preset for
labelled crops, ``strong`` for pseudo-labelled ones, whose Cutout regions the loss ignores),
turned into HoVer-Net targets *after* the spatial augmentation, and fed to the model.

In training the augmentation runs as a Ray Data stage (:func:`augment_batch` in
``map_batches`` tasks, on any CPU of the cluster), not on the training thread: the worker
only turns the model-ready arrays into tensors (:meth:`Batch.from_numpy`) and steps.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta

from cellst.data.pseudo import decode_ignored
from cellst.model.augment import AugmentConfig, build_augment
from cellst.model.loss import HoVerLoss
from cellst.model.targets import make_targets
from cellst.train.config import TrainingDiverged

#: Ray Data hands the training loop read-only arrays (views of the object store). Nothing
#: here or in the step writes into them, so torch's warning about wrapping them is ignored
#: for this module alone (:func:`_ignore_read_only_warning`).
_READ_ONLY_WARNING = "The given NumPy array is not writable"


def _ignore_read_only_warning() -> None:
    """Make sure the filter of :data:`_READ_ONLY_WARNING` is in place. Set once at import
    it could be lost: an import inside someone's ``warnings.catch_warnings()`` block adds
    it to a list that block then throws away (a second training in one process warned).
    A look through the filter list per batch, no growth: it is added only when missing."""
    for action, message, category, module, _ in warnings.filters:
        if (
            action == "ignore"
            and message is not None
            and message.pattern == _READ_ONLY_WARNING
            and category is UserWarning
            and module is not None
            and module.pattern == r"cellst\.train\.step"
        ):
            return
    warnings.filterwarnings(
        "ignore", message=_READ_ONLY_WARNING, category=UserWarning, module=r"cellst\.train\.step"
    )


_ignore_read_only_warning()


@dataclass
class Batch:
    """Model-ready tensors of one step."""

    image: torch.Tensor  # (B, 3, c, c) float32 in [0, 1]
    targets: dict[str, torch.Tensor]  # np_onehot (B, 2, c, c), hv (B, 2, c, c)
    ignore: torch.Tensor  # (B, 1, c, c) float32, 1 = ignored by the loss

    def to(self, device: torch.device, channels_last: bool = False) -> Batch:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return Batch(
            self.image.to(device, non_blocking=True).contiguous(memory_format=fmt),
            {k: v.to(device, non_blocking=True) for k, v in self.targets.items()},
            self.ignore.to(device, non_blocking=True),
        )

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Compact model-ready arrays (what the augmentation stage hands to the trainer)."""
        return {
            "image": self.image.numpy(),
            "hv": self.targets["hv"].numpy(),
            "fg": self.targets["np_onehot"][:, 1].to(torch.uint8).numpy(),
            "ignore": self.ignore[:, 0].to(torch.uint8).numpy(),
        }

    @classmethod
    def from_numpy(cls, batch: dict[str, np.ndarray]) -> Batch:
        """The inverse of :meth:`to_numpy` (zero-copy where the arrays allow it; see
        :data:`_READ_ONLY_WARNING` for Ray Data's read-only arrays)."""
        _ignore_read_only_warning()
        fg = torch.as_tensor(batch["fg"]).to(torch.float32)
        return cls(
            torch.as_tensor(batch["image"]),
            {"np_onehot": torch.stack([1.0 - fg, fg], 1), "hv": torch.as_tensor(batch["hv"])},
            torch.as_tensor(batch["ignore"]).to(torch.float32)[:, None],
        )


class Augmenter:
    """Per-sample MONAI augmentation of stream batches, with a seedable random state."""

    def __init__(self, cfg: AugmentConfig, crop: int, seed: int | None = None):
        self.standard = build_augment(cfg, crop, "standard", seed=seed)
        self.strong = build_augment(cfg, crop, "strong", seed=None if seed is None else seed + 1)

    def __call__(self, batch: dict[str, np.ndarray]) -> Batch:
        # MetaTensor bookkeeping (affine, applied-operations stacks) is never read here and
        # costs about two thirds of the time of each sample: plain tensors while we augment
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return self._augment(batch)
        finally:
            set_track_meta(tracking)

    def _augment(self, batch: dict[str, np.ndarray]) -> Batch:
        images, labels, ignores = [], [], []
        sources = batch.get("source", np.zeros(len(batch["image"]), np.int8))
        for img, lab, src in zip(batch["image"], batch["label"], sources, strict=True):
            sample = {
                "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
                / 255,
            }
            if (lab < 0).any():  # a pseudo-label's uncertain pixels (encode_ignored)
                lab, ign = decode_ignored(lab)  # (new arrays: writable)
                sample["ignore"] = torch.from_numpy(ign)[None]
            else:
                lab = np.array(lab, copy=True)  # stream arrays are read-only
            sample["label"] = torch.from_numpy(lab)[None]
            out = (self.strong if int(src) == 1 else self.standard)(sample)
            images.append(out["image"])
            labels.append(out["label"][0])
            ignores.append(out["ignore"])
        labels_t = torch.stack(labels)
        return Batch(torch.stack(images), make_targets(labels_t), torch.stack(ignores))


_AUGMENTERS: dict[str, Augmenter] = {}


def augment_batch(batch: dict[str, np.ndarray], augment: dict, crop: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` body: raw stream crops to model-ready arrays.

    Returns ``image`` (B, 3, c, c) float32, ``hv`` (B, 2, c, c) float32, ``fg`` and
    ``ignore`` (B, c, c) uint8 (see :meth:`Batch.from_numpy`). The augmenter is built once
    per process and config; its random state is seeded from the OS, so every task draws
    its own augmentations.
    """
    key = json.dumps([augment, crop], sort_keys=True)
    aug = _AUGMENTERS.get(key)
    if aug is None:
        aug = _AUGMENTERS[key] = Augmenter(AugmentConfig.model_validate(augment), crop)
    return aug(batch).to_numpy()


def train_step(
    model: torch.nn.Module,
    batch: Batch,
    loss_fn: HoVerLoss,
    optimizer: torch.optim.Optimizer,
    *,
    amp: bool = False,
    grad_clip: float = 0.0,
    check: Callable[[bool], bool] | None = None,
) -> dict[str, float]:
    """Forward, loss, backward and optimiser step; returns every loss term as a float.

    ``check`` maps "this rank's loss is finite" to "continue" (DDP runs pass an all-reduce so
    that all ranks stop together).

    Raises
    ------
    TrainingDiverged
        If the loss is not finite (the step is not applied).
    """
    device = batch.image.device
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if amp and device.type == "cuda"
        else nullcontext()
    )
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        out = model(batch.image)
    out = {k: v.float() for k, v in out.items()}
    terms = loss_fn(out, batch.targets, batch.ignore)
    loss = terms["loss"]
    ok = bool(torch.isfinite(loss))
    if check is not None:
        ok = check(ok)  # e.g. agree across DDP ranks, so every rank stops at the same step
    if not ok:
        raise TrainingDiverged(
            f"loss is {loss.item()} ({', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}); "
            "lower train.lr or check the data"
        )
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def make_ema(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``model``'s weights and buffers (BatchNorm statistics
    included), updated with :meth:`~torch.optim.swa_utils.AveragedModel.update_parameters`
    after each step; its ``module`` is the averaged model. The first update copies the
    weights, so the average starts from the first stepped model, not from ``model`` now."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def make_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float):
    """Adam / AdamW over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(
    optimizer,
    schedule: str,
    epochs: int,
    step_epochs: int,
    gamma: float,
    steps_per_epoch: int | None = None,
):
    """Learning-rate schedule: stepped once per epoch, or, given ``steps_per_epoch``, once
    per optimizer step (the same curve at every step's fraction of an epoch)."""
    if steps_per_epoch is not None:
        total = max(1, epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if schedule == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
            if schedule == "step":
                return gamma ** ((step // steps_per_epoch) // step_epochs)
            return 1.0

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_epochs, gamma)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def encoder_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Encoder weights: the lite stem + encoder, or MONAI HoVer-Net's conv0 + residual blocks."""
    inner = getattr(model, "module", model)
    parts = [
        getattr(inner, n) for n in ("stem", "encoder", "conv0", "res_blocks") if hasattr(inner, n)
    ]
    if not parts:
        raise ValueError(f"{type(inner).__name__} has no encoder to freeze")
    return [p for part in parts for p in part.parameters()]


def set_encoder_frozen(model: torch.nn.Module, frozen: bool) -> None:
    """Freeze or unfreeze the encoder (HoVer-Net's two-phase schedule)."""
    for p in encoder_parameters(model):
        p.requires_grad_(not frozen)
