"""Shipped configuration: cluster.yaml against Ray's launcher schema, experiment YAMLs load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_valid_for_the_ray_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    bad = copy.deepcopy(cfg)
    bad["bogus"] = 1
    with pytest.raises(Exception, match="bogus"):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize(
    "path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name
)
def test_experiment_configs_load(path):
    from cellst.config import load_config

    cfg = load_config(path)
    assert cfg.name
