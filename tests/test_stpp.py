"""ST++ pipeline: config checks, durable stage records, reliability scoring, early stop,
and a real end-to-end run on local Ray that is SIGKILLed during stage 4 and resumed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cellst.config import ConfigError
from cellst.data.store import CellStore, StoreError, atomic_write_parquet
from cellst.fingerprint import stable_hash
from cellst.stpp import STAGES, StageBook, load_stpp_config, run_stpp
from cellst.stpp.pipeline import Pipeline, StppStopped
from cellst.stpp.reliability import (
    agreement,
    item_reliability,
    n_reliable,
    score_items,
    split_reliable,
)
from conftest import kill_group_when

runner = CliRunner()

#: even smaller than --quick: the tests only check the plumbing, not the accuracy
TINY = [
    "data.crops_per_epoch=16",
    "train.val_max_items=1",
    "tracking.system_metrics=false",
    "stpp.ignore_band=0.1",  # the pseudo-label sets carry ignore masks into stages 4 and 6
    # the trainings and predictions run in the pipeline's own process (Ray Train's local
    # mode, no actor pool), which saves their workers' and actors' start-up (about 25 and
    # 5 s each on 2 CPUs); ST++ over Ray Train's workers and actor pools runs in
    # test_multinode.py, test_job_submit.py and test_ray_up.py
    "train.num_workers=0",
    "predict.num_actors=0",
]


def _write_config(path: Path, store: Path, run_dir: Path, **extra) -> Path:
    data = {"name": "t", "store": str(store), "stpp": {"run_dir": str(run_dir)}, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def _copy_store(store_dir: Path, dest: Path) -> Path:
    shutil.copytree(store_dir, dest)
    return dest


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("stpp.reliable_fraction=1.0", "stpp.reliable_fraction"),
        ("stpp.reliable_fraction=0", "stpp.reliable_fraction"),
        ("stpp.reliability=dice", "stpp.reliability"),
        ("train.epochs=1", "snapshot"),
        ("train.snapshot_fractions=[1.0]", "snapshot"),
        ("train.snapshot_fractions=[0.5]", "snapshot"),
        ("train.snapshot_fractions=[0.3, 1.5]", "train.snapshot_fractions"),
        ("train.pseudo_set=x", "train.pseudo_set"),
        ("stpp.set_prefix=a/b", "stpp.set_prefix"),
    ],
)
def test_config_errors(tmp_path, override, field):
    cfg = _write_config(tmp_path / "c.yaml", tmp_path / "store", tmp_path / "runs")
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("[", r"\[")):
        load_stpp_config(cfg, [override])


def test_cli_config_error_before_anything_runs(tmp_path):
    cfg = _write_config(tmp_path / "c.yaml", tmp_path / "store", tmp_path / "runs")
    res = runner.invoke(app(), ["stpp", str(cfg), "--set", "stpp.reliable_fraction=1.5"])
    assert res.exit_code == 2, res.output
    assert "stpp.reliable_fraction" in res.output
    res = runner.invoke(app(), ["stpp", str(cfg), "--quick", "--set", "train.epochs=1"])
    assert res.exit_code == 2 and "snapshot" in res.output
    # the sub-command form, and options before the config (both mean `stpp run`)
    for args in (
        ["stpp", "run", str(cfg)],
        ["stpp", "--quick", "--set", "train.epochs=1", str(cfg)],
    ):
        res = runner.invoke(app(), [*args, "--set", "stpp.reliable_fraction=1.5"])
        assert res.exit_code == 2 and "stpp.reliable_fraction" in res.output, res.output
    for option in ("--until", "--force-from"):  # an unknown stage, before the store is read
        res = runner.invoke(app(), ["stpp", "run", str(cfg), option, "8"])
        assert res.exit_code == 2 and f"{option}: unknown stage '8'" in res.output, res.output
    res = runner.invoke(app(), ["stpp", str(cfg)])  # the store does not exist
    assert res.exit_code == 1 and "not a cellst store" in res.output
    assert not (tmp_path / "runs").exists()


def test_quick_settings_are_overridable(tmp_path):
    cfg = _write_config(tmp_path / "c.yaml", tmp_path / "store", tmp_path / "runs")
    c = load_stpp_config(cfg, ["train.epochs=4"], quick=True)
    assert c.train.epochs == 4 and c.model.width == 8  # --set wins over --quick
    assert c.pipeline_dir == (tmp_path / "runs" / "t").absolute()
    assert c.set_prefix == "t"
    from cellst.experiment import ExperimentConfig

    assert type(c.base()) is ExperimentConfig  # what train() and predict() take


@pytest.mark.parametrize(
    "experiment",
    sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_quick_runs_with_every_shipped_experiment(experiment):
    """`cellst stpp run experiments/stpp.yaml --quick` was refused: its hovernet-fast
    `decoder_padding` clashed with --quick's hovernet-lite. --quick turns off what only the
    experiment's own model or GPUs take (and keeps the rest of the file)."""
    c = load_stpp_config(experiment, ["store=x"], quick=True)
    assert c.model.name == "hovernet-lite" and not c.model.decoder_padding
    assert not c.train.use_gpu and c.predict.num_gpus_per_actor == 0


def app():
    from cellst.cli import app as cli_app

    return cli_app


