"""Pseudo-label sets (``cellst.data.pseudo``): atomic items, resume, statistics, combining."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from cellst.data.pseudo import PseudoLabelSet, pseudo_set_names
from cellst.data.store import StoreError, write_array


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
    with pytest.raises(StoreError, match="no pseudo-label set 'round1'"):
        s.stats()  # not collected yet
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
    assert sorted(p.name for p in s.path.iterdir()) == ["a", "set.json"]


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
    assert sorted(p.name for p in (tmp_path / "pseudo").iterdir()) == ["all", "reliable", "rest"]
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
