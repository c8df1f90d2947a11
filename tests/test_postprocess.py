"""Tests of cellst.postprocess: HoVer watershed post-processing, untiled and tiled."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage as ndi

from cellst.data.synth import synth_image
from cellst.metrics.instance import match_instances
from cellst.model.targets import hover_maps
from cellst.postprocess import (
    PostprocessConfig,
    hover_steps,
    hover_to_instances,
    hover_to_instances_tiled,
    postprocess_hover,
    relabel_sequential,
    sobel_kernels,
    tile_layout,
)
from cellst.postprocess import hover as hover_mod

# --------------------------------------------------------------------------- helpers


def synth_labels(seed: int, shape=(512, 512), density=0.5, radius_range=(8.0, 16.0)):
    """Ground-truth instance map of the synthetic generator (touching cells included)."""
    _, lab = synth_image(np.random.default_rng(seed), "fluorescence", shape, density, radius_range)
    return lab


def painted_cells(rng, shape, n, rmin, rmax):
    """Fast random ellipses; every pixel goes to the cell of smallest scaled distance."""
    lab = np.zeros(shape, dtype=np.int32)
    best = np.full(shape, np.inf, dtype=np.float32)
    cys = rng.uniform(0, shape[0], n)
    cxs = rng.uniform(0, shape[1], n)
    for i in range(n):
        a, b = rng.uniform(rmin, rmax, 2)
        t = rng.uniform(0, np.pi)
        r = int(np.ceil(max(a, b))) + 1
        y0, y1 = max(0, int(cys[i]) - r), min(shape[0], int(cys[i]) + r + 1)
        x0, x1 = max(0, int(cxs[i]) - r), min(shape[1], int(cxs[i]) + r + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        y, x = yy - cys[i], xx - cxs[i]
        u = (x * np.cos(t) + y * np.sin(t)) / a
        v = (-x * np.sin(t) + y * np.cos(t)) / b
        d = np.sqrt(u * u + v * v).astype(np.float32)
        win = (d < 1.0) & (d < best[y0:y1, x0:x1])
        best[y0:y1, x0:x1][win] = d[win]
        lab[y0:y1, x0:x1][win] = i + 1
    # keep the largest 4-connected piece of every cell, drop tiny cells
    pieces, _ = ndi.label(lab > 0)
    out = np.zeros_like(lab)
    nxt = 0
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        m = lab[sl] == i
        cc, k = ndi.label(m)
        if k > 1:
            m = cc == (np.argmax(np.bincount(cc.ravel())[1:]) + 1)
        if m.sum() >= 30:
            nxt += 1
            out[sl][m] = nxt
    return out


def perfect_maps(lab):
    """Noise-free network outputs for an instance map."""
    return (lab > 0).astype(np.float32), hover_maps(lab)


def noisy_maps(lab, seed, noise=0.05):
    rng = np.random.default_rng(seed)
    prob = ndi.gaussian_filter((lab > 0).astype(np.float32), 1.0)
    prob = np.clip(prob + rng.normal(0, noise, lab.shape), 0, 1).astype(np.float32)
    hv = hover_maps(lab) + rng.normal(0, noise, (2, *lab.shape)).astype(np.float32)
    return prob, hv


def same_partition(a, b):
    """True when two label maps are equal up to a bijection of the non-zero labels."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(a.astype(np.int64) * (int(b.max()) + 1) + b)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def monai_instances(prob, hv, **kw):
    from monai.apps.pathology.transforms.post.array import HoVerNetInstanceMapPostProcessing

    post = HoVerNetInstanceMapPostProcessing(
        activation=lambda x: x,
        mask_threshold=kw.get("mask_threshold", 0.5),
        min_object_size=kw.get("min_object_size", 10),
        sobel_kernel_size=kw.get("sobel_kernel", 21),
        marker_threshold=kw.get("marker_threshold", 0.4),
        marker_radius=kw.get("marker_radius", 2),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, inst = post(prob[None], hv)
    return relabel_sequential(np.asarray(inst)[0])


# --------------------------------------------------------------------------- building blocks


def test_hover_maps_match_monai():
    from monai.transforms import ComputeHoVerMaps

    lab = synth_labels(3, (192, 224), density=0.6, radius_range=(5.0, 12.0))
    ref = np.asarray(ComputeHoVerMaps()(lab[None]))
    ours = hover_maps(lab)
    assert ours.dtype == np.float32 and ours.shape == (2, *lab.shape)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert np.abs(ours).max() <= 1.0
    assert not hover_maps(np.zeros((5, 6), np.int32)).any()


@pytest.mark.parametrize("size", [3, 5, 21])
def test_sobel_kernels_match_monai(size):
    from monai.transforms import SobelGradients

    smooth, deriv = sobel_kernels(size)
    sg = SobelGradients(kernel_size=size)
    np.testing.assert_allclose(smooth, sg.kernel_smooth.numpy(), atol=1e-7)
    np.testing.assert_allclose(deriv, sg.kernel_diff.numpy(), atol=1e-7)
    assert smooth.sum() == pytest.approx(1.0) and deriv.sum() == pytest.approx(0.0)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.3])
