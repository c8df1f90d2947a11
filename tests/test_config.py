"""Config loading: YAML + --set overrides, errors that name the field path."""

from __future__ import annotations

import pytest

from cellst.config import ConfigError, apply_overrides, dump_config, load_config
from cellst.experiment import ExperimentConfig


def test_defaults_and_overrides(tmp_path):
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("name: demo\ndata:\n  crop_size: 128\n")
    cfg = load_config(cfg_file, ["data.crops_per_visit=8", "ingest.high_percentile=99.5"])
    assert cfg.name == "demo"
    assert cfg.data.crop_size == 128
    assert cfg.data.crops_per_visit == 8
    assert cfg.ingest.high_percentile == 99.5
    # the dump is loadable and round-trips
    again = tmp_path / "resolved.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    "override, path",
    [
        (["data.crop_size=100"], "data.crop_size"),
        (["data.crop_size=abc"], "data.crop_size"),
        (["data.bogus=1"], "data.bogus"),
        (["evaluate.iou_threshold=0"], "evaluate.iou_threshold"),
        (["ingest.low_percentile=99.9"], "ingest"),
    ],
)
def test_errors_name_the_field(override, path):
    with pytest.raises(ConfigError) as exc:
        load_config(None, override)
    assert f"  {path}" in str(exc.value)


def test_unknown_section_and_bad_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="trian: unknown key"):
        load_config(f)
    f.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_override_syntax():
    assert apply_overrides({}, ["a.b=1", "a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["nonsense"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])
    assert isinstance(load_config(None, ["name=x"]), ExperimentConfig)
