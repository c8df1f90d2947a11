"""Reading challenge images and labels of any format and bit depth, and normalising them.

The challenge data mixes tif/tiff/png/bmp/jpg files, 8- and 16-bit, float, grayscale, RGB,
RGBA and multichannel. Everything is brought to ``(H, W, 3) uint8`` the way the challenge
baseline does: each channel is rescaled between percentiles of its non-zero pixels.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from skimage.exposure import rescale_intensity
from skimage.segmentation import relabel_sequential

from cellst.data.layout import IMAGE_SUFFIXES as IMAGE_SUFFIXES  # its owner
from cellst.fs import atomic_write
from cellst.provenance import SOFTWARE_TAG

LABEL_SUFFIX = "_label"


def label_file_name(name: str) -> str:
    """``NAME_label.tiff``: the challenge's file name of image ``NAME``'s instance map, as
    cellst writes it (``cellst predict --out``, ``cellst segment``, ``cellst synth``)."""
    return f"{name}{LABEL_SUFFIX}.tiff"


class ImageFormatError(ValueError):
    """A file is unreadable or its content is not what cellst expects; names the file."""


#: leading bytes of each accepted file format (TIFF and BigTIFF in both byte orders)
SIGNATURES = {
    "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "BMP": (b"BM",),
}


def sniff_format(path: str | Path) -> str:
    """The image format of a file from its first bytes (``TIFF``, ``PNG``, ``JPEG``, ``BMP``).

    Raises
    ------
    ImageFormatError
        If the file is empty or is not one of those formats, whatever its extension says
        (a decoder would only answer "no backend ... pip install").
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        raise ImageFormatError(f"{path}: cannot read image: the file is empty (0 bytes)")
    for kind, magics in SIGNATURES.items():
        if head.startswith(magics):
            return kind
    raise ImageFormatError(
        f"{path}: cannot read image: the file is not an image (it starts with {head!r}; "
        f"expected TIFF, PNG, JPEG or BMP)"
    )


def declared_shape(path: str | Path, kind: str | None = None) -> tuple[int, ...]:
    """The array shape a file's header declares, read without decoding any pixels: ``(H,
    W)`` or ``(H, W, C)``, channels last as :func:`read_array` returns them."""
    path = Path(path)
    kind = kind or sniff_format(path)
    try:
        if kind == "TIFF":
            with tifffile.TiffFile(path) as tf:
                shape = tuple(int(n) for n in tf.series[0].shape)
                _refuse_planes(path, tf.series[0].axes, shape)
                if len(shape) != 3:
                    return shape
                c = declared_channel_axis(tf.series[0].axes, 3)
                if c is None:
                    c = guessed_channel_axis(shape, str(path))
                return (*shape[:c], *shape[c + 1 :], shape[c])
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
            return (h, w, len(im.getbands()))
    except ImageFormatError:
        raise
    except Exception as exc:  # the header itself is broken
        if type(exc).__name__ == "DecompressionBombError":  # Pillow's own, far larger limit
            raise ImageFormatError(f"{path}: image declares too many pixels ({exc})") from None
        raise ImageFormatError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def declared_channel_axis(axes: str, ndim: int) -> int | None:
    """The axis a 3-D TIFF's metadata declares as channels (tifffile's axis codes ``C``,
    or ``S`` for samples such as RGB, beside ``Y`` and ``X``), or None when it declares
    none (``Q``, ``I``: then :func:`to_hwc` tells channels from the shape)."""
    if ndim != 3 or len(axes) != 3 or "Y" not in axes or "X" not in axes:
        return None
    for code in "CS":
        if axes.count(code) == 1:
            return axes.index(code)
    return None


def declared_pixels(shape: tuple[int, ...]) -> int:
    """Height x width of a declared shape: the product of its two largest axes (channel
    and page axes of stacks are the small ones)."""
    big = sorted(shape, reverse=True)[:2]
    return int(np.prod(big, dtype=np.int64)) if big else 0


def check_header(path: str | Path, max_pixels: int | None = None) -> str:
    """Check a file's signature and declared size without decoding it; returns its format.

    Raises
    ------
    ImageFormatError
        Naming the file, if it is empty, not an image, or declares more than
        ``max_pixels`` pixels (height x width).
    """
    path = Path(path)
    kind = sniff_format(path)
    if max_pixels is not None:
        shape = declared_shape(path, kind)
        n = declared_pixels(shape)
        if n > max_pixels:
            raise ImageFormatError(
                f"{path}: image declares {' x '.join(map(str, shape))} = {n:,} pixels, over "
                f"the limit ingest.max_pixels={max_pixels:,} (raise it with "
                f"--set ingest.max_pixels=N if this machine has the memory)"
            )
    return kind