# ----------------------------------------------------------------------------- stage records
def test_stage_records_skip_resume_fresh(tmp_path):
    book = StageBook(tmp_path, ["a", "b", "c"])
    assert [r.status for r in book.records()] == ["pending"] * 3
    assert book.decide("a", "h1") == "fresh"
    book.start("a", "h1", fresh=True)
    assert book.get("a").status == "running"
    assert book.decide("a", "h1") == "resume"  # a crash left it running
    assert book.decide("a", "h2") == "fresh"  # ... but the inputs changed
    rec = book.finish("a", {"x": 1}, mlflow_run_id="r1")
    assert rec.status == "done" and rec.output_digest == stable_hash({"x": 1})
    assert book.decide("a", "h1") == "skip"
    assert book.decide("a", "h2") == "fresh"
    book.start("b", "hb", fresh=True)
    book.fail("b", "RuntimeError: boom")
    assert book.get("b").status == "failed" and "boom" in book.get("b").error
    assert book.decide("b", "hb") == "resume"
    # a resumed start keeps the MLflow run id; a fresh one drops it
    book.update("b", mlflow_run_id="rb")
    assert book.start("b", "hb", fresh=False).mlflow_run_id == "rb"
    assert book.start("b", "hb", fresh=True).mlflow_run_id is None
    assert book.get("b").attempts == 3
    # records are JSON files named <n>_<stage>.json, written atomically
    files = sorted(p.name for p in (tmp_path / "stages").iterdir())
    assert files == ["1_a.json", "2_b.json"]
    assert json.loads((tmp_path / "stages" / "1_a.json").read_text())["outputs"] == {"x": 1}


def test_force_from_invalidates_that_stage_and_later(tmp_path):
    book = StageBook(tmp_path, ["a", "b", "c"])
    for n in book.names:
        book.start(n, f"h{n}", fresh=True)
        book.finish(n, {"n": n})
    assert book.force_from("2") == ["b", "c"]
    assert book.get("a").status == "done" and book.decide("a", "ha") == "skip"
    for n in ("b", "c"):
        rec = book.get(n)
        assert rec.status == "pending" and rec.forced and rec.outputs == {"n": n}
        assert book.decide(n, f"h{n}") == "fresh"
    book.start("b", "hb", fresh=True)  # a crash now must not lose the request
    assert book.decide("b", "hb") == "fresh"
    book.finish("b", {"n": "b"})
    assert not book.get("b").forced and book.decide("b", "hb") == "skip"
    assert book.resolve(3) == book.resolve("c") == book.resolve("3_c") == "c"
    with pytest.raises(ValueError, match="unknown stage"):
        book.resolve("9")


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_stage_runner_skips_reruns_and_forces(tmp_path):
    """The real runner with a stand-in body: skip when done, rerun when inputs change."""
    cfg = load_stpp_config(
        _write_config(tmp_path / "c.yaml", tmp_path / "store", tmp_path / "runs"),
        ["tracking.enabled=false"],
    )
    calls: list[str] = []

    def body(decision: str) -> dict:
        calls.append(decision)
        return {"value": len(calls)}

    def run(inputs, force_from=None, recorded_as=None):
        pipe = Pipeline(cfg, log=lambda _: None)
        if force_from:
            pipe.book.force_from(force_from)
        return pipe.stage("reliability", inputs, body, recorded_as=recorded_as)

    assert run({"a": 1}).outputs == {"value": 1}
    assert run({"a": 1}).outputs == {"value": 1} and calls == ["fresh"]  # skipped
    assert run({"a": 2}).outputs == {"value": 2} and calls == ["fresh", "fresh"]
    run({"a": 2}, force_from="reliability")
    assert calls == ["fresh"] * 3
    pipe = Pipeline(cfg, log=lambda _: None)  # done, but its outputs were deleted
    pipe.stage("reliability", {"a": 2}, body, present=lambda outputs: False)
    assert calls == ["fresh"] * 4
    pipe.stage("reliability", {"a": 2}, body, present=lambda outputs: True)
    assert calls == ["fresh"] * 4

    def crash(decision: str) -> dict:
        calls.append(decision)
        raise KeyboardInterrupt

    pipe = Pipeline(cfg, log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        pipe.stage("reliability", {"a": 3}, crash)
    assert pipe.book.get("reliability").status == "interrupted"  # as run.json says (Ctrl-C)
    assert pipe.book.get("reliability").error == "interrupted (Ctrl-C)"
    from cellst.raycluster import Terminated

    def terminated(decision: str) -> dict:  # SIGTERM, once cellst has joined Ray
        calls.append(decision)
        raise Terminated

    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg, log=lambda _: None).stage("reliability", {"a": 3}, terminated)
    assert pipe.book.get("reliability").status == "interrupted"
    assert pipe.book.get("reliability").error == "interrupted (SIGTERM)"
    run({"a": 3})
    assert calls[-1] == "resume" and Pipeline(cfg).book.get("reliability").status == "done"

    # a stage recorded by an earlier cellst's fingerprint recipe: the same inputs, skipped
    # (and recorded anew); inputs that differ under both recipes run
    n = len(calls)
    assert run({"a": 4}, recorded_as=[{"a": 3}]) is not None and len(calls) == n
    assert Pipeline(cfg).book.get("reliability").input_hash == stable_hash({"a": 4})
    run({"a": 5}, recorded_as=[{"a": 3}])
    assert calls[n:] == ["fresh"]