def test_gaussian_kernel_matches_monai(sigma):
    from monai.networks.layers.convutils import gaussian_1d

    ref = gaussian_1d(sigma, truncated=4.0, approx="erf").numpy()
    np.testing.assert_allclose(hover_mod._gauss_kernel(sigma), ref, atol=1e-6)


@pytest.mark.parametrize("shape", [(37, 53), (70, 9), (5, 40)])
@pytest.mark.parametrize("mode", ["reflect", "constant"])
@pytest.mark.parametrize("kernels", ["sobel", "general"])
def test_blocked_separable_filter_matches_scipy(shape, mode, kernels):
    rng = np.random.default_rng(0)
    img = rng.standard_normal(shape).astype(np.float32)
    smooth, deriv = sobel_kernels(7)
    if kernels == "general":
        smooth, deriv = rng.uniform(-1, 1, 5), rng.uniform(-1, 1, 3)
    scipy_mode = "mirror" if mode == "reflect" else "constant"
    ref = ndi.correlate1d(img.astype(np.float64), smooth, axis=0, mode=scipy_mode)
    ref = ndi.correlate1d(ref, deriv, axis=1, mode=scipy_mode)
    got = hover_mod._separable(img, smooth, deriv, mode, block=4)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_binary_opening_matches_skimage_reflect():
    from skimage.morphology import disk, opening

    rng = np.random.default_rng(1)
    mask = ndi.binary_dilation(rng.random((61, 47)) < 0.08, iterations=2)
    for radius in (1, 2, 3):
        ref = opening(mask.astype(np.uint8), disk(radius)).astype(bool)
        np.testing.assert_array_equal(hover_mod._binary_opening(mask, radius), ref)


def test_relabel_sequential():
    lab = np.array([[0, 7, 7], [3, 0, 300]], dtype=np.int64)
    out = relabel_sequential(lab)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[0, 2, 2], [1, 0, 3]])


def test_tile_layout_partitions_axis():
    for length, tile, overlap in [(3000, 1024, 192), (1025, 1024, 64), (500, 1024, 64)]:
        lay = tile_layout(length, tile, overlap)
        assert lay[0][2] == 0 and lay[-1][3] == length
        for (s, e, c0, c1), nxt in zip(lay, [*lay[1:], None], strict=True):
            assert 0 <= s <= c0 < c1 <= e <= max(length, tile)
            if nxt is not None:
                assert c1 == nxt[2]
                assert c1 - s >= overlap // 2 or s == 0
                assert e - c1 >= overlap // 2


# --------------------------------------------------------------------------- behaviour


def test_recovers_instances_from_perfect_maps():
    lab = synth_labels(0, (512, 512), density=0.55)
    touching = ndi.binary_dilation(lab > 0) & (ndi.maximum_filter(lab, 3) != lab)
    assert touching.sum() > 500  # many cells touch each other
    out = hover_to_instances(*perfect_maps(lab))
    res = match_instances(lab, out)
    assert res.f1 >= 0.95
    assert abs(res.n_pred - res.n_gt) <= 0.03 * res.n_gt


def test_recovers_instances_from_noisy_maps():
    lab = synth_labels(1, (512, 512), density=0.45)
    out = hover_to_instances(*noisy_maps(lab, 1))
    assert match_instances(lab, out).f1 >= 0.95


