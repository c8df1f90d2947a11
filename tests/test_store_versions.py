"""Consistent store reads: a reader keeps its manifest version through a re-ingest in
another process, old arrays are collected once no live reader holds them, and a read of
an array that is gone raises instead of returning zeros."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.segmentation import relabel_sequential

from cellst.data.arrays import open_array, write_array
from cellst.data.ingest import ingest
from cellst.data.store import MANIFESTS, CellStore, StoreError, read_leases

CELLST = str(Path(sys.executable).with_name("cellst"))


def _copy_src(synth_src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(synth_src, dst)
    return dst


def _edit_labels(src: Path) -> dict[str, np.ndarray]:
    """Drop the last cell of every training label; returns the new labels by item id."""
    new = {}
    for p in sorted((src / "labeled" / "labels").glob("*_label.tiff")):
        lab = tifffile.imread(p)
        lab[lab == lab.max()] = 0
        tifffile.imwrite(p, lab)
        new[p.name[: -len("_label.tiff")]] = relabel_sequential(lab)[0]
    return new


def _ray_env(ray_session) -> dict[str, str]:
    """Environment for a `cellst` subprocess that joins this session's Ray cluster."""
    address = ray_session.get_runtime_context().gcs_address
    return {**os.environ, "RAY_ADDRESS": address}


def test_reader_keeps_its_version_while_another_process_reingests(ray_session, synth_src, tmp_path):
    src = _copy_src(synth_src, tmp_path)
    root = tmp_path / "store"
    ingest(src, root, progress=False)

    reader = CellStore(root)
    v0 = reader.version
    ids = reader.ids("labeled")
    before = {i: reader.label(i) for i in ids}
    old_arrays = {i: reader.row(i).label_array for i in ids}
    assert all(lab.max() > 0 for lab in before.values())
    assert [x.version for x in read_leases(root)] == [v0]
    # an unchanged re-ingest keeps the version
    assert ingest(src, root, progress=False).version == v0 == CellStore(root).version

    new = _edit_labels(src)
    res = subprocess.run(
        [CELLST, "ingest", str(src), "--out", str(root)],
        env=_ray_env(ray_session),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(new)} updated" in res.stdout

    # the open reader still reads its own version: the old labels, not zeros
    assert reader.version == v0 and reader.current_version() != v0
    for i in ids:
        np.testing.assert_array_equal(reader.label(i), before[i])
        assert (root / old_arrays[i] / "zarr.json").is_file()

    # a reader in another process (a Ray task) gets the same version, with its own lease
    def read_in_task(store: CellStore, item_id: str) -> tuple[str, np.ndarray, bool, int]:
        """The unpickled store reopens its version with a lease of its own."""
        leased = store.lease_path is not None and store.lease_path.is_file()
        try:
            return store.version, store.label(item_id), leased, os.getpid()
        finally:
            store.close()

    version, label, leased, pid = ray_session.get(
        ray_session.remote(read_in_task).remote(reader, ids[0])
    )
    assert version == v0 and leased and pid != os.getpid()
    np.testing.assert_array_equal(label, before[ids[0]])

    # a fresh reader reads the new labels
    with CellStore(root) as fresh:
        assert fresh.version != v0
        for i in ids:
            got = fresh.label(i)
            np.testing.assert_array_equal(got, new[i])
            assert got.max() == before[i].max() - 1
        v1 = fresh.version

    # the reader closes: the next ingest collects the old version's arrays and manifest
    reader.close()
    assert read_leases(root) == []
    result = ingest(src, root, progress=False)
    assert result.version == v1
    assert sorted(result.collected["removed"]) == sorted(old_arrays.values())
    assert not any((root / a).exists() for a in old_arrays.values())
    assert sorted(p.stem for p in (root / MANIFESTS).glob("*.parquet")) == [v1]
    with pytest.raises(StoreError, match=f"no longer holds version {v0}"):
        CellStore(root, version=v0)


