"""Pseudo-label sets (``cellst.data.pseudo``): atomic items, resume, statistics, combining."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
import zarr

from cellst.data.arrays import write_array
from cellst.data.pseudo import PseudoLabelSet, pseudo_set_names
from cellst.data.store import StoreError
from conftest import held_in_another_process


def _label(value: int, shape=(12, 10)) -> np.ndarray:
    out = np.zeros(shape, np.int32)
    out[2:6, 3:7] = value
    return out


def test_items_are_written_once_and_read_back(tmp_path):
    s = PseudoLabelSet(tmp_path, "round1")
    assert not s.exists() and s.done_items() == [] and s.info() == {}
    s.create({"checkpoint": "/ckpt", "model_id": "m1"})
    assert s.exists() and s.info() == {"checkpoint": "/ckpt", "model_id": "m1"}
    assert s.write_item("a", _label(1), {"id": "a", "n_instances": 1})
    # a second writer of the same item (a retried task) writes nothing
    assert not s.write_item("a", _label(5), {"id": "a", "n_instances": 5})
    assert np.array_equal(s.label("a"), _label(1))
    assert s.label("a", (2, 4, 3, 5)).shape == (2, 2)
    assert zarr.open_array(str(s.item_path("a")), mode="r").attrs["n_instances"] == 1
    assert s.write_item("b", _label(2), {"id": "b", "n_instances": 1})
    assert s.done_items() == ["a", "b"] and s.has_item("b") and not s.has_item("c")
    assert not list(s.path.glob(".tmp-*"))  # nothing half-written left behind
    with pytest.raises(StoreError, match="has no item 'c'"):
        s.label("c")
    with pytest.raises(StoreError, match="'round1' of store .* is incomplete: .* after 2 item"):
        s.stats()  # not collected yet: the run writing it has not finished
    with pytest.raises(StoreError, match="has no pseudo-label set 'other'"):
        PseudoLabelSet(tmp_path, "other").stats()
    stats = s.collect_stats()
    assert stats["id"].tolist() == ["a", "b"]
    assert s.stats().equals(stats)
    assert pseudo_set_names(tmp_path) == ["round1"]


def test_interrupted_items_are_invisible_and_cleared(tmp_path):
    s = PseudoLabelSet(tmp_path, "p")
    s.create({})
    s.write_item("a", _label(1), {"id": "a"})
    write_array(s.path / ".tmp-b-1234abcd", _label(2))  # a writer killed mid-item
    assert s.done_items() == ["a"]
    s.clear_partial()
    assert sorted(p.name for p in s.path.iterdir()) == ["a", "set.json", "zarr.json"]


def test_unreadable_record_and_bad_names_are_store_errors(tmp_path):
    s = PseudoLabelSet(tmp_path, "p")
    s.create({})
    (s.path / "set.json").write_text('{"checkpoint": ')
    with pytest.raises(StoreError, match="set.json is not readable JSON"):
        s.info()
    for bad in ("", "a/b", ".hidden"):
        with pytest.raises(StoreError, match="not a pseudo-label set name"):
            PseudoLabelSet(tmp_path, bad)


def test_combine_is_a_union_swapped_into_place(tmp_path):
    first, second = PseudoLabelSet(tmp_path, "reliable"), PseudoLabelSet(tmp_path, "rest")
    for s, items in ((first, {"a": 1, "b": 2}), (second, {"b": 9, "c": 3})):
        s.create({})
        for item, v in items.items():
            s.write_item(item, _label(v), {"id": item, "v": v})
    # left by an interrupted earlier combine: removed, never listed as a set
    (tmp_path / "pseudo" / ".all.deadbeef.staging").mkdir()
    (tmp_path / "pseudo" / ".tmp-all-0123abcd").mkdir()
    assert pseudo_set_names(tmp_path) == ["reliable", "rest"]
    out = PseudoLabelSet.combine(tmp_path, ["reliable", "rest"], "all", {"stage": 5})
    assert out.done_items() == ["a", "b", "c"]
    assert np.array_equal(out.label("b"), _label(2))  # the first source wins
    assert sorted(out.stats()["v"]) == [1, 2, 3]
    assert json.loads((out.path / "set.json").read_text()) == {
        "stage": 5,
        "sources": ["reliable", "rest"],
    }
    assert pseudo_set_names(tmp_path) == ["all", "reliable", "rest"]
    assert sorted(p.name for p in (tmp_path / "pseudo").iterdir()) == [
        ".all.lock",  # its writer's lock (PseudoLabelSet.writing), kept for the next
        "all",
        "reliable",
        "rest",
        "zarr.json",
    ]
    # combining again replaces the whole set (an item gone from the sources goes too)
    second.remove()
    assert not second.exists()
    again = PseudoLabelSet.combine(tmp_path, ["reliable"], "all", {"stage": 5})
    assert again.done_items() == ["a", "b"] and again.stats()["id"].tolist() == ["a", "b"]


def test_store_reads_sets_through_the_same_owner(tmp_path, store_dir):
    """``CellStore``'s pseudo-label methods are this module's, on a real store."""
    import shutil

    from cellst.data.store import CellStore

    root = tmp_path / "store"
    shutil.copytree(store_dir, root)
    store = CellStore(root)
    item = store.ids("unlabeled")[0]
    h, w = int(store.row(item).height), int(store.row(item).width)
    s = store.pseudo_set("p")
    s.create({"model_id": "m"})
    s.write_item(item, _label(4, (h, w)), {"id": item})
    s.collect_stats()
    assert store.pseudo_sets() == ["p"] and store.pseudo_set_info("p") == {"model_id": "m"}
    assert store.pseudo_path("p", item) == s.item_path(item)
    assert np.array_equal(store.pseudo_label("p", item), _label(4, (h, w)))
    assert store.pseudo_items("p")["id"].tolist() == [item]

    # a plain zarr reader walking the hierarchy from the root finds every array
    found = dict(zarr.open_group(str(root), mode="r").members(max_depth=None))
    manifest = store.manifest
    arrays = (set(manifest["image_array"]) | set(manifest["label_array"])) - {""}
    assert arrays | {f"pseudo/p/{item}"} <= set(found)
    assert all(isinstance(found[a], zarr.Array) for a in arrays)
    assert np.array_equal(found[f"pseudo/p/{item}"][...], _label(4, (h, w)))

    # a store of an earlier cellst (no group metadata below the root) gets it at its next
    # ingest, which starts with init_store; the root's format marker is kept
    from cellst.data.store import init_store

    (root / "images" / "zarr.json").unlink()
    init_store(root)
    assert (root / "images" / "zarr.json").is_file()
    assert zarr.open_group(str(root), mode="r").attrs["format"] == "cellst-store/1"


def test_a_run_whose_set_was_claimed_by_a_newer_run_writes_nothing(tmp_path):
    """The tasks of a `cellst predict` whose driver was killed may still run while a new
    run takes the set over: once the new run claims the set, their items are refused, mask
    and label alike, and nothing of theirs is left."""
    from cellst.data.pseudo import IGNORE_DIR
    from cellst.fs import WriterReplaced

    s = PseudoLabelSet(tmp_path, "p")
    s.claim("old")
    s.create({})
    mask = np.ones((12, 10), bool)
    assert s.write_item("a", _label(1), {"id": "a"}, ignore=mask, run_id="old")
    s.claim("new")  # a new run, after the old one's driver died
    for ignore in (mask, None):
        with pytest.raises(WriterReplaced, match="now written by run new, not by this run"):
            s.write_item("b", _label(2), {"id": "b"}, ignore=ignore, run_id="old")
    assert s.done_items() == ["a"] and not s.has_ignore("b")
    assert not [*s.path.glob(".tmp-*"), *(s.path / IGNORE_DIR).glob(".tmp-*")]
    assert s.write_item("b", _label(2), {"id": "b"}, run_id="new")
    assert s.done_items() == ["a", "b"] and pseudo_set_names(tmp_path) == ["p"]
    never = PseudoLabelSet(tmp_path, "q")
    never.create({})
    with pytest.raises(WriterReplaced, match="by run \\(none\\)"):
        never.write_item("a", _label(1), {}, run_id="old")
    assert never.done_items() == []


def test_prepare_claims_first_then_creates_resumes_takes_over_or_replaces(tmp_path):
    """The one way a writer gets a set ready: claimed before anything else (an earlier
    run's late write is refused), then created, resumed by its writer (half-written items
    cleared), taken over when ``resumable`` says so, replaced with ``overwrite``; a refusal
    of ``resumable`` leaves the set as it was."""
    from cellst.fs import WriterReplaced

    s = PseudoLabelSet(tmp_path, "p")
    mine = lambda info, items: info.get("model") == "m1"  # noqa: E731
    assert s.prepare({"model": "m1"}, run_id="r1", resumable=mine) is False  # created
    assert s.info() == {"model": "m1"} and s.write_item("a", _label(1), {}, run_id="r1")
    (s.path / ".tmp-half").mkdir()  # an item the first run never finished
    assert s.prepare({"model": "m1", "new": 1}, run_id="r2", resumable=mine) is True
    assert s.info() == {"model": "m1"} and s.done_items() == ["a"]  # resumed, record kept
    assert not list(s.path.glob(".tmp-*"))
    with pytest.raises(WriterReplaced):  # r1's tasks, still running, write nothing now
        s.write_item("b", _label(2), {}, run_id="r1")

    def refuse(info, items):
        raise StoreError(f"{len(items)} item(s) of another model")

    with pytest.raises(StoreError, match="1 item"):
        s.prepare({"model": "m2"}, run_id="r3", resumable=refuse)
    assert s.info() == {"model": "m1"} and s.done_items() == ["a"]
    # not resumable but not refused (say, a set of no item): taken over, record replaced
    assert s.prepare({"model": "m2"}, run_id="r4", resumable=lambda i, d: False) is False
    assert s.info() == {"model": "m2"} and s.done_items() == ["a"]
    assert s.prepare({"model": "m3"}, run_id="r5", overwrite=True, resumable=refuse) is False
    assert s.info() == {"model": "m3"} and s.done_items() == []  # replaced, not asked
    assert s.write_item("c", _label(3), {}, run_id="r5") and s.done_items() == ["c"]


def test_ignore_masks_are_written_before_the_item_and_follow_it(tmp_path):
    """An item's optional ignore mask: written with it, read back, carried by combine,
    half-written ones cleared, never listed as an item."""
    from cellst.data.pseudo import IGNORE_DIR

    s = PseudoLabelSet(tmp_path, "p")
    s.create({})
    ignore = np.zeros((12, 10), bool)
    ignore[2, 3:5] = True
    assert s.write_item("a", _label(1), {"id": "a"}, ignore=ignore)
    assert s.write_item("b", _label(2), {"id": "b"})  # no mask
    assert s.done_items() == ["a", "b"]  # the mask folder is not an item
    assert s.has_ignore("a") and not s.has_ignore("b") and s.ignore_mask("b") is None
    got = s.ignore_mask("a")
    assert got.dtype == np.uint8 and np.array_equal(got, ignore.astype(np.uint8))
    assert np.array_equal(s.ignore_mask("a", (2, 3, 0, 10)), ignore[2:3].astype(np.uint8))
    with pytest.raises(ValueError, match="not shaped like the label"):
        s.write_item("c", _label(3), {"id": "c"}, ignore=np.zeros((3, 3), bool))
    assert not s.has_item("c")
    write_array(s.path / IGNORE_DIR / ".tmp-d-1234abcd", _label(0))  # killed mid-mask
    write_array(s.path / IGNORE_DIR / "e", _label(0))  # killed between mask and label
    s.clear_partial()
    assert sorted(p.name for p in (s.path / IGNORE_DIR).iterdir()) == ["a", "zarr.json"]
    out = PseudoLabelSet.combine(tmp_path, ["p"], "all", {})
    assert out.done_items() == ["a", "b"]
    assert np.array_equal(out.ignore_mask("a"), ignore.astype(np.uint8))
    assert not out.has_ignore("b")


def test_ignored_pixels_travel_inside_the_label_and_come_back():
    from cellst.data.pseudo import decode_ignored, encode_ignored

    label = np.array([[0, 1, 1], [0, 2, 7]], np.int32)
    ignore = np.array([[1, 1, 0], [0, 0, 1]], np.uint8)
    enc = encode_ignored(label, ignore)
    assert enc.dtype == np.int32
    assert ((enc < 0) == ignore.astype(bool)).all()  # background pixels can be ignored too
    lab, ign = decode_ignored(enc)
    assert np.array_equal(lab, label) and np.array_equal(ign, ignore)
    lab, ign = decode_ignored(label)  # a label with nothing ignored is left alone
    assert np.array_equal(lab, label) and not ign.any()


def test_augmenter_turns_encoded_pixels_into_the_loss_ignore_mask():
    """A stream crop with encoded ignored pixels: the batch's ignore mask is exactly those
    pixels (the spatial transforms move both alike) and the targets see the real label."""
    from cellst.data.pseudo import encode_ignored
    from cellst.model.augment import AugmentConfig
    from cellst.model.targets import make_targets
    from cellst.train.step import Augmenter

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    label = np.zeros((32, 32), np.int32)
    label[4:12, 4:12], label[16:28, 10:20] = 1, 2
    ignore = np.zeros((32, 32), np.uint8)
    ignore[4:12, 10:16] = 1  # the edge of cell 1 and background beside it
    quiet = AugmentConfig(flip_prob=0, rotate90_prob=0, zoom_prob=0, noise_prob=0)
    aug = Augmenter(quiet, 32, seed=0)
    for src in (0, 1):  # labelled crops are never encoded, but decoding is per crop anyway
        batch = aug({"image": image, "label": encode_ignored(label, ignore)[None], "source": [src]})
        got = batch.ignore[0, 0].numpy()
        if src == 0:
            assert np.array_equal(got, ignore.astype(np.float32))
        else:  # the strong preset's Cutout may add a region, never remove one
            assert (got[ignore == 1] == 1).all()
        want = make_targets(torch.from_numpy(label)[None])
        assert torch.equal(batch.targets["np_onehot"], want["np_onehot"])
        assert torch.allclose(batch.targets["hv"], want["hv"])
    plain = aug({"image": image, "label": label[None], "source": [0]})
    assert not plain.ignore.any()
    # a flip moves the mask and the label together
    flip = Augmenter(quiet.model_copy(update={"flip_prob": 1.0}), 32, seed=1)
    batch = flip({"image": image, "label": encode_ignored(label, ignore)[None], "source": [0]})
    got = batch.ignore[0, 0].numpy()
    axis = next(a for a in (0, 1) if np.array_equal(got, np.flip(ignore, a)))
    want = make_targets(torch.from_numpy(np.ascontiguousarray(np.flip(label, axis)))[None])
    assert torch.equal(batch.targets["np_onehot"], want["np_onehot"])


def test_a_removed_set_never_stays_half_deleted_under_its_name(tmp_path, monkeypatch):
    """Deleting in place left a half set, still listed and read, when interrupted. The set
    is renamed aside first; what an interrupted deletion left is removed the next time."""
    from cellst.fs import stale_siblings

    s = PseudoLabelSet(tmp_path, "p")
    s.create({})
    s.write_item("a", _label(1), {"id": "a"})
    s.collect_stats()
    left = tmp_path / "pseudo" / ".p.0123abcd.removing"  # a deletion killed midway
    left.mkdir()
    s.remove()
    assert not s.exists() and pseudo_set_names(tmp_path) == []
    assert not stale_siblings(s.path, ".removing") and not left.exists()
    s.remove()  # nothing there: nothing happens

    # a deletion interrupted midway (Ctrl-C inside the tree removal) leaves no set
    import shutil

    s.create({})
    s.write_item("b", _label(2), {"id": "b"})
    with monkeypatch.context() as m:

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        m.setattr(shutil, "rmtree", interrupted)
        with pytest.raises(KeyboardInterrupt):
            s.remove()
    assert not s.exists() and pseudo_set_names(tmp_path) == []
    assert len(stale_siblings(s.path, ".removing")) == 1  # what it left, hidden
    s.remove()
    assert not stale_siblings(s.path, ".removing")


def _holding(store, name: str, how: str) -> subprocess.Popen:
    """Another process holding set ``name``'s ``writing`` or ``reading`` lock until its
    stdin closes (a ``cellst predict`` writing it, a training streaming it)."""
    return held_in_another_process(
        "from cellst.data.pseudo import PseudoLabelSet",
        f"PseudoLabelSet({str(store)!r}, {name!r}).{how}()",
    )


def test_a_set_a_training_reads_is_neither_rewritten_nor_removed_meanwhile(tmp_path):
    """A training streaming a set held nothing, so another run could re-write the set
    (``cellst predict``, an ST++ stage) or remove it (``stpp run --overwrite``) under it:
    the training went on with another model's labels, or failed half-way. Now a training
    holds the set's read lock: writers and combines are refused in one line while it
    runs, other readers are not, and a training does not start on a set being written."""
    reliable = PseudoLabelSet(tmp_path, "reliable")
    reliable.create({})
    reliable.write_item("a", _label(1), {"id": "a"})
    reader = _holding(tmp_path, "reliable", "reading")
    try:
        with pytest.raises(StoreError, match="'reliable' .* being written or trained on"):
            with reliable.writing():
                reliable.remove()
        with pytest.raises(StoreError, match="being written or trained on"):
            PseudoLabelSet.combine(tmp_path, ["reliable"], "reliable", {})
        with reliable.reading():  # another training of the same set
            assert reliable.done_items() == ["a"]
    finally:
        reader.communicate("")
    assert reliable.done_items() == ["a"]
    with reliable.writing():  # the training ended: the set can be written again
        pass

    writer = _holding(tmp_path, "reliable", "writing")
    try:
        with pytest.raises(StoreError, match="'reliable' .* is being written by another run"):
            with reliable.reading():
                pass
    finally:
        writer.communicate("")
    missing = PseudoLabelSet(tmp_path / "nowhere", "x")
    with missing.reading():  # nothing to lock, and nothing made for it
        pass
    assert not (tmp_path / "nowhere").exists()
