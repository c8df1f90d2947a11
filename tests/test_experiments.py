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
    # nothing listens on a public address: MLflow on the head's private address, the
    # dashboard / job server on loopback (reached through `ray dashboard`'s SSH tunnel)
    commands = " ".join(cfg["head_setup_commands"] + cfg["head_start_ray_commands"])
    assert "0.0.0.0" not in commands
    assert "--dashboard-host=127.0.0.1" in commands and "hostname -I" in commands
    bad = copy.deepcopy(cfg)
    bad["bogus"] = 1
    with pytest.raises(Exception, match="bogus"):
        validate_config(prepare_config(bad))


#: what only the machines decide: how to reach them, and what kinds of node there are
MACHINE_KEYS = {"cluster_name", "max_workers", "provider", "auth", "available_node_types",
                "head_node_type"}  # fmt: skip


def test_local_cluster_shares_everything_but_the_machines():
    """cluster-local.yaml (Ray's local provider, over SSH) is valid for the launcher and is
    cluster.yaml with other machines: commands, file mounts and upload filters are equal."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cloud = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    local = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(local)))
    assert local["provider"]["type"] == "local" and local["provider"]["head_ip"] == "127.0.0.1"
    shared = (set(cloud) | set(local)) - MACHINE_KEYS
    assert {"setup_commands", "head_start_ray_commands", "file_mounts", "rsync_filter"} <= shared
    for key in sorted(shared):
        assert cloud.get(key) == local.get(key), key
    # the upload leaves out what git ignores (.venv alone is gigabytes) and ships the token
    assert cloud["rsync_filter"] == [".gitignore"]
    assert cloud["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name
)
def test_experiment_configs_load(path):
    """Every key a shipped YAML sets reaches the loaded config with that value (nothing is
    dropped or renamed silently), and the resolved config reloads to the same thing."""
    from cellst.config import dump_config
    from cellst.experiment import load_config

    cfg = load_config(path)
    resolved = cfg.model_dump(mode="json")

    def leaves(d: dict, prefix: str = ""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    got = dict(leaves(resolved))
    for key, value in leaves(yaml.safe_load(path.read_text())):
        assert key in got, f"{path.name}: {key} is not a config field"
        assert got[key] == value or got[key] == pytest.approx(value), (key, got[key], value)
    again = load_config(None, []).model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