def test_two_touching_cells_are_split():
    lab = np.zeros((80, 120), np.int32)
    yy, xx = np.mgrid[:80, :120]
    lab[(yy - 40) ** 2 + (xx - 40) ** 2 <= 22**2] = 1
    lab[((yy - 40) ** 2 + (xx - 82) ** 2 <= 22**2) & (lab == 0)] = 2
    assert ndi.label(lab > 0)[1] == 1  # one foreground component
    out = hover_to_instances(*perfect_maps(lab))
    assert out.max() == 2
    assert match_instances(lab, out).f1 == 1.0


def test_output_dtype_and_sequential_labels():
    lab = synth_labels(2, (256, 256), density=0.5)
    out = hover_to_instances(*noisy_maps(lab, 2))
    assert out.dtype == np.int32 and out.shape == lab.shape
    ids = np.unique(out)
    np.testing.assert_array_equal(ids, np.arange(len(ids)))


def test_more_than_255_instances():
    yy, xx = np.mgrid[:300, :300]
    lab = np.zeros((300, 300), np.int32)
    k = 0
    for i in range(25):
        for j in range(25):
            k += 1
            cx = 6 + 12 * j + (3 if i % 2 else 0)  # odd rows shifted: some cells touch
            lab[((yy - 6 - 12 * i) ** 2 + (xx - cx) ** 2 <= 30) & (lab == 0)] = k
    out = hover_to_instances(*perfect_maps(lab), sobel_kernel=5)
    assert out.dtype == np.int32
    assert out.max() == len(np.unique(out)) - 1 > 600
    assert match_instances(lab, out).f1 >= 0.95


@pytest.mark.parametrize(
    ("seed", "params"),
    [
        (3, {}),
        (4, {"distance_sigma": 0.0, "marker_radius": 0}),
        (5, {"mask_threshold": 0.3, "marker_threshold": 0.6, "sobel_kernel": 11}),
    ],
)
def test_hover_steps_give_each_map_and_the_same_instances(seed, params):
    """The step-by-step maps end in exactly the fused function's instances."""
    prob, hv = noisy_maps(synth_labels(seed, (256, 320)), seed)
    steps = hover_steps(prob, hv, **params)
    out = hover_to_instances(prob, hv, **params)
    assert out.max() > 20 and np.array_equal(steps.instances, out)
    fg = steps.mask > 0
    assert steps.mask.dtype == steps.markers.dtype == np.int32
    assert steps.border.dtype == steps.distance.dtype == np.float32
    assert not steps.border[~fg].any() and steps.border[fg].max() <= 1.0
    assert (steps.distance <= 0).all() and not steps.markers[~fg].any()
    assert np.array_equal(
        np.unique(steps.instances[steps.markers > 0]), np.arange(1, out.max() + 1)
    )


def test_hover_steps_of_a_constant_hover_map_are_zeros():
    prob = np.zeros((64, 64), np.float32)
    prob[10:40, 10:40] = 1.0
    steps = hover_steps(prob, np.zeros((2, 64, 64), np.float32))
    assert steps.mask.max() == 1  # the mask step still ran
    assert not (steps.border.any() or steps.markers.any() or steps.instances.any())


def test_empty_probability_gives_zeros():
    hv = np.random.default_rng(0).normal(0, 0.3, (2, 64, 80)).astype(np.float32)
    out = hover_to_instances(np.zeros((64, 80), np.float32), hv)
    assert out.dtype == np.int32 and out.shape == (64, 80) and not out.any()


@pytest.mark.parametrize("value", [0.0, 0.7])
def test_constant_hover_map_gives_zeros(value):
    prob = np.zeros((64, 64), np.float32)
    prob[10:40, 10:40] = 1.0
    out = hover_to_instances(prob, np.full((2, 64, 64), value, np.float32))
    assert out.dtype == np.int32 and not out.any()
    hv = np.zeros((2, 64, 64), np.float32)
    hv[0] = np.linspace(-1, 1, 64)[None, :]  # only the vertical channel is constant
    assert not hover_to_instances(prob, hv).any()


def test_accepts_channel_first_prob_and_float64():
    lab = synth_labels(4, (128, 128))
    prob, hv = perfect_maps(lab)
    a = hover_to_instances(prob, hv)
    b = hover_to_instances(prob[None].astype(np.float64), hv.astype(np.float64))
    np.testing.assert_array_equal(a, b)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="hv"):
        hover_to_instances(np.zeros((8, 8)), np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="nuclear_prob"):
        hover_to_instances(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)))