def test_owned_sets_keep_resume_or_renew_a_set_by_its_key(tmp_path):
    """What a pipeline's set becomes before it is predicted: kept whole when its key is the
    recorded one (or one an earlier cellst recorded), trimmed to the items still asked for
    when only the items changed, emptied when the model changed or the stage is forced; and
    a set of its names that it did not write is foreign until released."""
    from cellst.data.pseudo import PseudoLabelSet
    from cellst.stpp.owned_sets import OwnedSets

    store_root, pipe_dir = tmp_path / "store", tmp_path / "pipe"
    pipe_dir.mkdir()
    sets = OwnedSets(pipe_dir, store_root, StageBook(pipe_dir, STAGES))
    pset = PseudoLabelSet(store_root, "P-reliable")

    def fill(ids):
        pset.create({"checkpoint": str(pipe_dir / "train" / "best")})
        for i in ids:
            pset.write_item(i, np.ones((4, 4), np.int32), {"id": i})

    what = {"producer": "s1", "checkpoint": "ck", "ids": ["a", "b", "c"]}
    key = sets.renew("P-reliable", what)
    assert key == stable_hash(what) and sets.keys() == {"P-reliable": key}
    fill(["a", "b"])  # an interrupted stage wrote two items
    assert sets.renew("P-reliable", what) == key
    assert pset.done_items() == ["a", "b"]  # unchanged: resumed, nothing removed
    # recorded under an earlier cellst's key: still this set, and its record kept
    (pipe_dir / "pipeline.json").write_text(json.dumps({"sets": {"P-reliable": "old"}}))
    assert sets.renew("P-reliable", what, earlier=["old"]) == "old"
    assert pset.done_items() == ["a", "b"]
    sets.renew("P-reliable", what)  # (a new key: emptied, no base recorded)
    fill(["a", "b"])
    # the same model over other items: the items still asked for are kept
    other = {**what, "ids": ["b", "c", "d"]}
    assert sets.renew("P-reliable", other) == stable_hash(other)
    assert pset.done_items() == ["b"]
    # another model: emptied; so is a forced stage's set whatever its key
    fill(["c"])
    moved = {**other, "checkpoint": "ck2"}
    sets.renew("P-reliable", moved)
    assert not pset.exists() or pset.done_items() == []
    fill(["b"])
    sets.renew("P-reliable", moved, fresh=True)
    assert not pset.exists() or pset.done_items() == []

    # ownership: a set predicted by a checkpoint inside the pipeline folder is its own; one
    # by a checkpoint elsewhere (another pipeline took the name over) is foreign
    fill(["b"])
    assert sets.foreign(["P-reliable", "P-all"]) == []
    pset.remove()
    pset.create({"checkpoint": str(tmp_path / "elsewhere" / "best")})
    assert sets.foreign(["P-reliable", "P-all"]) == ["P-reliable"]
    sets.release(["P-reliable"])
    assert not pset.exists() and "P-reliable" not in sets.keys()
    # a combined set is its own by the key it records; another pipeline's key makes it foreign
    fill(["a", "b"])
    assert sets.combine(["P-reliable"], "P-all", "k1")["id"].tolist() == ["a", "b"]
    assert sets.keys()["P-all"] == "k1" and sets.foreign(["P-all"]) == []
    sets.combine(["P-reliable"], "P-all", "k2")
    (pipe_dir / "pipeline.json").write_text(json.dumps({"sets": {"P-all": "k1"}}))
    assert sets.foreign(["P-all"]) == ["P-all"]


# ----------------------------------------------------------------------------- reliability
def _blobs(shape, centres, r=6):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, 1):
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return out


def _write_set(store: CellStore, name: str, maps: dict[str, np.ndarray]) -> None:
    pset = store.pseudo_set(name)
    pset.create({"checkpoint": "hand-made"})
    for item, label in maps.items():
        assert pset.write_item(item, label, {"id": item})
    pset.collect_stats()


def test_agreement_measures():
    a = _blobs((64, 64), [(16, 16), (40, 40)])
    empty = np.zeros_like(a)
    for m in ("instance_f1", "mask_iou"):
        assert agreement(a, a, m) == 1.0
        assert agreement(empty, empty, m) == 1.0
        assert agreement(a, empty, m) == 0.0
    one = _blobs((64, 64), [(16, 16)])
    assert agreement(one, a, "instance_f1") == pytest.approx(2 / 3)  # P 1, R 1/2
    assert agreement(one, a, "mask_iou") == pytest.approx(0.5, abs=0.01)
    # relabelling does not matter
    assert agreement(np.where(a > 0, 3 - a, 0), a, "instance_f1") == 1.0
    assert item_reliability([one, a, a]) == [pytest.approx(2 / 3), 1.0]
    with pytest.raises(ValueError):
        agreement(a, a, "dice")


@pytest.fixture
def scored_store(store_dir, tmp_path) -> CellStore:
    """A copy of the session store with three hand-made 'snapshot' sets for 4 items."""
    store = CellStore(_copy_store(store_dir, tmp_path / "store"))
    ids = store.ids("unlabeled")
    assert len(ids) == 4
    shapes = {i: (int(store.row(i).height), int(store.row(i).width)) for i in ids}
    cells = [(30, 30), (30, 80), (80, 30), (80, 80)]
    final = {i: _blobs(shapes[i], cells) for i in ids}
    s1, s2 = dict(final), dict(final)
    a, b, c, d = ids
    # a: identical in every snapshot -> 1; b: one snapshot lost half the cells -> (1/2*... )
    s1[b] = _blobs(shapes[b], cells[:2])  # F1 vs final 2/3; s2 identical -> mean 5/6
    s1[c] = _blobs(shapes[c], cells[:2])
    s2[c] = _blobs(shapes[c], cells[:2])  # mean 2/3
    s1[d] = np.zeros(shapes[d], np.int32)
    s2[d] = _blobs(shapes[d], cells[:1])  # 0 and 2/5 -> mean 1/5
    for name, maps in (("snap1", s1), ("snap2", s2), ("snap3", final)):
        _write_set(store, name, maps)
    return store


def test_reliability_scores_rank_and_split(scored_store):
    a, b, c, d = scored_store.ids("unlabeled")
    sets = ["snap1", "snap2", "snap3"]
    scores = score_items(scored_store, sets)
    assert scores["id"].tolist() == [a, b, c, d]
    assert scores["score"].tolist() == pytest.approx([1.0, 5 / 6, 2 / 3, 1 / 5])
    assert scores["rank"].tolist() == [1, 2, 3, 4]
    assert {"agree_snap1", "agree_snap2", "modality", "n_instances_final"} <= set(scores.columns)
    reliable, unreliable, cutoff = split_reliable(scores, 0.5)
    assert reliable == [a, b] and unreliable == [c, d] and cutoff == pytest.approx(5 / 6)
    assert len(split_reliable(scores, 0.25)[0]) == 1
    assert len(split_reliable(scores, 0.9)[1]) == 1  # never all reliable
    # identical snapshots: every item scores 1 under both measures
    same = score_items(scored_store, ["snap3", "snap3", "snap3"], measure="mask_iou")
    assert (same["score"] == 1.0).all()
    masks = score_items(scored_store, sets, measure="mask_iou")
    assert masks["id"].iloc[0] == a and masks["id"].iloc[-1] == d
    with pytest.raises(StoreError, match="lacks items"):
        score_items(scored_store, sets, ids=[*scored_store.ids("unlabeled"), "cell_00001"])