def read_array(path: str | Path, max_pixels: int | None = None, labels: bool = False) -> np.ndarray:
    """Read an image file into a numpy array, keeping its dtype: ``(H, W)`` or ``(H, W,
    C)``, channels last (a TIFF's declared channel axis moved there; an undeclared one told
    from the shape by :func:`to_hwc`). Pass ``channel_axis=-1`` to :func:`normalize_image`:
    a shape such as ``(12, 40, 20)`` read from a ``YXC`` TIFF looks channels-first.

    Parameters
    ----------
    max_pixels : int, optional
        Refuse files whose header declares more pixels (height x width) than this, before
        any pixel is decoded, so a huge or hostile file cannot exhaust memory.
    labels : bool
        The file is a label map: a palette (indexed) PNG gives its indices, the instance
        ids (as labelling tools save them), not the colours of its palette.

    Raises
    ------
    ImageFormatError
        Naming the file, if it is empty, not an image, too large or cannot be decoded.
    """
    path = Path(path)
    kind = check_header(path, max_pixels)
    try:
        if kind == "TIFF":
            with tifffile.TiffFile(path) as tf:
                series = tf.series[0]
                _refuse_planes(path, series.axes, tuple(series.shape))
                arr = series.asarray()
                c = declared_channel_axis(series.axes, arr.ndim)
                if c is not None:  # the file says which axis holds channels: last
                    arr = np.moveaxis(arr, c, -1)
                elif arr.ndim == 3:  # it does not: the shape tells (stacks refused)
                    arr = to_hwc(arr, str(path))
                if not labels:
                    arr = as_displayed(arr, _photometric(tf), path)
        else:
            import imageio.v3 as iio
            from PIL import Image

            if max_pixels is not None and (Image.MAX_IMAGE_PIXELS or 0) < max_pixels:
                Image.MAX_IMAGE_PIXELS = max_pixels  # our own limit was checked above
            with Image.open(path) as im:
                mode = im.mode
                # ink amounts, not light (a CMYK JPEG): as viewers display it
                cmyk = np.asarray(im.convert("RGB")) if mode == "CMYK" and not labels else None
            indexed = labels and mode == "P"
            if cmyk is not None:
                arr = cmyk
            elif kind == "PNG" and _png_colour_16bit(path):
                arr = _read_png_16bit(path)
            else:
                arr = iio.imread(path, mode="P") if indexed else iio.imread(path)
            if mode in ("LA", "La") and np.ndim(arr) == 3 and np.shape(arr)[2] == 2:
                arr = np.asarray(arr)[:, :, 0]  # grey + alpha: the alpha is no channel
    except ImageFormatError:
        raise
    except Exception as exc:  # any decoder error means the same thing to the user
        raise ImageFormatError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
    arr = np.asarray(arr)
    if arr.size == 0:
        raise ImageFormatError(f"{path}: image is empty (shape {arr.shape})")
    if arr.ndim > 3:
        raise ImageFormatError(f"{path}: expected a 2-D or 3-D image, got shape {arr.shape}")
    return arr


#: PNG colour types with several samples per pixel: RGB, grey + alpha, RGBA
_PNG_MULTISAMPLE = {2, 4, 6}


def _png_colour_16bit(path: Path) -> bool:
    """Whether a PNG's header declares 16-bit samples of a colour type Pillow cuts to 8 bits
    (RGB, RGBA, grey + alpha; its 16-bit grey mode keeps them)."""
    with open(path, "rb") as fh:
        ihdr = fh.read(26)  # signature, chunk length and type, width, height, depth, colour
    return len(ihdr) == 26 and ihdr[24] == 16 and ihdr[25] in _PNG_MULTISAMPLE


def _read_png_16bit(path: Path) -> np.ndarray:
    """A 16-bit RGB, RGBA or grey + alpha PNG as ``(H, W, C) uint16``, all 16 bits kept.

    Parameters
    ----------
    path : Path
        The PNG file (its header checked by :func:`_png_colour_16bit`).

    Returns
    -------
    numpy.ndarray
        The decoded samples; a grey image's alpha dropped (it is no channel), an RGBA
        image's kept (:func:`normalize_image` uses the first three channels), as for 8 bits.
    """
    import imagecodecs

    arr = np.asarray(imagecodecs.png_decode(path.read_bytes()))
    return arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 2 else arr


#: TIFF axes (tifffile's codes) of a stack of planes rather than channels: depth, time
_STACK_AXES = {"Z": "z-stack", "T": "time series"}


def _refuse_stack(path: Path, axes: str, shape: tuple[int, ...]) -> None:
    """A TIFF whose metadata declares several z-planes or time points is not a 2-D image;
    its planes would otherwise be read as channels (or as rows)."""
    for axis, size in zip(axes, shape, strict=False):
        if axis in _STACK_AXES and size > 1:
            raise ImageFormatError(
                f"{path}: a {_STACK_AXES[axis]} of {size} planes (axes {axes}, shape "
                f"{tuple(shape)}); cellst segments 2-D images: save one plane or a projection"
            )


#: the most planes of a TIFF declaring no channel axis that are read as channels (RGB)
UNTAGGED_CHANNELS = 3