def test_public_watershed_fallback_gives_same_result(monkeypatch):
    # the fast path really runs with the pinned scikit-image (else both sides below are
    # the public function, and a failing self-test would go unseen)
    assert hover_mod._raveled_watershed_impl() is not None
    lab = synth_labels(5, (256, 256), density=0.6)
    prob, hv = noisy_maps(lab, 5, noise=0.1)
    fast = hover_to_instances(prob, hv)
    monkeypatch.setattr(hover_mod, "_RAVELED", [None])
    slow = hover_to_instances(prob, hv)
    np.testing.assert_array_equal(fast, slow)


# --------------------------------------------------------------------------- MONAI agreement


def test_agrees_with_monai_moderate_case():
    lab = synth_labels(6, (512, 512), density=0.5)
    prob, hv = noisy_maps(lab, 6)
    ours = hover_to_instances(prob, hv)
    ref = monai_instances(prob, hv)
    assert match_instances(ref, ours).f1 >= 0.98
    assert same_partition(ref, ours)  # in fact identical up to ids


def test_agrees_with_monai_noisy_small_kernel():
    lab = synth_labels(7, (256, 256), density=0.6, radius_range=(5.0, 12.0))
    prob, hv = noisy_maps(lab, 7, noise=0.25)
    kw = {"sobel_kernel": 7, "marker_radius": 1, "marker_threshold": 0.5}
    assert (
        match_instances(monai_instances(prob, hv, **kw), hover_to_instances(prob, hv, **kw)).f1
        >= 0.98
    )


def test_marker_filled_through_mask_hole_matches_monai():
    """A ring cell around a separate nucleus: hole filling makes one marker span both."""
    yy, xx = np.mgrid[:96, :96]
    r2 = (yy - 48) ** 2 + (xx - 48) ** 2
    lab = np.zeros((96, 96), np.int32)
    lab[(r2 >= 12**2) & (r2 <= 30**2)] = 1
    lab[r2 <= 6**2] = 2
    prob, hv = perfect_maps(lab)
    hv[:, lab == 2] = 0.0  # the inner nucleus has no border energy of its own
    kw = {"sobel_kernel": 5}
    ours = hover_to_instances(prob, hv, **kw)
    ref = monai_instances(prob, hv, **kw)
    np.testing.assert_array_equal(ours, ref)


# --------------------------------------------------------------------------- tiling


def test_tiled_equals_untiled_on_large_map():
    rng = np.random.default_rng(11)
    lab = painted_cells(rng, (3000, 3000), 4500, 8.0, 26.0)
    prob, hv = noisy_maps(lab, 11)
    full = hover_to_instances(prob, hv)
    tiled = hover_to_instances_tiled(prob, hv, tile=1024, overlap=192)
    assert tiled.dtype == np.int32
    res = match_instances(full, tiled)
    assert res.f1 == 1.0 and res.n_gt == res.n_pred == full.max() == tiled.max()
    assert same_partition(full, tiled)
    ids = np.unique(tiled)
    np.testing.assert_array_equal(ids, np.arange(len(ids)))
    assert match_instances(lab, tiled).f1 >= 0.95


def test_tiled_reads_memmaps_and_writes_out(tmp_path):
    lab = synth_labels(8, (700, 650), density=0.5)
    prob, hv = noisy_maps(lab, 8)
    pm = np.lib.format.open_memmap(tmp_path / "p.npy", "w+", np.float16, prob.shape)
    pm[...] = prob
    hm = np.lib.format.open_memmap(tmp_path / "hv.npy", "w+", np.float16, hv.shape)
    hm[...] = hv
    out = np.lib.format.open_memmap(tmp_path / "o.npy", "w+", np.int32, prob.shape)
    res = hover_to_instances_tiled(pm, hm, tile=256, overlap=100, out=out)
    assert res is out
    full = hover_to_instances(np.asarray(pm, np.float32), np.asarray(hm, np.float32))
    assert same_partition(full, np.asarray(out))


def test_tiled_degenerate_inputs():
    prob = np.zeros((600, 600), np.float32)
    hv = np.zeros((2, 600, 600), np.float32)
    assert not hover_to_instances_tiled(prob, hv, tile=256, overlap=64).any()
    prob[100:200, 100:200] = 1.0
    assert not hover_to_instances_tiled(prob, hv, tile=256, overlap=64).any()