def test_split_by_modality_keeps_the_top_of_every_modality():
    """One ranking can leave a modality whose agreement is low on every image out of the
    reliable set; split by modality, the top fraction of each is reliable."""
    scores = pd.DataFrame(
        {
            "id": ["b1", "b2", "b3", "b4", "f1", "f2", "f3", "f4"],
            "modality": ["brightfield"] * 4 + ["fluorescence"] * 4,
            "score": [0.99, 0.97, 0.95, 0.93, 0.6, 0.4, 0.3, 0.2],
        }
    )
    reliable, unreliable, cutoff = split_reliable(scores, 0.5)
    assert reliable == ["b1", "b2", "b3", "b4"] and cutoff == pytest.approx(0.93)
    reliable, unreliable, cutoff = split_reliable(scores, 0.5, by="modality")
    assert reliable == ["b1", "b2", "f1", "f2"]  # most reliable first, over all items
    assert unreliable == ["b3", "b4", "f3", "f4"]
    assert cutoff == pytest.approx(0.4)
    # each group keeps floor(fraction * n): a lone item goes to the second round, and
    # where no group reaches one reliable item, the most reliable item overall is
    lone = pd.concat([scores, pd.DataFrame({"id": ["d1"], "modality": ["dic"], "score": [0.1]})])
    reliable, unreliable, _ = split_reliable(lone, 0.25, by="modality")
    assert reliable == ["b1", "f1"] and unreliable[-1] == "d1"
    reliable, unreliable, _ = split_reliable(scores.iloc[[1, 5]], 0.5, by="modality")
    assert reliable == ["b2"] and unreliable == ["f2"]
    with pytest.raises(ValueError, match="no column 'site'"):
        split_reliable(scores, 0.5, by="site")
    for by in (None, "modality"):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\), got 1.0"):
            split_reliable(scores, 1.0, by=by)


def test_reliability_on_ray_matches_local(ray_session, scored_store):
    sets = ["snap1", "snap2", "snap3"]
    local = score_items(scored_store, sets)
    remote = score_items(scored_store, sets, use_ray=True, items_per_task=1)
    pd.testing.assert_frame_equal(local, remote)


def test_retrain_stages_keep_the_labelled_crops_per_epoch(tmp_path):
    from cellst.stpp.schedule import retrain_crops

    assert retrain_crops(256, 0.5) == 512 and retrain_crops(256, 0.0) == 256
    assert retrain_crops(100, 0.95) == 400 and retrain_crops(100, 1.0) == 100  # capped
    cfg = load_stpp_config(
        _write_config(tmp_path / "c.yaml", tmp_path / "store", tmp_path / "runs"),
        ["data.crops_per_epoch=64", "train.pseudo_weight=0.25"],
    )
    pipe = Pipeline(cfg)
    assert pipe.stage_train_config("supervised").data.crops_per_epoch == 64
    c4 = pipe.stage_train_config("retrain_reliable", "t-reliable", None)
    assert c4.data.crops_per_epoch == 86 and c4.train.pseudo_set == "t-reliable"
    assert c4.train.run_dir == str(cfg.pipeline_dir / "train")
    # what the stage runs and logs: ``stpp`` as configured (not reset to its defaults)
    assert c4.stpp == cfg.stpp and c4.stpp.run_dir == str(tmp_path / "runs")
    cfg.stpp.scale_retrain_crops = False
    assert Pipeline(cfg).stage_train_config("retrain_all", "t-all").data.crops_per_epoch == 64


@pytest.mark.parametrize(
    ("option", "field", "base", "value", "bad"),
    [("retrain_lr", "lr", 0.003, 0.001, 0), ("retrain_ema_decay", "ema_decay", 0.9, 0.99, 1)],
)
def test_retrain_options_set_the_retraining_stages_alone(tmp_path, option, field, base, value, bad):
    """stpp.retrain_lr / stpp.retrain_ema_decay: train.* of stages 4 and 6 alone (default:
    train.*), so stage 1 keeps its fingerprint and is not re-run."""
    from cellst.stpp.inputs import training_hash

    path = _write_config(tmp_path / "c.yaml", tmp_path / "store", tmp_path / "runs")
    same = Pipeline(load_stpp_config(path, [f"train.{field}={base}"]))
    assert getattr(same.stage_train_config("retrain_all", "t-all").train, field) == base
    changed = Pipeline(load_stpp_config(path, [f"train.{field}={base}", f"stpp.{option}={value}"]))
    assert getattr(changed.stage_train_config("retrain_reliable", "t-rel").train, field) == value
    assert getattr(changed.stage_train_config("retrain_all", "t-all").train, field) == value
    s1_changed, s1 = changed.stage_train_config("supervised"), same.stage_train_config("supervised")
    assert getattr(s1_changed.train, field) == base
    for v in (2, 3, 4):  # stage 1 is not re-run (the stpp section is no training input)
        assert training_hash(s1_changed, version=v) == training_hash(s1, version=v)
    with pytest.raises(ConfigError, match=rf"stpp\.{option}"):
        load_stpp_config(path, [f"stpp.{option}={bad}"])


@pytest.mark.parametrize(
    ("n", "fraction", "k"),
    [(1, 0.5, 1), (2, 0.5, 1), (4, 0.5, 2), (5, 0.5, 2), (7, 0.5, 3), (10, 0.3, 3), (4, 0.99, 3)],
)
def test_n_reliable(n, fraction, k):
    assert n_reliable(n, fraction) == k


