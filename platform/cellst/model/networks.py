"""HoVer-Net networks with one output contract.

Every network built by :func:`build_model` maps a float batch ``(B, in_channels, H, W)`` to a
dict with exactly two entries, keyed by MONAI's :class:`~monai.utils.enums.HoVerNetBranch`
strings:

* ``"nucleus_prediction"``: ``(B, 2, H', W')`` background/foreground logits;
* ``"horizontal_vertical"``: ``(B, 2, H', W')`` regressed horizontal (channel 0) and vertical
  (channel 1) distance maps, the targets of :func:`cellst.model.targets.hover_maps`.

Each network also exposes ``input_size`` (the one square input side it accepts, or ``None``
for any size divisible by 32) and ``output_size(input)`` (the side of its output; when
smaller than the input the output is the centred crop of the input, as in HoVer-Net).

* ``hovernet-fast`` / ``hovernet-original``: MONAI's :class:`~monai.networks.nets.HoVerNet`
  (pre-activation ResNet-50 encoder, three dense decoders of which the type branch is
  disabled); 256 -> 164 (or 256 -> 256 with ``decoder_padding``) and 270 -> 80.
* ``hovernet-lite``: a small (~1.4 M parameters at ``width=16``) encoder-decoder assembled from
  MONAI blocks with BatchNorm, for CPU tests, smoke runs and fast sweeps. It works at half
  resolution internally (stride-2 stem, four more stride-2 stages down to 1/32), decodes with
  a shared U-Net decoder to 1/2 resolution, then two branch decoders (NP and HV, as HoVer-Net)
  whose 2-channel outputs are bilinearly upsampled to the input size.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from monai.networks.nets import HoVerNet
from monai.utils.enums import HoVerNetBranch

from cellst.model.config import ModelConfig

__all__ = [
    "HV_KEY",
    "NP_KEY",
    "HoVerNetLite",
    "MonaiHoVerNet",
    "ModelConfig",
    "build_model",
    "count_parameters",
]

NP_KEY: str = HoVerNetBranch.NP.value  # "nucleus_prediction"
HV_KEY: str = HoVerNetBranch.HV.value  # "horizontal_vertical"

# channel multipliers of the lite encoder levels at 1/2, 1/4, 1/8, 1/16 and 1/32 resolution
_LITE_MULT = (1, 2, 4, 8, 12)
_ACT = ("relu", {"inplace": True})
_NORM = "batch"


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------
# MONAI HoVer-Net
# ---------------------------------------------------------------------------------------------


class MonaiHoVerNet(HoVerNet):
    """MONAI :class:`HoVerNet` (no type branch) with ``input_size`` / ``output_size``.

    A subclass rather than a wrapper, so its ``state_dict`` keys are exactly MONAI's and
    MONAI-trained HoVer-Net weights (``out_classes=0``) load directly.
    """

    def __init__(
        self,
        mode: Literal["fast", "original"] = "fast",
        *,
        in_channels: int = 3,
        decoder_padding: bool = False,
        dropout: float = 0.0,
        pretrained_url: str | None = None,
        freeze_encoder: bool = False,
    ) -> None:
        if mode not in ("fast", "original"):
            raise ValueError(f"mode must be 'fast' or 'original', got {mode!r}")
        if decoder_padding and mode != "fast":
            raise ValueError("decoder_padding only applies to mode='fast'")
        super().__init__(
            mode=mode,
            in_channels=in_channels,
            np_out_channels=2,
            out_classes=0,
            decoder_padding=decoder_padding,
            dropout_prob=dropout,
            pretrained_url=pretrained_url,
            freeze_encoder=freeze_encoder,
        )
        self.name = f"hovernet-{mode}"
        self.decoder_padding = decoder_padding
        self.input_size: int | None = 256 if mode == "fast" else 270
        if mode == "original":
            self._output_size = 80
        else:
            self._output_size = 256 if decoder_padding else 164

    def output_size(self, input: int) -> int:
        """Output side for a square input of side ``input`` (which must be ``input_size``)."""
        if input != self.input_size:
            raise ValueError(f"{self.name} only accepts {self.input_size}x{self.input_size} inputs")
        return self._output_size

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if x.ndim != 4 or tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"{self.name} expects input of shape (B, C, {self.input_size}, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        out = super().forward(x)
        return {NP_KEY: out[NP_KEY], HV_KEY: out[HV_KEY]}


# ---------------------------------------------------------------------------------------------
# hovernet-lite
# ---------------------------------------------------------------------------------------------


def _conv(
    c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0, kernel_size: int = 3
) -> Convolution:
    """Conv -> BatchNorm -> (Dropout) -> ReLU."""
    return Convolution(
        spatial_dims=2,
        in_channels=c_in,
        out_channels=c_out,
        strides=stride,
        kernel_size=kernel_size,
        act=_ACT,
        norm=_NORM,
        dropout=dropout or None,
        bias=False,
    )


def _Up(channels: int, mode: str) -> UpSample:  # noqa: N802 (a layer, named like one)
    """x2 upsampling without weights (``mode``: nearest or bilinear)."""
    return UpSample(
        2,
        channels,
        channels,
        scale_factor=2,
        mode="nontrainable",
        interp_mode=mode,
        align_corners=False if mode == "bilinear" else None,
        pre_conv=None,
    )


class _UpBlock(nn.Module):
    """Nearest x2 upsampling, concatenation with the skip, one conv block."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, dropout: float) -> None:
        super().__init__()
        self.up = _Up(c_in, "nearest")
        self.conv = _conv(c_in + c_skip, c_out, dropout=dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class HoVerNetLite(nn.Module):
    """Small HoVer-Net-style network: any input with sides divisible by 32, same-size output.

    Encoder: stride-2 stem (two conv blocks) at 1/2 resolution, then four stages of a stride-2
    conv block plus a MONAI :class:`ResidualUnit` (channels ``width * (1, 2, 4, 8, 12)``).
    Shared decoder: nearest upsampling + skip concatenation + conv block back to 1/4
    resolution. Branch decoders (NP and HV): upsampling to 1/2 resolution + concatenation with
    the stem features + two conv blocks + 1x1 conv to 2 channels, bilinearly upsampled x2.
    All convolutions are followed by BatchNorm (SyncBN-convertible) and ReLU, except the final
    1x1 heads. Nothing runs at full resolution, which keeps it fast on CPU.

    With ``full_res``, a stride-1 conv block on the input (``width // 2`` channels) feeds the
    end of each branch instead: its 1/2-resolution features are upsampled x2 (nearest),
    concatenated with that full-resolution stem, and one conv block at full resolution comes
    before the 1x1 head. The border between two small touching cells is one or two pixels
    wide, below what a 1/2-resolution map can place.
    """

    def __init__(
        self,
        width: int = 16,
        in_channels: int = 3,
        dropout: float = 0.0,
        freeze_encoder: bool = False,
        full_res: bool = False,
    ) -> None:
        super().__init__()
        self.name = "hovernet-lite"
        self.input_size: int | None = None
        ch = [width * m for m in _LITE_MULT]
        self.stem = nn.Sequential(
            _conv(in_channels, ch[0], stride=2, dropout=dropout),
            _conv(ch[0], ch[0], dropout=dropout),
        )
        self.encoder = nn.ModuleList(
            nn.Sequential(
                _conv(ch[i - 1], ch[i], stride=2, dropout=dropout),
                ResidualUnit(
                    2,
                    ch[i],
                    ch[i],
                    subunits=1,
                    act=_ACT,
                    norm=_NORM,
                    dropout=dropout or None,
                    bias=False,
                ),
            )
            for i in range(1, len(ch))
        )
        # 1/32 -> 1/16 -> 1/8 -> 1/4
        self.decoder = nn.ModuleList(
            _UpBlock(ch[i], ch[i - 1], ch[i - 1], dropout) for i in range(len(ch) - 1, 1, -1)
        )
        self.up_half = _Up(ch[1], "nearest")
        c_full = max(width // 2, 4)
        #: full-resolution features of the input (``full_res`` only)
        self.stem_full = _conv(in_channels, c_full, dropout=dropout) if full_res else None
        self.branches = nn.ModuleDict(
            {
                key: nn.Sequential(
                    _conv(ch[1] + ch[0], ch[0], dropout=dropout),
                    _conv(ch[0], ch[0], dropout=dropout),
                    *(
                        (_Up(ch[0], "nearest"),)
                        if full_res
                        else (
                            Convolution(2, ch[0], 2, kernel_size=1, conv_only=True, bias=True),
                            _Up(2, "bilinear"),
                        )
                    ),
                )
                for key in (NP_KEY, HV_KEY)
            }
        )
        #: per branch: full-resolution conv block on [upsampled branch, stem_full], 1x1 head
        self.heads_full = (
            nn.ModuleDict(
                {
                    key: nn.Sequential(
                        _conv(ch[0] + c_full, c_full, dropout=dropout),
                        Convolution(2, c_full, 2, kernel_size=1, conv_only=True, bias=True),
                    )
                    for key in (NP_KEY, HV_KEY)
                }
            )
            if full_res
            else None
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if freeze_encoder:
            encoder = (self.stem, self.encoder, *((self.stem_full,) if full_res else ()))
            for p in (q for module in encoder for q in module.parameters()):
                p.requires_grad_(False)

    def output_size(self, input: int) -> int:
        """Output side for an input side (the same; the side must be divisible by 32)."""
        if input <= 0 or input % 32:
            raise ValueError(
                f"hovernet-lite input size must be a positive multiple of 32, got {input}"
            )
        return input

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 4:
            raise ValueError(
                f"hovernet-lite expects a (B, C, H, W) batch, got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(
                f"hovernet-lite needs input height and width divisible by 32, got {h}x{w} "
                f"(pad or crop the image to a multiple of 32)"
            )
        skips = [self.stem(x)]
        for stage in self.encoder:
            skips.append(stage(skips[-1]))
        y = skips[-1]
        for j, block in enumerate(self.decoder):
            y = block(y, skips[-2 - j])
        y = torch.cat([self.up_half(y), skips[0]], dim=1)
        if self.heads_full is None:
            return {key: branch(y) for key, branch in self.branches.items()}
        full = self.stem_full(x)
        return {
            key: self.heads_full[key](torch.cat([branch(y), full], dim=1))
            for key, branch in self.branches.items()
        }


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the network described by ``cfg`` (see the module docstring for the contract)."""
    if cfg.name == "hovernet-lite":
        return HoVerNetLite(
            width=cfg.width,
            in_channels=cfg.in_channels,
            dropout=cfg.dropout,
            freeze_encoder=cfg.freeze_encoder,
            full_res=cfg.full_res,
        )
    mode: Literal["fast", "original"] = "fast" if cfg.name == "hovernet-fast" else "original"
    return MonaiHoVerNet(
        mode,
        in_channels=cfg.in_channels,
        decoder_padding=cfg.decoder_padding,
        dropout=cfg.dropout,
        pretrained_url=cfg.pretrained_url,
        freeze_encoder=cfg.freeze_encoder,
    )