def test_postprocess_hover_dispatches_on_size(monkeypatch):
    """Maps larger than ``tile`` go through the tiled path, window by window (what bounds
    the memory of a large image), and give the same partition as the whole-image path."""
    import cellst.postprocess.tiled as tiled_module

    seen: dict[str, list[tuple[int, ...]]] = {"whole": [], "window": []}
    whole, window = tiled_module.hover_to_instances, tiled_module._hover_core
    monkeypatch.setattr(
        tiled_module,
        "hover_to_instances",
        lambda p, *a, **k: seen["whole"].append(np.shape(p)) or whole(p, *a, **k),
    )
    monkeypatch.setattr(
        tiled_module,
        "_hover_core",
        lambda p, *a, **k: seen["window"].append(np.shape(p)) or window(p, *a, **k),
    )
    lab = synth_labels(9, (300, 280), density=0.5)
    prob, hv = noisy_maps(lab, 9)
    small = postprocess_hover(prob, hv)
    assert seen == {"whole": [(300, 280)], "window": []}
    tiled = postprocess_hover(prob, hv, PostprocessConfig(tile=160, tile_overlap=64))
    assert seen["whole"] == [(300, 280)] and len(seen["window"]) >= 4
    assert all(h < 300 and w < 280 for h, w in seen["window"])  # never the whole map
    assert same_partition(small, tiled)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sobel_kernel", 4),
        ("sobel_kernel", 1),
        ("mask_threshold", 1.5),
        ("marker_threshold", -0.1),
        ("min_object_size", -1),
        ("marker_radius", -2),
        ("distance_sigma", -1.0),
        ("tile", 16),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        PostprocessConfig(**{field: value})


def test_config_cross_field_checks_and_assignment():
    with pytest.raises(ValidationError, match="tile_overlap"):
        PostprocessConfig(tile=512, tile_overlap=300)
    with pytest.raises(ValidationError, match="tile_overlap"):
        PostprocessConfig(tile_overlap=10)  # below twice the filter halo
    with pytest.raises(ValidationError, match="extra"):
        PostprocessConfig(unknown=1)
    cfg = PostprocessConfig()
    with pytest.raises(ValidationError, match="sobel_kernel"):
        cfg.sobel_kernel = 8
    assert cfg.hover_kwargs() == {
        "mask_threshold": 0.5,
        "marker_threshold": 0.4,
        "sobel_kernel": 21,
        "min_object_size": 10,
        "marker_radius": 2,
        "distance_sigma": 1.0,
    }


def test_function_parameters_are_validated():
    prob = np.zeros((16, 16), np.float32)
    hv = np.zeros((2, 16, 16), np.float32)
    with pytest.raises(ValidationError, match="sobel_kernel"):
        hover_to_instances(prob, hv, sobel_kernel=6)
    with pytest.raises(ValidationError, match="tile_overlap"):
        hover_to_instances_tiled(prob, hv, tile=256, overlap=200)


def test_tiled_keeps_labels_sequential_when_an_instance_is_lost(monkeypatch):
    """An instance whose pixels were all claimed by an earlier tile leaves no gap in ids."""
    from cellst.postprocess import tiled as tiled_mod

    height, width = 200, 400  # one row of windows: [0, 256) and [144, 400), cut at 200
    assert [w[:3] for w in tile_layout(width, 256, 64)] == [(0, 256, 0), (144, 400, 200)]
    prob = np.broadcast_to(np.arange(width, dtype=np.float32), (height, width))  # x coordinate
    hv = np.random.default_rng(0).normal(0, 1, (2, height, width)).astype(np.float32)

    def fake_core(p, h, v, cfg, *, sobel_range):
        x = p[0]
        lab = np.zeros(p.shape, np.int32)
        if x[0] == 0:  # first window: one instance over the whole window
            lab[:] = 1
        else:  # second window: one instance inside the first window, one outside
            lab[:, (x >= 200) & (x < 256)] = 1
            lab[:, x >= 256] = 2
        return lab

    monkeypatch.setattr(tiled_mod, "_hover_core", fake_core)
    out = hover_to_instances_tiled(prob, hv, tile=256, overlap=64)
    np.testing.assert_array_equal(np.unique(out), [1, 2])
    assert (out[:, :256] == 1).all() and (out[:, 256:] == 2).all()