# ----------------------------------------------------------------------------- bad input
def test_foreign_pseudo_set_is_refused(store_dir, tmp_path):
    store = CellStore(_copy_store(store_dir, tmp_path / "store"))
    item = store.ids("unlabeled")[0]
    _write_set(store, "t-reliable", {item: np.zeros((8, 8), np.int32)})
    cfg = load_stpp_config(
        _write_config(tmp_path / "c.yaml", store.root, tmp_path / "runs"), quick=True
    )
    with pytest.raises(StoreError, match=r"t-reliable.*--overwrite"):
        run_stpp(cfg)
    assert not (tmp_path / "runs" / "t" / "train").exists()  # nothing ran
    # --overwrite never removes a set another run is writing now (it did, unlocked)
    from cellst.data.pseudo import PseudoLabelSet

    with PseudoLabelSet(store.root, "t-reliable").writing():
        with pytest.raises(
            StoreError, match="'t-reliable' .* is being written or trained on by another run"
        ):
            Pipeline(cfg, overwrite=True).preflight()
    assert "t-reliable" in store.pseudo_sets()
    Pipeline(cfg, overwrite=True).preflight()  # accepted with --overwrite
    assert "t-reliable" not in store.pseudo_sets()


def test_store_without_unlabelled_items_stops_after_stage_1(crashed_and_resumed, tmp_path):
    """The module's pipeline, copied beside a copy of its store without unlabelled items:
    ST++ takes stage 1 over (same labelled items and configuration; nothing is trained) and
    stops after it, naming the cause; the later stages are reset to pending."""
    done = crashed_and_resumed["cfg"]
    root = _copy_store(Path(done.store), tmp_path / "store")
    manifest = pd.read_parquet(root / "manifest.parquet")
    atomic_write_parquet(manifest[manifest["split"] != "unlabeled"], root / "manifest.parquet")
    shutil.copytree(done.stpp.run_dir, tmp_path / "runs")
    cfg = done.model_copy(deep=True)
    cfg.store, cfg.stpp.run_dir, cfg.tracking.enabled = str(root), str(tmp_path / "runs"), False
    with pytest.raises(StppStopped, match=r"no unlabelled items.*stopped after stage 1"):
        run_stpp(cfg, log=lambda _: None)
    book = StageBook(cfg.pipeline_dir, STAGES)
    assert [r.status for r in book.records()] == ["done"] + ["pending"] * 6
    first = crashed_and_resumed["result"].record("supervised")
    assert book.get("supervised").finished_at == first.finished_at  # not trained again
    assert (Path(book.get("supervised").outputs["best"]) / "model.pt").is_file()


# ----------------------------------------------------------------------------- end to end
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "run_demo.py"


def _run_demo(out: Path, env: dict, **popen) -> subprocess.Popen:
    """``make demo``'s script at its ``--quick`` size (plus :data:`TINY`), in a subprocess."""
    cmd = [sys.executable, str(DEMO), "--quick", "--out", str(out)]
    for o in TINY:
        cmd += ["--set", o]
    return subprocess.Popen(cmd, env=env, cwd=out.parent, start_new_session=True, **popen)


@pytest.fixture(scope="module")
def crashed_and_resumed(ray_session, tmp_path_factory):
    """``make demo``'s script (``run_demo.py --quick``, so a broken demo fails CI too) in a
    subprocess, SIGKILLed during stage 4, then resumed here with the same configuration.

    One ST++ pipeline serves every end-to-end test of this module (it is the suite's most
    expensive fixture)."""
    tmp = tmp_path_factory.mktemp("stpp")
    out = tmp / "demo"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    env.pop("MLFLOW_TRACKING_URI", None)
    cfg = load_stpp_config(
        ROOT / "experiments" / "demo.yaml",
        [f"store={out / 'store'}", f"stpp.run_dir={out / 'stpp'}", *TINY],
        quick=True,
    )
    pipe_dir, prefix = cfg.pipeline_dir, cfg.set_prefix
    log = open(tmp / "first.log", "w")  # noqa: SIM115
    out.mkdir()
    proc = _run_demo(out, env, stdout=log, stderr=log)
    stage4 = pipe_dir / "stages" / "4_retrain_reliable.json"
    train4 = pipe_dir / "train" / f"{prefix}-4_retrain_reliable" / "rank0.pid"

    def stage4_training() -> bool:  # stage 4 runs, and its training workers are up
        running = stage4.is_file() and json.loads(stage4.read_text())["status"] == "running"
        return running and train4.is_file()

    killed = kill_group_when(proc, stage4_training, 600, poll=0.2)
    log.close()
    first_log = (tmp / "first.log").read_text()
    assert killed, f"the pipeline ended before stage 4 was seen running:\n{first_log[-3000:]}"
    book = StageBook(pipe_dir, STAGES)
    before = {r.name: r for r in book.records()}
    train_dirs = sorted(p.name for p in (pipe_dir / "train").iterdir())

    result = run_stpp(cfg)
    return {
        "result": result,
        "before": before,
        "train_dirs_before": train_dirs,
        "cfg": cfg,
        "prefix": prefix,
        "first_log": first_log,
        "out": out,
        "env": env,
    }


def test_crash_resume_does_not_recompute_stages_1_to_3(crashed_and_resumed):
    before, result = crashed_and_resumed["before"], crashed_and_resumed["result"]
    assert [before[n].status for n in STAGES[:3]] == ["done"] * 3
    assert before["retrain_reliable"].status == "running"
    assert result.skipped == list(STAGES[:3])
    assert result.ran == list(STAGES[3:])
    for name in STAGES[:3]:
        old, new = before[name], result.record(name)
        assert (new.started_at, new.finished_at) == (old.started_at, old.finished_at)
        assert new.mlflow_run_id == old.mlflow_run_id and new.mlflow_run_id
        assert new.attempts == 1 and new.input_hash == old.input_hash
    assert result.record("retrain_reliable").attempts == 2
    # stage 1 trained once: the training folders are the three stages', nothing new (and
    # no Ray Train storage: the trainings ran in the pipeline's process)
    root, p = result.pipeline_dir / "train", crashed_and_resumed["prefix"]
    assert f"{p}-1_supervised" in crashed_and_resumed["train_dirs_before"]
    assert sorted(x.name for x in root.iterdir() if x.name[0] != ".") == [  # (not locks)
        f"{p}-1_supervised",
        f"{p}-4_retrain_reliable",
        f"{p}-6_retrain_all",
    ]
    state = json.loads((root / f"{p}-1_supervised" / "run.json").read_text())
    assert state["mlflow_run_id"] == before["supervised"].mlflow_run_id


