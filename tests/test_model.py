"""Tests for cellst.model: networks, checkpoints, targets, augmentation and loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.apps.pathology.losses import HoVerNetLoss
from monai.transforms import ComputeHoVerMaps
from pydantic import ValidationError
from scipy import ndimage as ndi

from cellst.model import (
    HV_KEY,
    NP_KEY,
    AugmentConfig,
    CheckpointError,
    HoVerLoss,
    LossConfig,
    ModelConfig,
    build_augment,
    build_model,
    count_parameters,
    hover_maps,
    load_into,
    load_model,
    make_targets,
    np_target,
    read_checkpoint_info,
    save_checkpoint,
)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def voronoi_cells(
    rng: np.random.Generator, shape: tuple[int, int], n: int, rmin: float, rmax: float
) -> np.ndarray:
    """Touching and isolated blob instances with shuffled, non-sequential labels."""
    seeds = np.stack([rng.integers(0, s, n) for s in shape], axis=1)
    markers = np.zeros(shape, dtype=np.int64)
    values = rng.choice(np.arange(1, 50 * n), size=n, replace=False)
    markers[seeds[:, 0], seeds[:, 1]] = values
    dist, (ri, ci) = ndi.distance_transform_edt(markers == 0, return_indices=True)
    lab = markers[ri, ci]
    radius = np.zeros(int(values.max()) + 1)
    radius[values] = rng.uniform(rmin, rmax, n)
    lab[dist > radius[lab]] = 0
    return lab


def monai_hv(label: np.ndarray) -> np.ndarray:
    return np.asarray(ComputeHoVerMaps()(label[None]))


@pytest.fixture(scope="module")
def lite() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig())


@pytest.fixture(scope="module")
def fast() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="hovernet-fast")).eval()


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------


def test_lite_parameter_budget(lite: torch.nn.Module) -> None:
    assert count_parameters(lite) <= 2_000_000
    assert lite.input_size is None
    assert lite.output_size(256) == 256
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in lite.modules())
    with pytest.raises(ValueError, match="multiple of 32"):
        lite.output_size(100)


@pytest.mark.parametrize(
    ("batch", "h", "w"), [(2, 64, 64), (2, 96, 96), (1, 256, 256), (2, 64, 128)]
)
def test_lite_forward_backward(lite: torch.nn.Module, batch: int, h: int, w: int) -> None:
    lite.train()
    lite.zero_grad()
    out = lite(torch.rand(batch, 3, h, w))
    assert set(out) == {NP_KEY, HV_KEY} == {"nucleus_prediction", "horizontal_vertical"}
    for value in out.values():
        assert value.shape == (batch, 2, h, w)
        assert value.dtype == torch.float32
    (out[NP_KEY].square().mean() + out[HV_KEY].abs().mean()).backward()
    grads = [p.grad for p in lite.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("shape", [(1, 3, 100, 96), (1, 3, 64, 80)])
def test_lite_rejects_non_multiple_of_32(lite: torch.nn.Module, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        lite(torch.rand(*shape))


def test_lite_freeze_and_dropout() -> None:
    net = build_model(ModelConfig(width=8, freeze_encoder=True, dropout=0.1))
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("stem.", "encoder.")) for n in frozen)
    assert any(isinstance(m, torch.nn.Dropout) for m in net.modules())
    assert count_parameters(net, trainable_only=True) < count_parameters(net)


def test_lite_full_resolution_branch_ends() -> None:
    """``full_res``: a stride-1 stem and a full-resolution conv block end each branch; the
    default network's parameters (and so every earlier checkpoint) are unchanged."""
    torch.manual_seed(0)
    base = build_model(ModelConfig(width=8))
    net = build_model(ModelConfig(width=8, full_res=True)).train()
    extra = set(net.state_dict()) - set(base.state_dict())
    assert extra and all(k.startswith(("stem_full.", "heads_full.")) for k in extra)
    # the 1/2-resolution 1x1 heads are replaced by the full-resolution ones
    assert {k.split(".")[2] for k in set(base.state_dict()) - set(net.state_dict())} == {"2"}
    out = net(torch.rand(2, 3, 64, 96))
    for value in out.values():
        assert value.shape == (2, 2, 64, 96)
    (out[NP_KEY].square().mean() + out[HV_KEY].abs().mean()).backward()
    for name, param in net.named_parameters():
        if name.startswith(("stem_full.", "heads_full.")):
            assert param.grad is not None and float(param.grad.abs().sum()) > 0, name
    frozen = build_model(ModelConfig(width=8, full_res=True, freeze_encoder=True))
    assert not any(p.requires_grad for p in frozen.stem_full.parameters())
    assert ModelConfig(width=8).architecture() == {"name": "hovernet-lite", "in_channels": 3,
                                                   "width": 8}  # fmt: skip
    with pytest.raises(ValidationError, match="full_res"):
        ModelConfig(name="hovernet-fast", full_res=True)


