"""Shared fixtures: one real local Ray instance per session, and real synthetic data on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster with 2 CPUs, shared by every test of the session."""
    import ray

    from cellst.raycluster import quiet_ray_data

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    quiet_ray_data()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_src(tmp_path_factory) -> Path:
    """A small synthetic dataset in the challenge layout (all four modalities)."""
    from cellst.data.synth import synthesize_dataset

    out = tmp_path_factory.mktemp("synth") / "src"
    synthesize_dataset(
        out,
        n_labeled=8,
        n_unlabeled=4,
        n_test=4,
        seed=7,
        min_size=160,
        max_size=320,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def store_dir(ray_session, synth_src, tmp_path_factory) -> Path:
    """``synth_src`` ingested into a store (read-only for tests: copy it to modify)."""
    from cellst.data.ingest import ingest

    out = tmp_path_factory.mktemp("store") / "store"
    ingest(synth_src, out, progress=False)
    return out


@pytest.fixture(scope="module")
def learn_store(ray_session, tmp_path_factory) -> Path:
    """Fluorescence and brightfield images that a tiny model learns within minutes of CPU
    training (one fresh store per test module: modules may add pseudo-label sets to it)."""
    from cellst.data.ingest import ingest
    from cellst.data.synth import synthesize_dataset

    root = tmp_path_factory.mktemp("learn")
    synthesize_dataset(
        root / "src",
        10,
        0,
        0,
        seed=11,
        min_size=192,
        max_size=256,
        modalities=("fluorescence", "brightfield"),
        progress=False,
    )
    ingest(root / "src", root / "store", progress=False)
    return root / "store"
