"""The pseudo-label sets one ST++ pipeline owns, and when one must be written anew.

A pipeline writes its sets into the shared store under names of its prefix
(``P-reliable``, ``P-test-round2``, ...). Its ``pipeline.json`` records, per set, the key of
what produced it (model, inference and post-processing settings, items) and that key
without the items (its *base*). From those:

* a set of one of its names that another run wrote is *foreign*: refused unless
  ``--overwrite``, then removed (:meth:`OwnedSets.release`); a set it combines records
  its key in its own ``set.json`` (:meth:`OwnedSets.combine`);
* a set whose key changed is written anew, except that a set of the same base (the same
  model and settings, other items) keeps the items still asked for
  (:meth:`OwnedSets.renew`); a forced stage (``--force-from``) writes it anew whole.

The set files themselves are the data layer's (:class:`cellst.data.pseudo.PseudoLabelSet`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from cellst.data.pseudo import PseudoLabelSet, pseudo_set_names
from cellst.fingerprint import stable_hash
from cellst.stpp.stages import StageBook, read_meta, update_meta


class OwnedSets:
    """The pseudo-label sets of the pipeline in ``pipeline_dir`` (in the store at
    ``store_root``).

    ``book``: the pipeline's stage records; a set predicted by a checkpoint they name is
    the pipeline's own.
    """

    def __init__(
        self,
        pipeline_dir: str | Path,
        store_root: str | Path | None,
        book: StageBook,
    ):
        self.dir = Path(pipeline_dir)
        self.store_root = store_root  # (None until checked: run_stpp refuses it first)
        self.book = book

    @property
    def root(self) -> Path:
        """The store's folder, absolute."""
        return Path(str(self.store_root)).absolute()

    def checkpoints(self) -> set[str]:
        """Every path the pipeline's stage records name in their outputs (best checkpoints,
        snapshots)."""
        found: set[str] = set()

        def walk(value: Any) -> None:
            if isinstance(value, str):
                found.add(value)
            elif isinstance(value, dict):
                for v in value.values():
                    walk(v)
            elif isinstance(value, list):
                for v in value:
                    walk(v)

        for rec in self.book.records():
            walk(rec.outputs)
        return found

    def keys(self) -> dict[str, str]:
        """Each owned set's key, as ``pipeline.json`` records it."""
        return read_meta(self.dir).get("sets", {})

    def wrote(self, name: str, info: dict[str, Any]) -> bool:
        """Whether set ``name``'s record (``set.json``) says this pipeline wrote it: a set it
        combined holds the key this pipeline recorded for it, a set it predicted names a
        checkpoint of this pipeline's trainings. (Another pipeline that took the set over
        with --overwrite left its own there, while this pipeline's record still listed the
        set as its own.)"""
        if "key" in info and "pipeline" in info:
            return info["key"] == self.keys().get(name)
        if "checkpoint" in info:
            ckpt = str(Path(str(info["checkpoint"])).absolute())
            return Path(ckpt).is_relative_to(self.dir) or ckpt in self.checkpoints()
        return True  # a set of an earlier cellst that recorded neither

    def foreign(self, names: Iterable[str]) -> list[str]:
        """The sets of ``names`` present in the store that this pipeline did not write."""
        owned = self.keys()
        present = pseudo_set_names(self.root)
        return [
            s
            for s in names
            if s in present
            and (s not in owned or not self.wrote(s, PseudoLabelSet(self.root, s).info()))
        ]

    def release(self, names: list[str]) -> None:
        """Remove the (foreign) sets ``names`` and forget what this pipeline recorded of
        them. Refused in one line while a run writes one of them."""
        for s in names:
            replaced = PseudoLabelSet(self.root, s)
            with replaced.writing():
                replaced.remove()
        if names:
            owned = self.keys()
            update_meta(self.dir, sets={k: v for k, v in owned.items() if k not in names})

    def combine(self, sources: list[str], dest: str, key: str) -> pd.DataFrame:
        """Write set ``dest`` as the union of ``sources`` (hard-linked copies,
        :meth:`cellst.data.pseudo.PseudoLabelSet.combine`), recorded as this pipeline's
        under ``key`` both here and in its ``set.json`` (which :meth:`wrote` reads); its
        statistics."""
        update_meta(self.dir, sets={**self.keys(), dest: key})  # before writing it
        meta = {"pipeline": str(self.dir), "key": key}
        return PseudoLabelSet.combine(self.root, sources, dest, meta).stats()

    def renew(
        self,
        name: str,
        what: dict[str, Any],
        *,
        earlier: Iterable[str] = (),
        fresh: bool = False,
    ) -> str:
        """Make set ``name`` ready to be (re)written as ``what`` describes (the producer,
        checkpoint and settings; ``what["ids"]`` its items); the key it is recorded under.

        Unchanged (its recorded key is ``what``'s or one of the ``earlier`` keys, as an
        earlier cellst hashed it), it is kept as it is, to be resumed. Changed, it is
        emptied, except that the same model and settings over other items (an ingest
        added some, the reliable ones changed) keep the items still asked for.
        ``fresh`` (a forced stage) empties it whatever its key.
        """
        meta = read_meta(self.dir)
        sets, bases = meta.get("sets", {}), meta.get("set_bases", {})
        key = stable_hash(what)
        base = stable_hash({k: v for k, v in what.items() if k != "ids"})
        renewed = sets.get(name) not in {key, *earlier} or fresh
        if renewed:
            pset = PseudoLabelSet(self.root, name)
            with pset.writing():  # never under a training that reads it
                if not fresh and bases.get(name) == base and pset.exists():
                    wanted = set(what["ids"])
                    pset.remove_items([i for i in pset.done_items() if i not in wanted])
                else:
                    pset.remove()
            sets = {**sets, name: key}
        if renewed or bases.get(name) != base:
            update_meta(self.dir, sets=sets, set_bases={**bases, name: base})
        return sets[name]  # as recorded (a stage's outputs name it)