def test_checkpoint_full_res_is_its_own_architecture(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(width=8, full_res=True)
    net = build_model(cfg).eval()
    ckpt = save_checkpoint(tmp_path / "fr", net, cfg)
    loaded, cfg2, _ = load_model(ckpt)
    assert cfg2.full_res
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x)[HV_KEY], loaded(x)[HV_KEY])
    with pytest.raises(CheckpointError, match=r"full_res=True.*hovernet-lite \(in_channels=3, "):
        load_into(build_model(ModelConfig(width=8)), ModelConfig(width=8), ckpt)


def test_model_config_validation() -> None:
    with pytest.raises(ValidationError, match="pretrained_url"):
        ModelConfig(pretrained_url="https://example.org/w.pth")
    with pytest.raises(ValidationError, match="decoder_padding"):
        ModelConfig(name="hovernet-original", decoder_padding=True)
    with pytest.raises(ValidationError):
        ModelConfig(name="unet")
    with pytest.raises(ValidationError):
        ModelConfig(depth=3)  # extra keys are forbidden
    cfg = ModelConfig()
    with pytest.raises(ValidationError):
        cfg.width = 0  # validate_assignment


def test_hovernet_fast_forward(fast: torch.nn.Module) -> None:
    assert fast.input_size == 256 and fast.output_size(256) == 164
    with torch.no_grad():
        out = fast(torch.rand(1, 3, 256, 256))
    assert set(out) == {NP_KEY, HV_KEY}
    assert out[NP_KEY].shape == out[HV_KEY].shape == (1, 2, 164, 164)
    with pytest.raises(ValueError, match="256"):
        fast(torch.rand(1, 3, 128, 128))
    with pytest.raises(ValueError):
        fast.output_size(270)


def test_hovernet_original_forward() -> None:
    net = build_model(ModelConfig(name="hovernet-original")).eval()
    assert net.input_size == 270 and net.output_size(270) == 80
    with torch.no_grad():
        out = net(torch.rand(1, 3, 270, 270))
    assert set(out) == {NP_KEY, HV_KEY}
    assert out[NP_KEY].shape == out[HV_KEY].shape == (1, 2, 80, 80)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def _trained_lite(width: int = 8) -> tuple[torch.nn.Module, ModelConfig]:
    torch.manual_seed(1)
    cfg = ModelConfig(width=width)
    net = build_model(cfg).train()
    net(torch.rand(2, 3, 64, 64))  # moves the BatchNorm running statistics
    return net.eval(), cfg