def test_every_stage_done_with_outputs(crashed_and_resumed):
    result = crashed_and_resumed["result"]
    assert [r.status for r in result.records] == ["done"] * len(STAGES)
    store = CellStore(crashed_and_resumed["cfg"].store)
    unlabelled = set(store.ids("unlabeled"))
    rel = result.record("reliability").outputs
    assert set(rel["reliable"]) | set(rel["unreliable"]) == unlabelled
    assert len(rel["reliable"]) == n_reliable(len(unlabelled), 0.5)
    assert not set(rel["reliable"]) & set(rel["unreliable"])
    sets, p = set(store.pseudo_sets()), crashed_and_resumed["prefix"]
    assert {f"{p}-snapshot_e001", f"{p}-snapshot_e002", f"{p}-snapshot_e003"} <= sets
    assert set(store.pseudo_items(f"{p}-reliable")["id"]) == set(rel["reliable"])
    assert set(store.pseudo_items(f"{p}-unreliable")["id"]) == set(rel["unreliable"])
    assert set(store.pseudo_items(f"{p}-all")["id"]) == unlabelled
    # stpp.ignore_band: the sets trained on carry ignore masks, the snapshots' sets do not
    for name in (f"{p}-reliable", f"{p}-unreliable", f"{p}-all"):
        pset = store.pseudo_set(name)
        assert all(pset.has_ignore(i) for i in pset.done_items()), name
        assert pset.stats()["ignored_fraction"].between(0, 1).all()
    assert not any(store.pseudo_set(f"{p}-snapshot_e001").has_ignore(i) for i in unlabelled)
    scores = pd.read_csv(result.pipeline_dir / "reliability" / "scores.csv")
    assert scores["score"].between(0, 1).all() and len(scores) == len(unlabelled)
    # the final report: supervised / round 1 / round 2, overall and per modality
    report = result.report
    assert report["model"].tolist() == ["supervised", "round1", "round2"]
    assert report["f1"].between(0, 1).all()
    mods = set(store.items(split="test")["modality"])
    assert {f"f1_{m}" for m in mods} <= set(report.columns)
    saved = json.loads((result.pipeline_dir / "report.json").read_text())
    assert [r["model"] for r in saved["f1"]] == ["supervised", "round1", "round2"]


def test_each_stage_records_the_keys_of_its_typed_output(crashed_and_resumed):
    """The ``TypedDict`` of each stage names exactly what the stage records (all keys of a
    total one; no key outside a partial one), so code reading a record can rely on it."""
    from cellst.stpp import outputs

    typed = {
        "supervised": outputs.TrainingOutput,
        "reliability": outputs.ReliabilityOutput,
        "pseudo_reliable": outputs.PseudoOutput,
        "retrain_reliable": outputs.TrainingOutput,
        "pseudo_unreliable": outputs.CombinedOutput,
        "retrain_all": outputs.TrainingOutput,
        "evaluate": outputs.EvaluationOutput,
    }
    assert list(typed) == list(STAGES)
    for rec in crashed_and_resumed["result"].records:
        kind, keys = typed[rec.name], set(rec.outputs)
        if kind.__total__:
            assert keys == set(kind.__annotations__), rec.name
        else:
            assert keys and keys <= set(kind.__annotations__), rec.name
    combined = crashed_and_resumed["result"].record("pseudo_unreliable").outputs
    assert set(combined["unreliable"]) <= set(outputs.PseudoOutput.__annotations__)


def test_mlflow_parent_and_nested_stage_runs(crashed_and_resumed):
    from mlflow.tracking import MlflowClient

    result = crashed_and_resumed["result"]
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert "test_f1_round2" in parent.data.metrics
    # the final model's test F1 under the names every cellst run uses (cellst compare)
    assert parent.data.metrics["test_f1"] == parent.data.metrics["test_f1_round2"]
    assert any(k.startswith("test_f1/") for k in parent.data.metrics)
    meta = json.loads((result.pipeline_dir / "pipeline.json").read_text())
    assert meta["parent_run_id"] == result.parent_run_id  # the re-run re-attached
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    by_id = {r.info.run_id: r for r in children}
    for rec in result.records:
        assert rec.mlflow_run_id in by_id, rec.key
        assert by_id[rec.mlflow_run_id].info.status == "FINISHED"
    assert len(children) == len(STAGES)

    def artifacts(run_id: str, path: str | None = None) -> set[str]:
        out = set()
        for a in client.list_artifacts(run_id, path):
            out |= artifacts(run_id, a.path) if a.is_dir else {a.path}
        return out

    assert {"reliability/scores.csv", "reliability/split.csv", "reliability/scores.png"} <= (
        artifacts(result.record("reliability").mlflow_run_id)
    )
    assert "pseudo_labels/reliable.csv" in artifacts(result.record("pseudo_reliable").mlflow_run_id)
    assert {"pseudo_labels/unreliable.csv", "pseudo_labels/all.csv"} <= artifacts(
        result.record("pseudo_unreliable").mlflow_run_id
    )
    assert "final/f1_table.csv" in artifacts(result.record("evaluate").mlflow_run_id)
    assert {"final/f1_table.csv", "stages.csv"} <= artifacts(result.parent_run_id)
    rel = client.get_run(result.record("reliability").mlflow_run_id).data.metrics
    split = result.record("reliability").outputs
    assert rel["n_reliable"] == len(split["reliable"]) >= 1
    assert rel["n_unreliable"] == len(split["unreliable"]) >= 1
    table = pd.read_csv(client.download_artifacts(result.parent_run_id, "final/f1_table.csv"))
    assert table["model"].tolist() == ["supervised", "round1", "round2"]
    # every run logs the config it used: the trainings ran in the pipeline folder, stages 4
    # and 6 fine-tuned (stpp.fresh_init false), and stpp.* is the pipeline's own everywhere
    cfg, train_dir = crashed_and_resumed["cfg"], str(result.pipeline_dir / "train")
    assert cfg.stpp.fresh_init is False
    shared = {k: v for k, v in parent.data.params.items() if k.startswith(("stpp.", "tracking."))}
    assert shared["stpp.run_dir"] == cfg.stpp.run_dir and shared["stpp.fresh_init"] == "False"
    assert parent.data.params["train.run_dir"] == train_dir
    for stage in ("supervised", "retrain_reliable", "retrain_all"):
        params = by_id[result.record(stage).mlflow_run_id].data.params
        assert params["train.run_dir"] == train_dir, stage
        assert {k: params.get(k) for k in shared} == shared, stage
        init = params["train.init_checkpoint"]
        assert (init == "None") is (stage == "supervised"), stage