def _refuse_planes(path: Path, axes: str, shape: tuple[int, ...]) -> None:
    """A TIFF that is a stack of planes, not a 2-D image: declared z-planes or time points
    (:func:`_refuse_stack`), or a 3-D TIFF declaring no channel axis (tifffile axes ``QYX``,
    ``IYX``) whose guessed channel axis (:func:`guessed_channel_axis`) holds more than three
    planes, which would be read as channels and all but three dropped silently.

    Raises
    ------
    ImageFormatError
        Naming the file and how to make it readable.
    """
    _refuse_stack(path, axes, shape)
    if len(shape) != 3 or declared_channel_axis(axes, 3) is not None:
        return
    c = guessed_channel_axis(shape, str(path))
    if shape[c] > UNTAGGED_CHANNELS:
        raise ImageFormatError(
            f"{path}: {shape[c]} planes with no channel axis declared (axes {axes}, shape "
            f"{tuple(shape)}); cellst reads at most {UNTAGGED_CHANNELS} such planes as "
            f"channels: save it with axes CYX if they are channels (e.g. tifffile.imwrite("
            f"..., metadata={{'axes': 'CYX'}})), or one plane or a projection if not"
        )


def guessed_channel_axis(shape: tuple[int, ...], name: str = "image") -> int:
    """The channel axis of a 3-D array whose file declares none: 0 when the first axis is
    clearly smaller than both others (:func:`channel_axis_first`), else 2. A last axis of
    more than 16 counts only when it is smaller than both others (a multiplexed image's
    channels, put last by :func:`read_array` where its TIFF declares them).

    Raises
    ------
    ImageFormatError
        For a shape with no such axis: a stack of planes, not channels.
    """
    if channel_axis_first(shape):
        return 0
    if shape[2] > 16 and shape[2] >= min(shape[0], shape[1]):
        raise ImageFormatError(
            f"{name}: a 3-D image of shape {tuple(shape)} has no channel axis (a z-stack or "
            f"time series?); cellst segments 2-D images with channels"
        )
    return 2


def to_hwc(arr: np.ndarray, name: str = "image") -> np.ndarray:
    """Bring a 2-D or 3-D array to ``(H, W, C)``; channel-first stacks are transposed
    (:func:`guessed_channel_axis`), stacks of planes refused."""
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim == 3:
        return np.moveaxis(arr, 0, -1) if guessed_channel_axis(arr.shape, name) == 0 else arr
    raise ImageFormatError(f"{name}: expected a 2-D or 3-D image, got shape {arr.shape}")


def _nonzero_finite(channel: np.ndarray) -> np.ndarray:
    """The pixels percentiles are taken of: non-zero, and finite in a float image (NaN and
    infinite pixels are masked or saturated regions)."""
    nz = channel[channel != 0]
    return nz[np.isfinite(nz)] if nz.dtype.kind == "f" else nz


def channel_range(channel: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, ...]:
    """The intensity range :func:`normalize_channel` maps to 0-255: ``(lo, hi, top)``.

    ``lo`` and ``hi`` are percentiles of the non-zero pixels, ``top`` their maximum; an
    all-zero channel gives ``()``. Computed once, the range can be applied tile by tile
    (:func:`apply_range`), so large images need not be normalised in one piece. NaN and
    infinite pixels of a float image (masked or saturated regions) are left out.
    """
    nz = _nonzero_finite(channel)
    if nz.size == 0:
        return ()
    lo, hi = np.percentile(nz, [low, high])
    return float(lo), float(hi), float(nz.max())


def apply_range(channel: np.ndarray, rng: tuple[float, ...]) -> np.ndarray:
    """Rescale ``channel`` to uint8 with a range from :func:`channel_range`.

    A degenerate percentile range rescales from the channel's maximum instead of casting
    (the challenge baseline's cast wraps 16-bit values); 8-bit channels are then kept. NaN
    pixels become 0, infinite ones 0 or 255 by their sign.
    """
    if not rng:  # no finite non-zero pixel: black, but +inf (saturated) still the brightest
        out = np.zeros(channel.shape, np.uint8)
        if channel.dtype.kind == "f":
            out[np.isposinf(channel)] = 255
        return out
    lo, hi, top = rng
    if channel.dtype.kind == "f" and not np.isfinite(channel).all():
        # NaN as background (0), +inf as the brightest (255), -inf as the darkest (0)
        out = apply_range(np.nan_to_num(channel, nan=lo, posinf=top, neginf=lo), rng)
        out[np.isnan(channel) | np.isneginf(channel)] = 0
        out[np.isposinf(channel)] = 255
        return out
    # a float image's values may all lie within a thousandth (0.001-0.0011): its range
    # counts relative to its magnitude, not as an integer image's absolute steps
    wide = hi - lo > (1e-6 * max(abs(lo), abs(hi)) if channel.dtype.kind == "f" else 1e-3)
    if wide:
        return rescale_intensity(channel, in_range=(lo, hi), out_range=np.uint8).astype(np.uint8)
    if channel.dtype == np.uint8:
        return channel.copy()
    return (np.clip(channel / top, 0, 1) * 255).astype(np.uint8) if top > 0 else channel * 0