def test_checkpoint_round_trip(tmp_path) -> None:
    net, cfg = _trained_lite()
    meta = {"epoch": np.int64(3), "metrics": {"f1": np.float32(0.5), "pq": float("nan")}}
    target = save_checkpoint(tmp_path / "ckpt", net, cfg, meta)
    assert sorted(p.name for p in target.iterdir()) == ["model.json", "model.pt"]
    info = json.loads((target / "model.json").read_text())
    assert info["format"] == "cellst-model/1" and info["model"]["name"] == "hovernet-lite"
    assert "cellst_version" in info

    loaded, cfg2, meta2 = load_model(target)
    assert cfg2 == cfg
    assert meta2 == {"epoch": 3, "metrics": {"f1": 0.5, "pq": None}}
    assert not loaded.training
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = net(x), loaded(x)
    for key in (NP_KEY, HV_KEY):
        assert torch.equal(a[key], b[key])

    # overwriting is atomic and leaves no temporary directories behind
    save_checkpoint(target, net, cfg, {"epoch": 4})
    assert read_checkpoint_info(target)[1] == {"epoch": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_strips_ddp_prefix(tmp_path) -> None:
    import torch.distributed as dist

    assert not dist.is_initialized(), "no test may leave a process group behind"
    net, cfg = _trained_lite()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        save_checkpoint(tmp_path / "ckpt", ddp, cfg)
    finally:
        dist.destroy_process_group()
    state = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert state and not any(k.startswith("module.") for k in state)
    # a raw state_dict saved with DDP prefixes also loads
    prefixed = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save(prefixed, tmp_path / "ckpt" / "model.pt")
    other = build_model(cfg)
    load_into(other, cfg, tmp_path / "ckpt")
    assert all(torch.equal(other.state_dict()[k], v) for k, v in net.state_dict().items())


def test_checkpoint_wrong_model(tmp_path, fast: torch.nn.Module) -> None:
    net, cfg = _trained_lite(width=8)
    ckpt = save_checkpoint(tmp_path / "lite", net, cfg)
    with pytest.raises(CheckpointError) as err:
        load_into(fast, ModelConfig(name="hovernet-fast"), ckpt)
    msg = str(err.value)
    assert str(ckpt) in msg and "hovernet-lite" in msg and "hovernet-fast" in msg
    with pytest.raises(CheckpointError, match=r"width=8.*width=16"):
        load_into(build_model(ModelConfig(width=16)), ModelConfig(width=16), ckpt)
    # same config but tampered weights: the mismatched keys are named
    state = torch.load(ckpt / "model.pt", weights_only=True)
    first = next(iter(state))
    state["extra.weight"] = state.pop(first)
    torch.save(state, ckpt / "model.pt")
    with pytest.raises(CheckpointError, match=rf"missing keys: {first}.*unexpected keys: extra"):
        load_into(build_model(cfg), cfg, ckpt)


def test_checkpoint_missing_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as err:
        load_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    net, cfg = _trained_lite()
    ckpt = save_checkpoint(tmp_path / "c", net, cfg)
    (ckpt / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="model.pt") as err:
        load_model(ckpt)
    assert str(ckpt) in str(err.value)
    (ckpt / "model.json").unlink()
    with pytest.raises(CheckpointError, match="model.json"):
        load_model(ckpt)
    (ckpt / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_model(ckpt)


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_hover_maps_equal_monai(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (96, 128) if seed % 2 else (128, 96)
    lab = voronoi_cells(rng, shape, 45, 3, 14)  # touching cells, cells cut by the border
    # one-pixel instances, a two-piece instance, a 1-pixel-wide line, a corner pixel
    free = np.flatnonzero(lab.ravel() == 0)
    singles = rng.choice(free, 6, replace=False)
    lab.ravel()[singles] = np.arange(900_001, 900_007)
    lab[0, 0] = 123_457
    lab[-1, 5:40] = 77_777
    lab[-3:, -3:] = 777
    lab[:2, -2:] = 777
    ref = monai_hv(lab)
    got = hover_maps(lab)
    assert got.dtype == np.float32 and got.shape == (2, *shape)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert got.min() >= -1 and got.max() <= 1


def test_hover_maps_edge_cases() -> None:
    assert not hover_maps(np.zeros((8, 9), np.uint16)).any()
    lab = np.zeros((6, 6), np.uint8)
    lab[2, 3] = 5
    np.testing.assert_array_equal(hover_maps(lab), monai_hv(lab))
    full = np.ones((5, 7), np.int32)  # one cell filling the image
    np.testing.assert_array_equal(hover_maps(full), monai_hv(full))
    # labels beyond float32 precision (where MONAI itself breaks) give the relabelled result
    lab = voronoi_cells(np.random.default_rng(9), (64, 64), 20, 3, 10)
    big = np.where(lab > 0, lab + 2_000_000_000, 0)
    np.testing.assert_array_equal(hover_maps(big), hover_maps(lab))
    with pytest.raises(TypeError):
        hover_maps(lab.astype(np.float32))
    with pytest.raises(ValueError):
        hover_maps(-lab)


def test_make_targets() -> None:
    rng = np.random.default_rng(5)
    labs = np.stack([voronoi_cells(rng, (64, 64), 12, 3, 9) for _ in range(3)]).astype(np.int32)
    labs[1] = 0
    out = make_targets(torch.from_numpy(labs))
    assert out["np_onehot"].shape == out["hv"].shape == (3, 2, 64, 64)
    assert out["np_onehot"].dtype == out["hv"].dtype == torch.float32
    np.testing.assert_array_equal(out["np_onehot"][:, 1].numpy(), labs > 0)
    np.testing.assert_array_equal(out["np_onehot"].sum(1).numpy(), 1)
    for i in range(3):
        np.testing.assert_array_equal(out["hv"][i].numpy(), hover_maps(labs[i]))
        np.testing.assert_array_equal(np_target(labs[i]), labs[i] > 0)
    # (B, 1, H, W) is accepted too
    out1 = make_targets(torch.from_numpy(labs[:, None]))
    assert torch.equal(out1["hv"], out["hv"])


# ---------------------------------------------------------------------------------------------
# augmentation
# ---------------------------------------------------------------------------------------------


def _sample(rng: np.random.Generator, shape: tuple[int, int] = (150, 170)) -> dict:
    lab = voronoi_cells(rng, shape, 40, 4, 12) + np.int64(0)
    lab[lab > 0] += 100_000_000  # beyond float32 precision: must survive RandZoom exactly
    img = rng.integers(0, 256, (3, *shape), dtype=np.uint8)
    return {"image": img, "label": lab}


ALWAYS = AugmentConfig(
    flip_prob=1,
    rotate90_prob=1,
    noise_prob=1,
    contrast_prob=1,
    smooth_prob=1,
    hist_shift_prob=1,
    zoom_prob=1,
    jitter_prob=1,
    grayscale_prob=1,
    blur_prob=1,
    cutout_prob=1,
)


@pytest.mark.parametrize("preset", ["standard", "strong"])
@pytest.mark.parametrize("cfg", [AugmentConfig(), ALWAYS], ids=["default", "always"])
def test_augment_shapes_and_int_labels(preset: str, cfg: AugmentConfig) -> None:
    rng = np.random.default_rng(0)
    aug = build_augment(cfg, 96, preset, seed=0)
    for _ in range(4):
        sample = _sample(rng)
        out = aug(sample)
        assert set(out) == {"image", "label", "ignore"}
        assert out["image"].shape == (3, 96, 96) and out["image"].dtype == torch.float32
        assert out["label"].shape == (1, 96, 96) and out["label"].dtype == torch.int32
        assert out["ignore"].shape == (1, 96, 96) and out["ignore"].dtype == torch.float32
        assert type(out["label"]) is torch.Tensor  # plain tensors, no MetaTensor
        assert np.isin(out["label"].numpy(), sample["label"]).all()
        assert set(np.unique(out["ignore"].numpy())) <= {0.0, 1.0}
        if preset == "standard":
            assert not out["ignore"].any()


def test_augment_deterministic_under_seed() -> None:
    sample = _sample(np.random.default_rng(1))
    outs = [build_augment(ALWAYS, 64, "strong", seed=7)(sample) for _ in range(2)]
    other = build_augment(ALWAYS, 64, "strong", seed=8)(sample)
    for key in ("image", "label", "ignore"):
        assert torch.equal(outs[0][key], outs[1][key])
    assert not torch.equal(outs[0]["image"], other["image"])
    # Compose.set_random_state re-seeds an existing pipeline
    aug = build_augment(ALWAYS, 64, "strong")
    aug.set_random_state(seed=7)
    assert torch.equal(aug(sample)["image"], outs[0]["image"])


def test_strong_fields_act_only_in_the_strong_preset() -> None:
    """``AugmentConfig.STRONG_FIELDS`` (left out of a supervised training's fingerprint) are
    the settings of the strong preset alone: changing all of them leaves the standard
    preset's output unchanged and changes the strong one's."""
    assert set(AugmentConfig.STRONG_FIELDS) <= set(AugmentConfig.model_fields)
    other = ALWAYS.model_copy(
        update={
            "jitter_prob": 0.0,
            "jitter_brightness": 0.1,
            "jitter_contrast": 0.1,
            "jitter_saturation": 0.1,
            "jitter_hue": 0.1,
            "grayscale_prob": 0.0,
            "blur_prob": 0.0,
            "blur_sigma": (3.0, 4.0),
            "cutout_prob": 0.0,
            "cutout_area": (0.5, 0.6),
            "cutout_ratio": (1.0, 1.0),
        }
    )
    changed = {k for k in AugmentConfig.model_fields if getattr(other, k) != getattr(ALWAYS, k)}
    assert changed == set(AugmentConfig.STRONG_FIELDS)
    sample = _sample(np.random.default_rng(4))
    for preset, same in (("standard", True), ("strong", False)):
        a = build_augment(ALWAYS, 64, preset, seed=5)(sample)
        b = build_augment(other, 64, preset, seed=5)(sample)
        assert torch.equal(a["image"], b["image"]) is same, preset


def test_strong_cutout_writes_ignore() -> None:
    cfg = AugmentConfig(cutout_prob=1.0, jitter_prob=0, grayscale_prob=0, blur_prob=0)
    aug = build_augment(cfg, 64, "strong", seed=3)
    cut = aug.transforms[-2]
    for i in range(5):
        out = aug(_sample(np.random.default_rng(i)))
        ign = out["ignore"][0]
        assert ign.any() and not ign.all()
        y, x, h, w = cut.box
        assert ign[y : y + h, x : x + w].all() and int(ign.sum()) == h * w
        assert 0.02 * 64 * 64 * 0.5 <= h * w <= 0.4 * 64 * 64 + 1
    assert not build_augment(cfg, 64, "standard", seed=3)(_sample(np.random.default_rng(0)))[
        "ignore"
    ].any()


def test_augment_inputs_grey_small_and_ignore() -> None:
    rng = np.random.default_rng(2)
    lab = voronoi_cells(rng, (40, 50), 6, 3, 8).astype(np.uint16)
    img = rng.random((1, 40, 50)).astype(np.float32)
    ignore = np.zeros((1, 40, 50), np.float32)
    ignore[0, :10] = 1
    out = build_augment(AugmentConfig(), 64, "standard", seed=0)(
        {"image": img, "label": lab, "ignore": ignore}
    )
    assert out["image"].shape == (3, 64, 64)
    assert torch.equal(out["image"][0], out["image"][1])
    assert out["ignore"].sum() == 10 * 50  # spatial transforms carry the given ignore mask
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps transform errors
        build_augment(AugmentConfig(), 32)({"image": img, "label": lab.astype(np.float32)})
    assert isinstance(err.value.__cause__, TypeError)


def test_augment_config_validation() -> None:
    with pytest.raises(ValidationError):
        AugmentConfig(noise_prob=1.5)
    with pytest.raises(ValidationError):
        AugmentConfig(zoom_range=(1.5, 0.8))
    with pytest.raises(ValidationError):
        AugmentConfig(cutout_area=(0.1, 2.0))
    with pytest.raises(ValidationError):
        AugmentConfig(flip=0.5)
    assert AugmentConfig.model_validate({"zoom_range": [0.9, 1.1]}).zoom_range == (0.9, 1.1)


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------


def _loss_inputs(seed: int, b: int = 2, size: int = 48, pred_size: int | None = None):
    rng = np.random.default_rng(seed)
    labs = np.stack([voronoi_cells(rng, (size, size), 10, 3, 9) for _ in range(b)])
    targets = make_targets(torch.from_numpy(labs))
    g = torch.Generator().manual_seed(seed)
    p = pred_size or size
    pred = {
        NP_KEY: torch.randn(b, 2, p, p, generator=g, requires_grad=True),
        HV_KEY: torch.randn(b, 2, p, p, generator=g).clamp(-1.5, 1.5).requires_grad_(True),
    }
    return pred, targets


def _monai_loss(pred, targets, **kw) -> torch.Tensor:
    return HoVerNetLoss(**kw)(pred, {NP_KEY: targets["np_onehot"], HV_KEY: targets["hv"]})


@pytest.mark.parametrize("seed", range(3))
def test_loss_equals_monai(seed: int) -> None:
    pred, targets = _loss_inputs(seed)
    ours = HoVerLoss()(pred, targets)
    assert set(ours) == {"loss", "np_dice", "np_ce", "hv_mse", "hv_mse_grad"}
    ref = _monai_loss(pred, targets)
    torch.testing.assert_close(ours["loss"], ref, rtol=1e-5, atol=1e-5)
    # an all-zero ignore mask changes nothing; weights are MONAI's
    zero = torch.zeros(2, 1, 48, 48)
    torch.testing.assert_close(HoVerLoss()(pred, targets, zero)["loss"], ref, rtol=1e-5, atol=1e-5)
    w = {
        "lambda_hv_mse": 0.5,
        "lambda_hv_mse_grad": 3.0,
        "lambda_np_ce": 0.2,
        "lambda_np_dice": 2.0,
    }
    cfg = LossConfig(hv_mse=0.5, hv_mse_grad=3.0, np_ce=0.2, np_dice=2.0)
    torch.testing.assert_close(
        HoVerLoss(cfg)(pred, targets)["loss"], _monai_loss(pred, targets, **w), rtol=1e-5, atol=1e-5
    )
    t = ours
    total = t["np_dice"] + t["np_ce"] + 2.0 * t["hv_mse"] + t["hv_mse_grad"]
    torch.testing.assert_close(t["loss"], total)


def test_loss_center_crops_targets() -> None:
    pred, targets = _loss_inputs(4, size=64, pred_size=40)
    ours = HoVerLoss()(pred, targets, torch.zeros(2, 64, 64))
    cropped = {k: v[..., 12:52, 12:52] for k, v in targets.items()}
    torch.testing.assert_close(ours["loss"], _monai_loss(pred, cropped), rtol=1e-5, atol=1e-5)


def test_loss_ignore_region_independent_of_predictions() -> None:
    pred, targets = _loss_inputs(6)
    ignore = torch.zeros(2, 1, 48, 48)
    ignore[0, :, 10:30, 5:25] = 1
    ignore[1, :, 30:, 30:] = 1
    loss_fn = HoVerLoss()
    base = loss_fn(pred, targets, ignore)
    base["loss"].backward()
    inside = ignore.bool().expand(-1, 2, -1, -1)
    for key in (NP_KEY, HV_KEY):
        grad = pred[key].grad
        assert torch.isfinite(grad).all()
        assert not grad[inside].any()  # no gradient flows into the ignored region
        assert grad[~inside].abs().sum() > 0
    changed = {k: v.detach().clone() for k, v in pred.items()}
    noise = torch.randn(2, 2, 48, 48, generator=torch.Generator().manual_seed(1)) * 5
    for key in changed:
        changed[key][inside] += noise[inside]
    other = loss_fn(changed, targets, ignore)
    for term, value in base.items():
        torch.testing.assert_close(other[term], value.detach(), rtol=0, atol=0)
    # but the region does matter without the mask
    assert not torch.allclose(loss_fn(changed, targets)["loss"], loss_fn(pred, targets)["loss"])


def test_loss_finite_for_background_and_all_ignored() -> None:
    zeros = make_targets(torch.zeros(2, 32, 32, dtype=torch.int32))
    pred = {NP_KEY: torch.randn(2, 2, 32, 32), HV_KEY: torch.randn(2, 2, 32, 32)}
    for ignore in (None, torch.ones(2, 1, 32, 32)):
        out = HoVerLoss()(pred, zeros, ignore)
        assert all(torch.isfinite(v) for v in out.values())
    out = HoVerLoss()(pred, zeros, torch.ones(2, 1, 32, 32))
    assert float(out["loss"]) == 0.0
    assert float(HoVerLoss()(pred, zeros)["hv_mse_grad"]) == 0.0


def test_stream_batch_from_read_only_arrays_warns_nothing():
    """Ray Data hands the training loop read-only arrays; turning them into tensors must not
    print torch's "not writable" warning into every training's output. In a fresh
    interpreter: torch warns only once per process, so an earlier test could hide it."""
    import subprocess
    import sys

    code = """
import warnings
import numpy as np
from cellst.train.step import Batch
batch = {
    "image": np.zeros((2, 3, 8, 8), np.float32),
    "hv": np.zeros((2, 2, 8, 8), np.float32),
    "fg": np.ones((2, 8, 8), np.uint8),
    "ignore": np.zeros((2, 8, 8), np.uint8),
}
for v in batch.values():
    v.flags.writeable = False
with warnings.catch_warnings(record=True) as caught:
    out = Batch.from_numpy(batch)
assert out.targets["np_onehot"].shape == (2, 2, 8, 8)
assert float(out.targets["np_onehot"][:, 1].mean()) == 1.0
print("WARNINGS", sum("not writable" in str(w.message) for w in caught))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "WARNINGS 0" in res.stdout, res.stdout + res.stderr[-2000:]