def test_status_command_and_rerun_is_a_no_op(crashed_and_resumed):
    result = crashed_and_resumed["result"]
    for args in (
        ["stpp", "status", str(result.pipeline_dir)],
        ["stpp-status", str(result.pipeline_dir)],
    ):
        res = runner.invoke(app(), args)
        assert res.exit_code == 0, res.output
        assert "7/7 stages done" in res.output
        for name in STAGES:
            assert name[:6] in res.output
    again = run_stpp(crashed_and_resumed["cfg"], log=lambda _: None)
    assert again.ran == [] and again.skipped == list(STAGES)
    assert again.parent_run_id == result.parent_run_id


def test_until_stops_after_that_stage(crashed_and_resumed):
    """``run_stpp(until=...)`` and ``cellst stpp run --until 2`` on the finished pipeline:
    stages 1-2 are considered (done: skipped) and nothing after them, no F1 table, the
    records untouched. (Going on without ``--until`` is a plain resume, tested above.)"""
    cfg, pipe_dir = crashed_and_resumed["cfg"], crashed_and_resumed["result"].pipeline_dir
    records = {p.name: p.read_text() for p in (pipe_dir / "stages").glob("*.json")}
    part = run_stpp(cfg, log=lambda _: None, until="reliability")
    assert part.stopped_after == "reliability"
    assert part.skipped == ["supervised", "reliability"] and part.ran == []
    assert part.report is None  # stage 7 was not reached
    from mlflow.tracking import MlflowClient

    def parent_tags() -> dict[str, str]:
        tags = MlflowClient(part.tracking_uri).get_run(part.parent_run_id).data.tags
        return {k: tags.get(k) for k in ("cellst.stpp.completed", "cellst.stpp.stopped_after")}

    # the parent said completed=true (an earlier attempt's) and stopped_after at once
    assert parent_tags() == {
        "cellst.stpp.completed": "false",
        "cellst.stpp.stopped_after": "2_reliability",
    }
    # --until before --force-from ran nothing and marked a finished pipeline's stages
    # pending (forced): refused in one line, before anything is touched or shown
    with pytest.raises(ConfigError, match="--until reliability comes before --force-from"):
        run_stpp(cfg, log=lambda _: None, force_from="retrain_all", until="reliability")
    assert {p.name: p.read_text() for p in (pipe_dir / "stages").glob("*.json")} == records
    args = ["stpp", "run", str(ROOT / "experiments" / "demo.yaml"), "--quick", "--until", "2"]
    for o in (f"store={cfg.store}", f"stpp.run_dir={pipe_dir.parent}", *TINY):
        args += ["--set", o]
    res = runner.invoke(app(), args)
    assert res.exit_code == 0, res.output
    assert "stopped after stage 2/7 reliability, as asked (--until)" in res.output
    assert "test-split F1" not in res.output  # no table: the evaluation was not reached
    assert res.output.count("parent run") == 1, res.output  # the MLflow line once (was twice)
    assert {p.name: p.read_text() for p in (pipe_dir / "stages").glob("*.json")} == records
    res = runner.invoke(app(), [*args, "--force-from", "6"])  # 6 after --until 2
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    whole = run_stpp(cfg, log=lambda _: None)  # all done: the parent is complete again
    assert whole.stopped_after is None and parent_tags() == {
        "cellst.stpp.completed": "true",
        "cellst.stpp.stopped_after": "none",
    }


def test_demo_script_resumes_with_nothing_to_redo_and_prints_the_table(crashed_and_resumed):
    """``make demo`` re-run: data kept, every stage skipped, the F1 table printed and saved."""
    out = crashed_and_resumed["out"]
    proc = _run_demo(out, crashed_and_resumed["env"], stdout=subprocess.PIPE, text=True)
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-4000:]
    assert "already there" in stdout  # the synthetic data is not written again
    assert "(0 stage(s) run, 7 already done)" in stdout
    assert "mean test F1: supervised-only" in stdout
    table = Path(re.search(r"\(table: (\S+report\.csv)\)", stdout).group(1))
    report = pd.read_csv(table)
    assert list(report["model"]) == ["supervised", "round1", "round2"]
    assert report["f1"].between(0, 1).all()
    assert "[1/4] synthetic data" in crashed_and_resumed["first_log"]