def test_lease_of_a_killed_reader_is_ignored(ray_session, synth_src, tmp_path):
    src = _copy_src(synth_src, tmp_path)
    root = tmp_path / "store"
    ingest(src, root, progress=False)
    old = CellStore(root, lease=False)
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys\n"
            "from cellst.data.store import CellStore\n"
            "s = CellStore(sys.argv[1])\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n",
            str(root),
        ],
    )
    assert killed.returncode == -signal.SIGKILL
    (lease,) = read_leases(root)  # left behind: the process could not remove it
    assert lease.version == old.version and not lease.alive()

    _edit_labels(src)
    result = ingest(src, root, progress=False)
    assert result.collected["stale_leases"] == 1 and not lease.path.exists()
    gone = [old.row(i).label_array for i in old.ids("labeled")]
    assert sorted(result.collected["removed"]) == sorted(gone)
    # the unleased reader's arrays are gone: its reads fail naming the item, never zeros
    item = old.ids("labeled")[0]
    with pytest.raises(StoreError, match=f"item '{item}': cannot read its label: .* missing"):
        old.label(item)


def test_reading_a_deleted_array_raises_naming_the_item(store_dir, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(store_dir, root, ignore=shutil.ignore_patterns(".readers"))
    store = CellStore(root)
    item = store.ids("labeled")[0]
    label = store.label(item)  # opens (and caches) the zarr handle
    assert label.max() > 0
    shutil.rmtree(root / store.row(item).label_array)  # removed behind the store's back
    with pytest.raises(StoreError, match=f"item '{item}': cannot read its label"):
        store.label(item)  # the cached handle: zarr alone would answer zeros
    open_array.cache_clear()
    with pytest.raises(StoreError, match=f"item '{item}': cannot read its label"):
        CellStore(root).label(item)  # a fresh handle
    ref = store.ref(item)
    with pytest.raises(StoreError, match="is missing"):
        open_array(ref.label)[:4, :4]  # what Ray Data read tasks call
    # an array whose all-background chunks were never written still reads them as zeros
    write_array(tmp_path / "sparse", np.zeros((64, 64), np.int32), chunk=32)
    assert not list((tmp_path / "sparse").glob("c/*"))
    assert open_array(str(tmp_path / "sparse"))[...].sum() == 0


def test_a_copied_lease_does_not_pin_the_copy(store_dir, tmp_path):
    with CellStore(store_dir) as reader:
        shutil.copytree(store_dir, tmp_path / "copy")
        assert reader.lease_path in [x.path for x in read_leases(store_dir) if x.alive()]
        copied = [
            x for x in read_leases(tmp_path / "copy") if x.path.name == reader.lease_path.name
        ]
        assert len(copied) == 1 and not copied[0].alive()
    assert reader.lease_path is None
    assert all(x.path.name != copied[0].path.name for x in read_leases(store_dir))


def test_a_broken_manifest_is_named_and_ingest_archives_nothing(store_dir, synth_src, tmp_path):
    """A truncated manifest.parquet: `cellst info` and `cellst ingest` name the file in
    one line; ingest refuses before it archives the broken bytes as a version."""
    from typer.testing import CliRunner

    from cellst.cli import app

    root = tmp_path / "store"
    shutil.copytree(store_dir, root)
    manifest = root / "manifest.parquet"
    manifest.write_bytes(manifest.read_bytes()[:100])
    archived = sorted(p.name for p in (root / "manifests").iterdir())
    runner = CliRunner()
    res = runner.invoke(app, ["info", str(root)])
    assert res.exit_code == 1, res.output
    assert res.output.strip().startswith(f"error: {manifest}: not a valid manifest (")
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["ingest", str(synth_src), "--out", str(root)])
    assert res.exit_code == 1, res.output
    assert f"{manifest}: not a valid manifest (" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in (root / "manifests").iterdir()) == archived