def normalize_channel(channel: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Rescale one channel to uint8 between percentiles of its non-zero pixels.

    Follows the NeurIPS 2022 CellSeg baseline (``normalize_channel``); a channel whose
    percentile range is degenerate is rescaled from its own dtype range instead of being
    cast (the baseline's cast wraps 16-bit values).
    """
    return apply_range(channel, channel_range(channel, low, high))


def _photometric(tf: tifffile.TiffFile) -> int:
    """The TIFF's photometric interpretation (how its samples become light), of its first
    series' first page."""
    return int(tf.series[0].keyframe.photometric)


def as_displayed(arr: np.ndarray, photometric: int, name: str | Path) -> np.ndarray:
    """Samples of a TIFF as light, as viewers display them: ``MinIsWhite`` (0: 0 is white,
    as some scanners and 1990s software write) inverted within its integer type, and
    ``Separated`` CMYK (ink amounts, channels last) turned into RGB. Other interpretations
    are light already and come back unchanged. Pixel by pixel, so a band of rows gets what
    the whole image would.

    Raises
    ------
    ImageFormatError
        A MinIsWhite float image, or separated samples other than 8- or 16-bit CMYK: their
        light is not defined well enough to store them the right way round.
    """
    if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        if arr.dtype.kind == "u":
            return np.iinfo(arr.dtype).max - arr
        if arr.dtype.kind == "i":
            return ~arr  # -1 - x: the type's lowest and highest values swap
        if arr.dtype.kind == "b":
            return ~arr
        raise ImageFormatError(
            f"{name}: a MinIsWhite image of {arr.dtype} samples (0 is white) cannot be "
            "turned the right way round; save it as MinIsBlack"
        )
    if photometric == tifffile.PHOTOMETRIC.SEPARATED:
        if arr.ndim != 3 or arr.shape[2] != 4 or arr.dtype not in (np.uint8, np.uint16):
            raise ImageFormatError(
                f"{name}: separated (ink) samples other than 8- or 16-bit CMYK "
                f"({arr.dtype}, shape {arr.shape}); save the image as RGB or greyscale"
            )
        top = float(np.iinfo(arr.dtype).max)
        light = (top - arr[:, :, :3].astype(np.float32)) * (
            (top - arr[:, :, 3:4].astype(np.float32)) / top
        )
        return np.rint(light).astype(arr.dtype)
    return arr


def _three_channels(hwc: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` to ``(H, W, 3)``: grey repeated, two channels plus an empty third,
    more channels cut to the first three."""
    c = hwc.shape[2]
    if c == 1:
        return np.repeat(hwc, 3, axis=2)
    if c == 2:
        return np.concatenate([hwc, np.zeros_like(hwc[:, :, :1])], axis=2)
    return hwc[:, :, :3]


def normalize_image(
    arr: np.ndarray,
    low: float = 1.0,
    high: float = 99.0,
    name: str | Path = "image",
    channel_axis: int | None = None,
) -> np.ndarray:
    """Any image array to ``(H, W, 3) uint8``.

    Grayscale is repeated to three channels, RGBA and multichannel keep their first three
    channels, two-channel images get an empty third channel; each channel is normalised
    with :func:`normalize_channel`. ``name`` (the file) starts every error message.
    ``channel_axis`` names the channel axis of a 3-D array (``-1`` for what
    :func:`read_array` returns); None tells it from the shape (:func:`to_hwc`).
    """
    if arr.dtype == bool:
        raise ImageFormatError(f"{name}: a 1-bit (binary) image is a mask, not a micrograph")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ImageFormatError(f"{name}: unsupported image dtype {arr.dtype}")
    if channel_axis is not None and arr.ndim == 3:
        hwc = np.moveaxis(arr, channel_axis, -1)
    else:
        hwc = to_hwc(arr, str(name))
    hwc = _three_channels(hwc)
    out = np.empty(hwc.shape, np.uint8)
    for i in range(3):
        out[:, :, i] = normalize_channel(hwc[:, :, i], low, high)
    return out


def channel_axis_first(shape: tuple[int, ...]) -> bool:
    """The rule of :func:`to_hwc`: a small first axis of a 3-D array holds channels."""
    return len(shape) == 3 and shape[0] < min(shape[1], shape[2]) and shape[0] <= 16 < shape[2]


def _histogram_range(hist: np.ndarray, offset: int, low: float, high: float) -> tuple[float, ...]:
    """:func:`channel_range` from a histogram of a channel's non-zero integer values.

    Order statistics read off the cumulative histogram, interpolated the way
    ``np.percentile``'s default (linear) method does, so the result is exact.
    """
    n = int(hist.sum())
    if n == 0:
        return ()
    cum = np.cumsum(hist)

    def order_stat(k: int) -> float:  # the k-th smallest value (0-based)
        return float(np.searchsorted(cum, k, side="right") - offset)

    out = []
    for q in (low, high):
        pos = q / 100 * (n - 1)
        k = int(np.floor(pos))
        a, b = order_stat(k), order_stat(min(k + 1, n - 1))
        out.append(a + (pos - k) * (b - a))
    top = float(np.flatnonzero(hist)[-1] - offset)
    return out[0], out[1], top


def _sampled_ranges(
    bands: Iterable[np.ndarray], keep: int, low: float, high: float
) -> list[tuple[float, ...]]:
    """:func:`channel_range` of each of three channels, from the ``(h, W, 3)`` bands of an
    image read one after the other.

    The percentiles come from every ``keep``-th non-zero finite value of a channel, in
    reading order across the bands (all of them when ``keep`` is 1: the result then equals
    :func:`channel_range`); the maximum is exact. Sampling the non-zero values, not a grid
    of pixels, never misses sparse signal (a grid can fall between cells, or on rows and
    columns a pattern leaves empty).
    """
    kept: list[list[np.ndarray]] = [[], [], []]
    seen = [0, 0, 0]
    tops = [-np.inf, -np.inf, -np.inf]
    for part in bands:
        for i in range(3):
            nz = _nonzero_finite(part[:, :, i])
            if nz.size:
                kept[i].append(nz[(-seen[i]) % keep :: keep].copy())
                seen[i] += nz.size
                tops[i] = max(tops[i], float(nz.max()))
    ranges: list[tuple[float, ...]] = []
    for i in range(3):
        if not seen[i]:
            ranges.append(())
            continue
        lo, hi = np.percentile(np.concatenate(kept[i]), [low, high])
        kept[i] = []
        ranges.append((float(lo), float(hi), tops[i]))
    return ranges


class _WriteBandFailed(Exception):
    """Carries what the caller's ``write_band`` raised past the decoding errors' handler."""


def normalize_tiff_tiled(
    path: str | Path,
    write_band: Callable[[int, np.ndarray], None],
    low: float = 1.0,
    high: float = 99.0,
    band: int = 256,
    sample_pixels: int = 16_777_216,
) -> tuple[int, int]:
    """Normalise a large TIFF to ``(H, W, 3) uint8`` band by band, without loading it whole.

    The file is opened through tifffile's zarr view, so only the tiles or strips of one band
    of rows are decoded at a time. A first pass finds each channel's percentile range: for
    8- and 16-bit integer images from exact histograms (the result then equals
    :func:`normalize_image`), for other types from a regular sample of at most about
    ``sample_pixels`` of each channel's non-zero values (:func:`_sampled_ranges`; exact
    below that size). A second pass rescales each band and hands it to
    ``write_band(y0, band_array)``. Peak memory is a band, not several copies of the image.

    Returns
    -------
    (int, int)
        The image's height and width.

    Raises
    ------
    ImageFormatError
        Naming the file, if it cannot be decoded or is not a 2-D or 3-D image. What
        ``write_band`` raises propagates as it is: it is not the file's fault.
    """
    import zarr

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tf:
            _refuse_planes(path, tf.series[0].axes, tuple(tf.series[0].shape))
            arr = zarr.open_array(store=tf.series[0].aszarr(level=0), mode="r")
            shape = tuple(int(n) for n in arr.shape)
            if len(shape) not in (2, 3):
                raise ImageFormatError(f"{path}: expected a 2-D or 3-D image, got shape {shape}")
            c = declared_channel_axis(tf.series[0].axes, len(shape))
            if c is None and len(shape) == 3:
                c = guessed_channel_axis(shape, str(path))
            h, w = [n for i, n in enumerate(shape) if i != c][:2]

            photometric = _photometric(tf)

            def rows(y0: int, y1: int) -> np.ndarray:
                if c is None:  # 2-D
                    part = arr[y0:y1][:, :, None]
                else:
                    index = [slice(y0, y1), slice(None)]
                    index.insert(c, slice(None))
                    part = np.moveaxis(arr[tuple(index)], c, -1)
                return _three_channels(as_displayed(part, photometric, path))

            dtype = np.dtype(arr.dtype)
            if dtype.kind == "b":  # as on the whole-image path (normalize_image)
                raise ImageFormatError(
                    f"{path}: a 1-bit (binary) image is a mask, not a micrograph"
                )
            if dtype.kind in "ui" and dtype.itemsize <= 2:
                offset = -int(np.iinfo(dtype).min)
                hists = np.zeros((3, 1 << (8 * dtype.itemsize)), np.int64)
                for y0 in range(0, h, band):
                    part = rows(y0, min(h, y0 + band))
                    for i in range(3):
                        ch = part[:, :, i]
                        vals = ch[ch != 0].astype(np.int64) + offset
                        hists[i] += np.bincount(vals, minlength=hists.shape[1])
                ranges = [_histogram_range(hists[i], offset, low, high) for i in range(3)]
            else:
                ranges = _sampled_ranges(
                    (rows(y0, min(h, y0 + band)) for y0 in range(0, h, band)),
                    keep=max(1, int(np.ceil(h * w / sample_pixels))),
                    low=low,
                    high=high,
                )
            for y0 in range(0, h, band):
                part = rows(y0, min(h, y0 + band))
                out = np.empty(part.shape, np.uint8)
                for i in range(3):
                    out[:, :, i] = apply_range(part[:, :, i], ranges[i])
                try:
                    write_band(y0, out)
                except Exception as exc:
                    raise _WriteBandFailed from exc
    except _WriteBandFailed as failed:
        raise failed.__cause__ from None
    except ImageFormatError:
        raise
    except Exception as exc:  # a decoder's own error, named by file
        raise ImageFormatError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
    return h, w


#: length units as TIFF writers spell them -> the OME-Zarr (NGFF) unit names
_UNITS = {
    "micron": "micrometer",
    "microns": "micrometer",
    "um": "micrometer",
    "\u00b5m": "micrometer",
    "\u03bcm": "micrometer",
    "micrometer": "micrometer",
    "nm": "nanometer",
    "nanometer": "nanometer",
    "mm": "millimeter",
    "millimeter": "millimeter",
    "cm": "centimeter",
    "centimeter": "centimeter",
    "m": "meter",
    "meter": "meter",
    "pm": "picometer",
    "picometer": "picometer",
    "\u00e5": "angstrom",
    "angstrom": "angstrom",
    "inch": "inch",
}


def ome_unit(unit: str) -> str | None:
    """The OME-Zarr (NGFF) name of a length unit as TIFF writers and users spell it
    (``"um"``, ``"\u00b5m"``, ``"micron"``, ``"micrometer"``...), or None for one it does
    not name. ImageJ writes a micro sign into its description as the escape ``\\u00B5m``,
    which is read here as the sign it stands for."""
    text = unit.strip()
    if "\\u" in text and text.isascii():
        try:
            text = text.encode("ascii").decode("unicode_escape")
        except UnicodeDecodeError:
            pass
    return _UNITS.get(text.lower())


#: a pixel's physical size: one side of a square pixel, or ``(y, x)`` sides of another
PixelSize = float | tuple[float, float]


def pixel_size(path: str | Path) -> tuple[PixelSize, str] | None:
    """The physical size of a pixel an OME-TIFF or ImageJ TIFF declares: ``(size, unit)``
    with an OME-Zarr unit name (``"micrometer"``...); ``size`` is one number for a square
    pixel, ``(y, x)`` for another. None when the file declares none that cellst trusts
    (other formats, plain TIFF resolution tags, a unit OME-Zarr does not name:
    :func:`ignored_pixel_size` says which)."""
    return _usable_pixel_size(_declared_pixel_size(path))


def source_missing(row: Any) -> str | None:
    """Why a store item's source file (a manifest row's ``source_path``) no longer
    describes the stored image: ``"gone"`` (moved or deleted since ingest) or ``"changed
    since ingest"`` (its sha256 is not ``source_sha256``); None when it is there unchanged,
    or the row records no source. Reads the whole file: ask only where it matters."""
    from cellst.fingerprint import file_sha256

    path = getattr(row, "source_path", None)
    if not isinstance(path, str) or not path:
        return None
    if not Path(path).is_file():
        return "gone"
    digest = getattr(row, "source_sha256", None)
    if isinstance(digest, str) and digest and file_sha256(path) != digest:
        return "changed since ingest"
    return None


def source_pixel_size(row: Any, verified: bool = False) -> tuple[PixelSize, str] | None:
    """The pixel size a store item's source file declares (:func:`pixel_size`), or None:
    none declared, or the file is gone. With ``verified``, also None when the file changed
    since ingest (:func:`source_missing`: a replaced file does not describe the stored
    image); the file is read whole only when it declares a size."""
    path = getattr(row, "source_path", None)
    if not isinstance(path, str) or not path:
        return None
    declared = pixel_size(path)
    if declared is not None and verified and source_missing(row):
        return None
    return declared


def pixel_size_yx(size: PixelSize) -> tuple[float, float]:
    """``(y, x)`` sides of a :data:`PixelSize`."""
    if isinstance(size, tuple | list):
        return float(size[0]), float(size[1])
    return float(size), float(size)


def ignored_pixel_size(path: str | Path) -> str | None:
    """Why a pixel size the file declares is not used (one clause), or None: none is
    declared, or :func:`pixel_size` returns it."""
    declared = _declared_pixel_size(path)
    if declared is None or _usable_pixel_size(declared) is not None:
        return None
    sx, sy, unit = declared
    if not sx or float(sx) <= 0 or unit.strip().lower() in ("", "pixel", "pixels", "none"):
        return None  # nothing declared (an uncalibrated ImageJ TIFF: 1 x 1, no unit)
    return f"its pixel size {float(sx):g} {unit} has a unit OME-Zarr does not name"


def _usable_pixel_size(declared: tuple[Any, Any, str] | None) -> tuple[PixelSize, str] | None:
    """``(size, OME-Zarr unit)`` of a declared pixel in a unit OME-Zarr names: one number
    for a square pixel (or one whose y size is not given), ``(y, x)`` for another."""
    if declared is None:
        return None
    sx, sy, unit = declared
    name = ome_unit(unit)
    if name is None or not sx or float(sx) <= 0:
        return None
    x = float(sx)
    y = float(sy) if sy is not None and float(sy) > 0 else x
    return (x if abs(y - x) <= 1e-6 * x else (y, x)), name


def _declared_pixel_size(path: str | Path) -> tuple[Any, Any, str] | None:
    """``(x size, y size or None, unit)`` as an OME-TIFF or ImageJ TIFF declares them."""
    try:
        with tifffile.TiffFile(path) as tf:
            if tf.is_ome:
                pixels = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]
                pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
                sx, sy = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeY", None)
                unit = str(pixels.get("PhysicalSizeXUnit", "\u00b5m"))
            elif tf.is_imagej:
                num, den = tf.pages[0].tags["XResolution"].value
                ynum, yden = tf.pages[0].tags["YResolution"].value
                sx, sy = den / num, yden / ynum
                unit = str((tf.imagej_metadata or {}).get("unit", ""))
            else:
                return None
    except Exception:  # noqa: BLE001 - not a TIFF, or no such tags: nothing declared
        return None
    return sx, sy, unit


def check_min_side(path: str | Path, h: int, w: int, min_side: int) -> None:
    """Refuse an image with a side under ``min_side`` pixels (``ingest.min_side``): a line or
    a thumbnail, which the model cannot segment; the same rule for ingest and segment.

    Raises
    ------
    ImageFormatError
        Naming the file, its size and the setting.
    """
    if min(h, w) < min_side:
        raise ImageFormatError(
            f"{path}: image is {h} x {w} pixels, smaller than ingest.min_side={min_side}"
        )


def binary_regions(label: np.ndarray) -> int:
    """Separate regions of a label map that gives every cell the same value (a semantic
    mask, e.g. 0/255); 0 for an instance map (values differ, or one region only).

    Such a map is a single cell to the challenge metric, which matches label values, not
    regions (a binary mask of 50 cells scores F1 near 0 with no hint why), and to training.
    """
    fg = label[label > 0]
    if fg.size == 0 or fg.min() != fg.max():
        return 0
    from scipy import ndimage

    n = int(ndimage.label(label > 0)[1])
    return n if n > 1 else 0


def scattered_values(label: np.ndarray) -> tuple[int, int] | None:
    """``(values, pieces)`` of a map whose values each lie in many separate pieces, as an
    intensity image's grey levels do and a label map's cells do not (at least twice as many
    8-connected pieces as values, and 10 pieces); None for an instance map, or a binary mask
    (:func:`binary_regions`).

    An image given where label maps were expected (``--pred`` at the image folder) is
    otherwise scored as thousands of tiny cells, F1 near 0, with no hint why.
    """
    fg = label > 0
    if not fg.any():
        return None
    # a label map's neighbouring foreground pixels mostly share their value: such a map
    # is passed in numpy alone (no skimage import on `cellst evaluate`'s start-up path)
    both = fg[:, :-1] & fg[:, 1:]
    if 2 * int((both & (label[:, :-1] != label[:, 1:])).sum()) <= int(both.sum()):
        return None
    values = int(np.unique(label[fg]).size)
    if values < 2:
        return None
    from skimage.measure import label as connected

    pieces = int(connected(label, background=0, connectivity=2).max())
    return (values, pieces) if pieces >= max(2 * values, 10) else None


def validate_label(label: np.ndarray, image_shape: tuple[int, int], name: str) -> np.ndarray:
    """Check an instance map and return it as int32, relabelled 1..N.

    Raises
    ------
    ImageFormatError
        When the label is not a 2-D integer map of the image's height and width, or holds
        negative values.
    """
    if label.ndim == 3 and label.shape[-1] == 1:
        label = label[:, :, 0]
    if label.ndim == 3 and label.shape[0] == 1:
        label = label[0]
    if label.ndim != 2:
        raise ImageFormatError(f"{name}: label must be a 2-D instance map, got shape {label.shape}")
    if tuple(label.shape) != tuple(image_shape):
        raise ImageFormatError(
            f"{name}: label shape {tuple(label.shape)} differs from its image's "
            f"{tuple(image_shape)}"
        )
    if np.issubdtype(label.dtype, np.floating):
        if not np.all(np.isfinite(label)) or np.any(label != np.round(label)):
            raise ImageFormatError(
                f"{name}: label must be an integer instance map, got non-integer "
                f"{label.dtype} values"
            )
    elif label.dtype == bool or not np.issubdtype(label.dtype, np.integer):
        raise ImageFormatError(f"{name}: label must be an integer instance map, got {label.dtype}")
    if label.size and label.min() < 0:
        raise ImageFormatError(f"{name}: label has negative values (min {label.min()})")
    return _relabelled_int32(label, name)


def _relabelled_int32(label: np.ndarray, name: str) -> np.ndarray:
    """A non-negative integer-valued map relabelled 1..N as int32: only the number of
    instances N has to fit, not the ids (any integer width, e.g. 2**40).

    Raises
    ------
    ImageFormatError
        When a float map's values exceed int64, or N exceeds int32.
    """
    if np.issubdtype(label.dtype, np.floating):
        if label.size and label.max() >= 2.0**63:
            raise ImageFormatError(f"{name}: label values exceed int64")
        label = label.astype(np.int64)
    relabelled, _, _ = relabel_sequential(label)
    n = int(relabelled.max()) if relabelled.size else 0
    if n > np.iinfo(np.int32).max:
        raise ImageFormatError(f"{name}: label has {n:,} instances, more than int32 holds")
    return relabelled.astype(np.int32)


#: centimetres per unit of :func:`ome_unit` (TIFF's resolution tags count pixels per inch
#: or per centimetre; cellst writes centimetres)
_CENTIMETRES = {
    "picometer": 1e-10,
    "angstrom": 1e-8,
    "nanometer": 1e-7,
    "micrometer": 1e-4,
    "millimeter": 0.1,
    "centimeter": 1.0,
    "meter": 100.0,
    "inch": 2.54,
}


def resolution_tags(pixel_size: tuple[PixelSize, str] | None) -> dict[str, Any]:
    """tifffile's ``resolution`` and ``resolutionunit`` for a pixel of ``(size, unit)``
    (:func:`pixel_size`): pixels per centimetre in x and y, the baseline TIFF tags that
    Fiji, QuPath (Bio-Formats) and tifffile read as the pixel's size. Empty for None or a
    unit with no length."""
    if pixel_size is None:
        return {}
    size, unit = pixel_size
    cm = _CENTIMETRES.get(ome_unit(unit) or "")
    sy, sx = pixel_size_yx(size)
    if cm is None or sx <= 0 or sy <= 0:
        return {}
    return {"resolution": (1.0 / (sx * cm), 1.0 / (sy * cm)), "resolutionunit": "CENTIMETER"}


def write_label_tiff(
    path: str | Path,
    label: np.ndarray,
    model_id: str | None = None,
    source: dict[str, str] | None = None,
    pixel_size: tuple[PixelSize, str] | None = None,
    before_rename: Callable[[], object] | None = None,
) -> None:
    """Write an instance map as a challenge ``NAME_label.tiff`` (zlib), atomically.

    Uses uint16 when the instance count fits, else int32 (never uint8, which wraps). The
    file's ``Software`` tag says ``cellst`` (:func:`is_cellst_label_tiff`); ``model_id``
    (the digest of the model and post-processing that made it) and ``source`` (the image it
    was predicted from: ``{"folder", "file", "digest"}``) go in its JSON image description,
    so a resumed ``cellst predict --out`` only keeps its own model's files of the same
    images (:func:`label_tiff_record`). ``pixel_size`` (the source image's, ``(size,
    unit)`` as :func:`pixel_size` gives it) goes in the TIFF resolution tags
    (:func:`resolution_tags`), so that areas measured on the labels in Fiji or QuPath come
    in the image's units. ``before_rename`` goes to :func:`cellst.fs.atomic_write`.
    """
    path = Path(path)
    n = int(label.max()) if label.size else 0
    dtype = np.uint16 if n < 65536 else np.int32
    data = label.astype(dtype)
    meta: dict[str, Any] = resolution_tags(pixel_size)
    if model_id is not None:  # tifffile's own shaped description, plus the model
        doc: dict[str, Any] = {"shape": list(data.shape), "model_id": model_id}
        if source is not None:
            doc["source"] = {k: str(v) for k, v in source.items()}
        meta["description"] = json.dumps(doc)
        meta["metadata"] = None
    atomic_write(
        path,
        lambda tmp: tifffile.imwrite(tmp, data, compression="zlib", software=SOFTWARE_TAG, **meta),
        before_rename,
    )


def label_tiff_record(path: str | Path) -> dict[str, Any] | None:
    """What a label TIFF cellst wrote records of itself (``{"model_id": ...}`` and, since
    2026-12-05, ``"source": {"folder", "file", "digest"}`` from :func:`write_label_tiff`;
    ``{}`` when nothing); None for a file cellst did not write (its ``Software`` tag),
    readable or not (e.g. a user's ground truth)."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tag = page.tags.get("Software")
            if tag is None or tag.value != SOFTWARE_TAG:
                return None
            description = page.description
    except Exception:  # noqa: BLE001 - not a TIFF we can read: not ours
        return None
    try:
        doc = json.loads(description or "{}")
    except ValueError:
        return {}
    if not (isinstance(doc, dict) and isinstance(doc.get("model_id"), str)):
        return {}
    record: dict[str, Any] = {"model_id": doc["model_id"]}
    source = doc.get("source")
    if isinstance(source, dict) and all(isinstance(v, str) for v in source.values()):
        record["source"] = source
    return record


def label_tiff_model_id(path: str | Path) -> str | None:
    """The ``model_id`` a cellst label TIFF records; None for a file cellst did not write,
    or wrote without one (:func:`label_tiff_record`)."""
    return (label_tiff_record(path) or {}).get("model_id")


def is_cellst_label_tiff(path: str | Path) -> bool:
    """Whether ``path`` is a label map cellst wrote (its ``Software`` tag), so that it may
    be replaced; False for any other file, readable or not (e.g. a user's ground truth)."""
    return label_tiff_record(path) is not None