def test_no_validation_items_is_refused_before_training(store_dir, tmp_path):
    """ST++ keeps the best checkpoint by validation F1: a store split that leaves no
    validation item is one clear error before stage 1, not a missing file after it."""
    store = _copy_store(store_dir, tmp_path / "store")
    cfg = load_stpp_config(
        _write_config(tmp_path / "c.yaml", store, tmp_path / "runs"),
        ["data.val_fraction=0"],
        quick=True,
    )
    with pytest.raises(StoreError, match="no validation items"):
        run_stpp(cfg)
    assert not (tmp_path / "runs" / "t" / "train").exists()  # nothing ran


def test_another_tracking_experiment_for_a_pipeline_that_has_runs_is_said(crashed_and_resumed):
    """A finished pipeline re-run with another ``tracking.experiment`` keeps its parent
    run (and its stages' runs) where they are; it used to create the new experiment empty
    without a word."""
    cfg = crashed_and_resumed["cfg"].model_copy(deep=True)
    cfg.tracking.experiment = "elsewhere"
    lines: list[str] = []
    res = run_stpp(cfg, log=lines.append, until="supervised")
    assert res.ran == []
    note = [ln for ln in lines if "note: the pipeline's runs stay in MLflow experiment" in ln]
    assert note and "tracking.experiment='elsewhere'" in note[0], "\n".join(lines)


def test_a_set_another_pipeline_took_over_is_foreign_and_force_from_predicts_anew(
    crashed_and_resumed,
):
    """Runs last in this module: it re-runs stage 3 of the shared pipeline.

    1. Another pipeline with the same set names took this pipeline's reliable set over
       (``--overwrite``), leaving its own checkpoint in ``set.json``. This pipeline's
       record still listed the set as its own, so stage 3 was skipped and stage 4 trained
       on the other pipeline's labels. It is now foreign: refused without --overwrite,
       and with it predicted again.
    2. ``--force-from 3`` runs stage 3 again from scratch: its set is predicted anew, not
       resumed as "already done"; a stage whose inputs changed still resumes its sets."""
    from mlflow.tracking import MlflowClient

    from cellst.data.pseudo import PseudoLabelSet
    from cellst.fs import atomic_write_json

    cfg, prefix = crashed_and_resumed["cfg"], crashed_and_resumed["prefix"]
    pset = PseudoLabelSet(Path(cfg.store), f"{prefix}-reliable")
    info = pset.info()
    assert Path(info["checkpoint"]).is_relative_to(cfg.pipeline_dir)
    other = {**info, "checkpoint": "/elsewhere/stppB/train/b-1_supervised/checkpoints/best"}
    atomic_write_json(pset.path / "set.json", other)
    with pytest.raises(StoreError, match=rf"{prefix}-reliable.*not written by this pipeline"):
        run_stpp(cfg, log=lambda _: None, until="pseudo_reliable")
    lines: list[str] = []
    res = run_stpp(cfg, overwrite=True, log=lines.append, until="pseudo_reliable")
    assert res.ran == ["pseudo_reliable"], "\n".join(lines)
    assert pset.info()["checkpoint"] == info["checkpoint"]
    items = len(pset.done_items())
    assert items > 0
    lines.clear()
    replaced = Pipeline(cfg, log=lambda _: None).book.get("pseudo_reliable").mlflow_run_id
    res = run_stpp(cfg, log=lines.append, force_from="pseudo_reliable", until="pseudo_reliable")
    assert res.ran == ["pseudo_reliable"]
    # the stage's earlier child run names the one that replaced it (compare: SUPERSEDED)
    now = Pipeline(cfg, log=lambda _: None)
    successor = now.book.get("pseudo_reliable").mlflow_run_id
    old_run = MlflowClient(crashed_and_resumed["result"].tracking_uri).get_run(replaced)
    assert successor != replaced and old_run.data.tags["cellst.superseded_by"] == successor
    said = [ln for ln in lines if f"{prefix}-reliable:" in ln]
    assert said and f"{items} written, 0 already done" in said[0], "\n".join(lines)
    # a stage re-run because its inputs changed (not forced) keeps the sets whose own
    # inputs did not: another reliable fraction re-scores stage 2 without predicting
    other = cfg.model_copy(deep=True)
    other.stpp.reliable_fraction = 0.75 if cfg.stpp.reliable_fraction != 0.75 else 0.25
    lines.clear()
    res = run_stpp(other, log=lines.append, until="reliability")
    assert res.ran == ["reliability"]
    snaps = [ln for ln in lines if "-snapshot_e" in ln]
    assert snaps and all(" 0 written, " in ln for ln in snaps), "\n".join(lines)


def test_an_added_unlabelled_image_is_the_only_one_predicted_again(crashed_and_resumed):
    """Runs last in this module: it adds an image to the shared pipeline's store.

    One more unlabelled image re-runs stage 2, whose snapshot sets (every snapshot model
    on every unlabelled item, ST++'s largest prediction work) were removed and predicted
    whole again; now the items they hold are kept and only the new one is predicted."""
    import imageio.v3 as iio

    from cellst.data.ingest import ingest

    cfg, prefix = crashed_and_resumed["cfg"], crashed_and_resumed["prefix"]
    store = CellStore(cfg.store)
    row = store.row(store.ids("unlabeled")[0])
    src = Path(row.source_path)
    image = iio.imread(src)
    iio.imwrite(src.with_name(f"added{src.suffix}"), image[::-1].copy(), extension=src.suffix)
    root = src.parents[2] if src.parent.name == "images" else src.parents[1]
    ingest(root, cfg.store, cfg.ingest, progress=False)  # as the demo ingested it
    n = len(CellStore(cfg.store).ids("unlabeled"))
    assert n == len(store.ids("unlabeled")) + 1
    lines: list[str] = []
    res = run_stpp(cfg, log=lines.append, until="reliability")
    assert "reliability" in res.ran, "\n".join(lines)
    snaps = [ln for ln in lines if f"{prefix}-snapshot_e" in ln]
    assert snaps and all(f"1 written, {n - 1} already done" in ln for ln in snaps), "\n".join(lines)
