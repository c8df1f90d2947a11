"""Ray Train training: DDP learning, identical ranks, checkpoints, resume, faults, MLflow."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tifffile
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cellst.cli import app
from cellst.config import ConfigError, dump_config
from cellst.data.store import CellStore, StoreError
from cellst.experiment import load_config
from cellst.model import build_model, load_model
from cellst.raycluster import ClusterError
from cellst.train.config import TrainingDiverged
from cellst.train.step import encoder_parameters
from cellst.train.trainer import check_request, train
from cellst.train.validate import validate
from conftest import kill_group_when

CELLST = str(Path(sys.executable).with_name("cellst"))

TINY = [
    "model.width=8",
    "data.crop_size=96",
    "data.crops_per_epoch=64",
    "data.crops_per_visit=4",
    "train.batch_size=8",
    "train.lr=2e-3",
    "train.val_max_items=3",
    "inference.roi=96",
    "tracking.system_metrics=false",
    # calibrating after each tiny training (seconds each) is tested where it is the point
    "train.calibrate_postprocess=false",
]


def tiny_cfg(store: Path, run_dir: Path, *extra: str):
    return load_config(None, [f"store={store}", f"train.run_dir={run_dir}", *TINY, *extra])


class ReingestDuringTraining(threading.Thread):
    """Once the training has finished its first epoch, drop one cell from every source label
    and run ``cellst ingest`` again into the store the training reads (issue: a re-ingest
    used to empty the labels under a running training)."""

    def __init__(self, store: Path, run_path: Path):
        super().__init__(daemon=True)
        self.store, self.run_path = store, run_path
        self.v0 = CellStore(store, lease=False).version
        self.old_labels = {
            r.id: r.label_array for r in CellStore(store, lease=False).manifest.itertuples()
        }
        self.result: subprocess.CompletedProcess | None = None
        self.epochs_done_at_commit: int | None = None
        self.old_arrays_kept: bool | None = None

    def run(self) -> None:
        last = self.run_path / "checkpoints" / "last"
        while not last.is_dir():
            time.sleep(0.5)
        for lab in sorted((self.store.parent / "src").rglob("*_label.tiff")):
            arr = tifffile.imread(lab)
            arr[arr == arr.max()] = 0
            tifffile.imwrite(lab, arr)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_ADDRESS"] = "local"  # its own Ray: the training holds this cluster's CPUs
        self.result = subprocess.run(
            [CELLST, "ingest", str(self.store.parent / "src"), "--out", str(self.store)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.epochs_done_at_commit = len(list((self.run_path / "checkpoints").glob("epoch_*")))
        self.old_arrays_kept = all(
            (self.store / a / "zarr.json").is_file() for a in self.old_labels.values()
        )


@pytest.fixture(scope="module")
def trained(learn_store, tmp_path_factory):
    """One 2-worker DDP run shared by several tests (the expensive part). While it runs,
    the store it reads is re-ingested with changed labels by another process."""
    run_dir = tmp_path_factory.mktemp("runs")
    cfg = tiny_cfg(
        learn_store,
        run_dir,
        "train.epochs=8",
        "train.num_workers=2",
        "train.run_name=ddp",
        "train.keep_last=2",
        # 240 DDP steps on a cosine schedule: with 120 steps (constant or cosine rate) the best
        # validation F1 (2 items) was 0 in 3 of 12 runs; with these 240, 0.31-0.55 in 7 runs
        "data.crops_per_epoch=480",
        "train.schedule=cosine",
        "train.lr=3e-3",
        "train.ema_decay=0.9",
        "train.calibrate_postprocess=true",  # test_training_calibrates_its_checkpoints
    )
    reingest = ReingestDuringTraining(Path(learn_store), run_dir / "ddp")
    reingest.start()
    sigint = signal.getsignal(signal.SIGINT)
    res = train(cfg)
    reingest.join(timeout=300)
    # Ray Train's fit() sets its own SIGINT handler; train() puts the previous one back
    assert signal.getsignal(signal.SIGINT) is sigint
    return cfg, res, reingest


def test_reingest_during_training_keeps_its_version(trained, learn_store):
    """The re-ingest commits while the training runs; the training keeps reading the version
    it started from (its arrays stay), records it, and releases it when done, so the next
    ingest collects the old arrays."""
    from cellst.data.ingest import ingest
    from cellst.data.store import read_leases

    cfg, res, reingest = trained
    assert reingest.result is not None, "the re-ingest never ran"
    assert reingest.result.returncode == 0, reingest.result.stdout + reingest.result.stderr
    assert "10 updated" in reingest.result.stdout
    assert reingest.epochs_done_at_commit is not None and reingest.epochs_done_at_commit < 8
    assert reingest.old_arrays_kept  # the running training held them
    state = json.loads((res.run_path / "run.json").read_text())
    assert state["status"] == "finished" and state["store_version"] == reingest.v0
    assert CellStore(learn_store, lease=False).version != reingest.v0
    # the training is over: no live process still holds the old version
    assert reingest.v0 not in {lease.version for lease in read_leases(learn_store)}
    collected = ingest(learn_store.parent / "src", learn_store, progress=False).collected
    old = sorted(a for a in reingest.old_labels.values() if a)
    assert sorted(collected["removed"]) == old
    assert not any((learn_store / a).exists() for a in old)


def test_ddp_training_learns(trained, learn_store):
    cfg, res, _ = trained
    store = CellStore(learn_store)
    val_ids = json.loads((res.run_path / "run.json").read_text())["val_ids"]
    val_ids = val_ids[: cfg.train.val_max_items]
    assert val_ids and set(val_ids).isdisjoint(
        json.loads((res.run_path / "run.json").read_text())["train_ids"]
    )
    torch.manual_seed(123)
    untrained = build_model(cfg.model).eval()
    base, _, _ = validate(
        untrained, store, val_ids, cfg.inference, cfg.postprocess, torch.device("cpu")
    )
    model, _, meta = load_model(res.best)
    got, _, _ = validate(model, store, val_ids, cfg.inference, cfg.postprocess, torch.device("cpu"))
    # ~240 DDP steps on 2 CPUs: the nuclear mask is learned, instance separation only starts;
    # an untrained network finds no cell at all. Instance F1 on 3 validation items swings
    # with the crops a run draws (0.06-0.55 seen, the best/ rule picking a late epoch), so
    # the learning is asserted on the mask: foreground Dice on the same items
    from cellst.inference.predictor import predict_maps

    def mask_dice(net) -> float:
        inter = total = 0
        for item in val_ids:
            prob, _ = predict_maps(net, store.image(item), cfg.inference)
            pred, gt = prob > 0.5, store.label(item) > 0
            inter, total = inter + int((pred & gt).sum()), total + int(pred.sum() + gt.sum())
        return 2 * inter / max(total, 1)

    before, after = mask_dice(untrained), mask_dice(model.eval())
    print(f"val F1 untrained {base['val_f1']:.3f} -> trained {got['val_f1']:.3f}; "
          f"mask Dice {before:.3f} -> {after:.3f}")  # fmt: skip
    assert got["val_f1"] == pytest.approx(meta["val_f1"])  # the best checkpoint is what it says
    assert got["val_f1"] > base["val_f1"]  # it finds cells
    assert after >= before + 0.3 and after >= 0.6, (before, after)
    assert res.metrics["epoch"] == 8 and res.metrics["images_per_s"] > 0


def test_ranks_end_identical(trained):
    _, res, _ = trained
    digests = [p.read_text() for p in sorted(res.run_path.glob("params_rank*.sha256"))]
    assert len(digests) == 2 and digests[0] == digests[1]
    # each rank says where it ran (node, host, process)
    ranks = [json.loads(p.read_text()) for p in sorted((res.run_path / "workers").iterdir())]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert len({r["pid"] for r in ranks}) == 2 and all(r["node_id"] for r in ranks)


def test_checkpoints_best_last_and_snapshots(trained):
    cfg, res, _ = trained
    ck = res.run_path / "checkpoints"
    epochs = sorted(p.name for p in ck.glob("epoch_*"))
    assert epochs == ["epoch_007", "epoch_008"]  # keep_last=2
    assert [p.name for p in res.snapshots] == ["snapshot_e003", "snapshot_e005", "snapshot_e008"]
    assert cfg.train.snapshot_epochs() == [3, 5, 8]
    for d in [res.best, res.last, *res.snapshots]:
        model, mcfg, meta = load_model(d)
        assert mcfg == cfg.model and "val_f1" in meta
    assert load_model(res.last)[2]["epoch"] == 8
    best = load_model(res.best)[2]
    assert best["val_f1"] == res.metrics["best_val_f1"]
    # which epoch is best (train.best_within_se): test_best_is_the_latest_epoch_within_noise...
    assert 1 <= best["epoch"] <= 8 and best["epoch"] == res.metrics["best_epoch"]


def test_training_calibrates_its_checkpoints(trained):
    """``cellst train`` stores post-processing calibrated on the run's validation items in
    best/, last/ and every snapshot, starting from the validation F1 the training recorded,
    and logs the calibration to its MLflow run."""
    from cellst.inference.config import inference_identity
    from cellst.model.checkpoint import load_postprocess
    from cellst.postprocess.calibrate import GRID

    cfg, res, _ = trained
    val_ids = json.loads((res.run_path / "run.json").read_text())["val_ids"]
    for ck in [res.best, res.last, *res.snapshots]:
        rec = load_postprocess(ck)
        assert rec is not None, ck
        assert rec["meta"]["items"] == val_ids and set(rec["settings"]) == set(GRID)
        # what the maps were predicted with (a sweep on this checkpoint compares it)
        assert rec["meta"]["inference"] == inference_identity(cfg.inference) != {}
        assert rec["meta"]["val_f1_after"] >= rec["meta"]["val_f1_before"]
    best = load_postprocess(res.best)
    # "before" is exactly the validation F1 training recorded for the best checkpoint
    assert best["meta"]["val_f1_before"] == pytest.approx(load_model(res.best)[2]["val_f1"])
    assert best["meta"]["val_f1_before"] > 0.05  # a model that finds cells
    client = MlflowClient(f"sqlite:///{res.run_path / 'mlflow.db'}")
    logged = client.get_run(res.mlflow_run_id).data.metrics
    assert logged["calib_best_val_f1_before"] == pytest.approx(best["meta"]["val_f1_before"])
    assert logged["calib_best_val_f1_after"] == pytest.approx(best["meta"]["val_f1_after"])
    assert logged["calib_best_mask_threshold"] == pytest.approx(best["settings"]["mask_threshold"])
    assert "calib_last_val_f1_after" in logged


def test_mlflow_holds_the_run(trained, learn_store):
    cfg, res, _ = trained
    client = MlflowClient(f"sqlite:///{res.run_path / 'mlflow.db'}")
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert (
        run.data.params["train.num_workers"] == "2"
        and run.data.params["model.name"] == "hovernet-lite"
    )
    assert run.data.tags["store.path"] == str(Path(learn_store).absolute())
    assert len(run.data.tags["store.manifest_sha256"]) == 64 and "git.commit" in run.data.tags
    history = client.get_metric_history(res.mlflow_run_id, "val_f1")
    assert [m.step for m in history] == list(range(1, 9))
    # per modality, under the names ST++ test metrics and `cellst compare` use
    per_mod = {k for k in run.data.metrics if k.startswith("val_f1/")}
    modalities = CellStore(learn_store, lease=False).manifest.modality.unique()
    assert per_mod and per_mod <= {f"val_f1/{m}" for m in modalities}
    for key in (
        "train_loss",
        "train_np_dice",
        "train_hv_mse",
        "lr",
        "images_per_s",
        "val_pq",
        "val_precision",
        "val_recall",
        "step_loss",
    ):
        assert client.get_metric_history(res.mlflow_run_id, key), key
    # the rate each epoch trained at: train.lr first, never the next epoch's rate
    lrs = [
        m.value
        for m in sorted(client.get_metric_history(res.mlflow_run_id, "lr"), key=lambda m: m.step)
    ]
    assert lrs[0] == pytest.approx(3e-3) and lrs[-1] > 0 and lrs == sorted(lrs, reverse=True)
    arts = {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    assert {"config.yaml", "checkpoints.json", "overlays"} <= arts
    overlays = client.list_artifacts(res.mlflow_run_id, "overlays")
    assert overlays and all(a.path.endswith(".png") for a in overlays)


def _last_train_state(folder: Path) -> dict:
    """The resumable state of the latest epoch, from Ray Train's checkpoints (a copy cut
    short when a test killed the run mid-upload is not one)."""
    states = []
    for p in folder.rglob("train_state.pt"):
        try:
            states.append(torch.load(p, weights_only=False))
        except RuntimeError:  # "failed finding central directory": a truncated copy
            continue
    return max(states, key=lambda st: st["epoch"])


def test_best_is_the_latest_epoch_within_noise_of_the_top(trained):
    """The 'best' checkpoint follows train.best_within_se: the state behind it knows the
    highest-scoring epoch and its per-image F1, and 'best' is that epoch or a later one."""
    cfg, res, _ = trained
    client = MlflowClient(f"sqlite:///{res.run_path / 'mlflow.db'}")
    f1 = {m.step: m.value for m in client.get_metric_history(res.mlflow_run_id, "val_f1")}
    assert client.get_metric_history(res.mlflow_run_id, "val_f1_se")  # 3 items: its noise
    # the resumable state of the last epoch, in Ray Train's checkpoints
    state = _last_train_state(res.run_path.parent)["best"]
    top = max(f1.values())
    assert state["top_f1"] == pytest.approx(top)
    assert state["top_epoch"] == min(e for e, v in f1.items() if v == top)
    val_ids = json.loads((res.run_path / "run.json").read_text())["val_ids"]
    assert len(state["top_items"]) == len(val_ids[: cfg.train.val_max_items]) >= 2
    assert state["top_f1"] == pytest.approx(sum(state["top_items"]) / len(state["top_items"]))
    best_epoch = load_model(res.best)[2]["epoch"]
    assert best_epoch == state["epoch"] == res.metrics["best_epoch"] >= state["top_epoch"]
    assert res.metrics["best_val_f1"] == pytest.approx(f1[best_epoch])


def test_checkpoints_hold_the_moving_average_of_the_weights(trained):
    """With train.ema_decay the saved (and validated) weights are the moving average, updated
    once per step, while training goes on from the raw weights."""
    cfg, res, _ = trained
    assert cfg.train.ema_decay > 0
    state = _last_train_state(res.run_path.parent)
    assert int(state["ema"]["n_averaged"]) == state["step"] > 0
    saved = load_model(res.last)[0].state_dict()
    assert all(torch.equal(v, state["ema"][f"module.{k}"]) for k, v in saved.items())
    raw = state["model"]
    assert any(not torch.equal(saved[k], raw[k]) for k in raw if raw[k].is_floating_point())


def test_finished_run_is_not_redone(trained):
    cfg, res, _ = trained
    again = train(cfg)
    assert again.resumed and again.run_path == res.run_path and again.metrics["epoch"] == 8
    # the same store spelled another way (`store=./store/` for `store=store`) was refused
    # as "a different configuration (store: ...)"
    store = Path(cfg.store)
    respelled = cfg.model_copy(update={"store": f"{store.parent}/./{store.name}/"})
    again = train(respelled)
    assert again.resumed and again.run_path == res.run_path and again.metrics["epoch"] == 8
    changed = cfg.model_copy(deep=True)
    changed.train.lr = 1e-2
    changed.train.keep_last = 5  # where it runs, not what: not named
    with pytest.raises(ConfigError, match="different configuration") as exc:
        train(changed)
    # the refusal names what changed (the user had to diff the configs)
    assert f"(train.lr: {cfg.train.lr} -> 0.01)" in str(exc.value), str(exc.value)


def _ckpt_temps() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("cellst-ckpt-*")}


def test_two_phase_training_logs_to_a_real_mlflow_server(
    ray_session, store_dir, tmp_path, mlflow_server
):
    """One 2-epoch training checks two things: the two-phase schedule (encoder frozen in
    epoch 1, trained in epoch 2, with a learning rate set after every step) and what reaches a real MLflow tracking server. It trains
    in this process (``train.num_workers=0``, Ray Train's local mode: no worker start-up,
    about 25 s); a DDP training logs to a real server in test_multinode.py."""
    uri, _ = mlflow_server
    before = _ckpt_temps()
    cfg = tiny_cfg(
        store_dir,
        tmp_path,
        "train.num_workers=0",
        "train.epochs=2",
        "train.frozen_encoder_epochs=1",
        # the rate set after every step: the schedule must not wake the frozen encoder
        "train.schedule=cosine",
        "train.schedule_unit=step",
        "train.run_name=srv",
        f"tracking.tracking_uri={uri}",
        "name=server-exp",
    )
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    res = train(cfg)
    # the training seeded this process's generator and set its threads: both are put back
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    # the two-phase schedule
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg.model)
    first, _, _ = load_model(res.run_path / "checkpoints" / "epoch_001")
    last, _, _ = load_model(res.last)
    for a, b in zip(encoder_parameters(init), encoder_parameters(first), strict=True):
        assert torch.equal(a, b)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(encoder_parameters(first), encoder_parameters(last), strict=True)
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(init.parameters(), first.parameters(), strict=True)
    )
    # each epoch's temporary checkpoint folder is removed once Ray holds its copy
    assert _ckpt_temps() <= before
    # the MLflow server holds the run
    client = MlflowClient(uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "server-exp"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_f1")] == [1, 2]
    assert run.data.params["data.crop_size"] == "96"
    assert run.data.params["train.frozen_encoder_epochs"] == "1"
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # `cellst train` on the finished run points at the server, not at a SQLite file
    yml = tmp_path / "srv.yaml"
    yml.write_text(dump_config(cfg))
    out = CliRunner().invoke(app, ["train", str(yml)])
    assert out.exit_code == 0, out.output
    assert "already finished" in out.output and uri in out.output
    assert "sqlite" not in out.output and "mlflow ui" not in out.output
    # --force replaces it: the old run (whose checkpoints.json now names the new model's
    # files) is tagged with its successor, and `cellst compare` shows it superseded, last
    from cellst.tracking.compare import collect_runs, compare_table

    again = train(cfg, force=True)
    assert again.mlflow_run_id != res.mlflow_run_id
    old = client.get_run(res.mlflow_run_id)
    assert old.data.tags["cellst.superseded_by"] == again.mlflow_run_id
    table = compare_table(collect_runs(uri, ["server-exp"]), sort_by="val_f1")
    assert list(table["run_id"]) == [again.mlflow_run_id, res.mlflow_run_id]
    assert list(table["status"]) == ["FINISHED", "SUPERSEDED"]


def test_workers_finding_no_room_stop_the_training_in_one_line(ray_session, store_dir, tmp_path):
    """``STRICT_SPREAD`` puts each worker on its own node: this one-node cluster never holds
    two. Ray Train alone would wait forever (for an autoscaler, as after a lost node that
    nothing replaces); cellst stops after ``train.node_wait_s``, exit 1, in one line that
    names the setting, and run.json says why. (The lost node: tests/test_multinode.py.)"""
    cfg = tiny_cfg(
        store_dir,
        tmp_path,
        "train.num_workers=2",
        "train.placement_strategy=STRICT_SPREAD",
        "train.node_wait_s=3",
        "train.run_name=noroom",
    )
    yml = tmp_path / "noroom.yaml"
    yml.write_text(dump_config(cfg))
    res = CliRunner().invoke(app, ["train", str(yml)])
    assert res.exit_code == 1, res.output
    said = [line for line in res.output.splitlines() if "found no room" in line]
    assert len(said) == 1 and "within train.node_wait_s=3 s" in said[0], res.output
    assert "STRICT_SPREAD" in said[0]
    # no traceback of the command itself. Lines Ray forwards from its own actors start with
    # "(ActorName pid=...)": on a loaded machine Ray Train's PlacementGroupCleaner thread may
    # print one when its state query of the stopped controller times out (as test_multinode)
    assert not any(ln.startswith("Traceback") for ln in res.output.splitlines()), res.output
    state = json.loads((tmp_path / "noroom" / "run.json").read_text())
    assert state["status"] == "failed" and "found no room" in state["error"]


def test_a_run_a_sweeps_scheduler_stopped_is_not_recorded_as_failed(
    ray_session, store_dir, tmp_path, monkeypatch
):
    """A training trial that Tune stops: the sweep marks its run "stopped", then ends its
    workers (:func:`cellst.tune.sweep.release_stopped_trial`), and the fit raises. The
    record keeps "stopped"; any other fault is "failed"."""
    from ray.train.torch import TorchTrainer

    from cellst.train.trainer import train

    for name, stopped_first, expected in (("s", True, "stopped"), ("f", False, "failed")):
        run = tmp_path / name

        def fit(self, run=run, stopped_first=stopped_first):
            if stopped_first:
                state = json.loads((run / "run.json").read_text())
                (run / "run.json").write_text(json.dumps({**state, "status": "stopped"}))
            raise RuntimeError("the actor died unexpectedly")

        monkeypatch.setattr(TorchTrainer, "fit", fit)
        with pytest.raises(RuntimeError):
            train(tiny_cfg(store_dir, tmp_path, f"train.run_name={name}"))
        assert json.loads((run / "run.json").read_text())["status"] == expected


def test_nonfinite_loss_stops_with_clear_message(ray_session, store_dir, tmp_path, monkeypatch):
    # in this process (Ray Train's local mode): the loop's check is the same, without the
    # worker start-up; across DDP ranks the check is an all-reduce (_all_finite)
    cfg = tiny_cfg(
        store_dir,
        tmp_path,
        "train.num_workers=0",
        "train.epochs=3",
        "train.run_name=nan",
        "train.val_every=5",
        "train.log_every_steps=1",
    )
    steps_per_epoch = 64 // 8
    monkeypatch.setenv("CELLST_INJECT_NAN_AT_STEP", str(steps_per_epoch + 3))  # inside epoch 2
    with pytest.raises(TrainingDiverged, match="diverged at epoch 2") as exc:
        train(cfg)
    assert "loss is nan" in str(exc.value)
    ck = tmp_path / "nan" / "checkpoints"
    assert (ck / "last").is_dir() and load_model(ck / "last")[2]["epoch"] == 1
    # the losses that led there are in MLflow, up to the last finite step
    run_id = json.loads((tmp_path / "nan" / "run.json").read_text())["mlflow_run_id"]
    db = MlflowClient(f"sqlite:///{tmp_path / 'nan' / 'mlflow.db'}")
    steps = [m.step for m in db.get_metric_history(run_id, "step_loss")]
    assert sorted(steps) == list(range(1, steps_per_epoch + 3)), steps
    # --force of a request that a later check refuses keeps the earlier run: a pseudo-label
    # set whose writing stopped half-way (the stream's check), and warm-start weights in
    # the run that --force would delete. Both deleted the run, then failed.
    import numpy as np

    from cellst.data.pseudo import PseudoLabelSet
    from cellst.tracking.config import SUPERSEDED_TAG

    store2 = tmp_path / "store2"
    shutil.copytree(store_dir, store2)
    row = CellStore(store2, lease=False).manifest.iloc[0]
    half = PseudoLabelSet(store2, "half")
    half.create({"checkpoint": "elsewhere"})
    half.write_item(row.id, np.ones((int(row.height), int(row.width)), np.int32), {})

    def changed(**train_fields):
        return cfg.model_copy(
            update={"store": str(store2), "train": cfg.train.model_copy(update=train_fields)}
        )

    with pytest.raises(StoreError, match="incomplete"):
        train(changed(pseudo_set="half"), force=True)
    with half.writing():  # another run writes the set now: refused before anything
        with pytest.raises(StoreError, match="'half' .* is being written by another run"):
            train(changed(pseudo_set="half"), force=True)
    with pytest.raises(ConfigError, match="lies in the run that --force replaces"):
        train(changed(init_checkpoint=str(ck / "last")), force=True)
    assert load_model(ck / "last")[2]["epoch"] == 1  # the earlier run is still there
    assert json.loads((tmp_path / "nan" / "run.json").read_text())["mlflow_run_id"] == run_id
    # --force starts the run over (one epoch: before the injected NaN). The MLflow store
    # inside the run folder keeps the earlier run, marked superseded: it was erased with it
    shorter = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})})
    again = train(shorter, force=True)
    assert not (ck / "last").is_dir() or load_model(ck / "last")[2]["epoch"] == 1
    assert db.get_run(run_id).data.tags[SUPERSEDED_TAG] == again.mlflow_run_id
    assert db.get_run(again.mlflow_run_id).info.status == "FINISHED"


def test_the_controller_logs_each_kept_epochs_steps_and_a_diverged_epochs(tmp_path):
    """``EpochMetricsToMLflow``: a checkpointed report's per-step records (kept in its
    Ray checkpoint) with their own steps and times, then the epoch's metrics; a diverged
    epoch's report (no checkpoint) gives its steps only."""
    import mlflow
    from ray.train import Checkpoint

    from cellst.train.epoch_log import STEP_METRICS, EpochMetricsToMLflow, write_step_metrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("cb")).info.run_id
    cb = EpochMetricsToMLflow(uri, run_id, tmp_path, timeout_s=5, retry_every_s=1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_step_metrics(ckpt, [(1, 1_000, {"step_loss": 0.9}), (2, 2_000, {"step_loss": 0.7})])
    cb.after_report(None, [{"epoch": 1, "train_loss": 0.8}], Checkpoint.from_directory(ckpt))
    cb.after_report(None, [{"epoch": 1, "train_loss": 0.8}], None)  # no epoch: no scores
    diverged = {"epoch": 2, "diverged": "loss is nan", STEP_METRICS: [(3, 3_000, {"step_loss": 5})]}
    cb.after_report(None, [diverged], None)
    steps = {(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "step_loss")}
    assert steps == {(1, 0.9, 1_000), (2, 0.7, 2_000), (3, 5.0, 3_000)}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")] == [
        (1, 0.8)
    ]
    assert mlflow.active_run() is None

    # a resumed run's restored epoch that a kill kept from MLflow: logged once, from what
    # its training state recorded
    from cellst.tracking.buffered import PENDING_FILE, BufferedMetricLogger
    from cellst.train.epoch_log import log_restored_epoch

    logged = {"metrics": {"epoch": 3, "train_loss": 0.6}, "steps": [(7, 7_000, {"step_loss": 0.4})]}
    logger = BufferedMetricLogger(uri, run_id, tmp_path, timeout_s=5, retry_every_s=1)
    (tmp_path / PENDING_FILE).write_text("")  # records may wait there: no verdict
    assert not log_restored_epoch(logger, 3, logged)
    (tmp_path / PENDING_FILE).unlink()
    assert not log_restored_epoch(logger, 3, None)  # a state of an earlier cellst
    assert log_restored_epoch(logger, 3, logged)
    assert not log_restored_epoch(logger, 3, logged)  # there now
    losses = {(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")}
    assert losses == {(1, 0.8), (3, 0.6)}
    steps = {(m.step, m.value) for m in client.get_metric_history(run_id, "step_loss")}
    assert (7, 0.4) in steps and len(steps) == 4


def test_ctrl_c_during_the_calibration_records_the_run_as_interrupted(
    ray_session, store_dir, tmp_path, monkeypatch
):
    """Ctrl-C after the last epoch, while the checkpoints are calibrated, left run.json
    saying "running" for good (``cellst runs`` and the ST++ status showed a live training);
    it now says interrupted, and the same command finishes the run."""
    import cellst.postprocess.calibrate as calibrate

    cfg = tiny_cfg(
        store_dir,
        tmp_path,
        "train.num_workers=0",
        "train.epochs=1",
        "train.run_name=cal",
        "train.calibrate_postprocess=true",
    )
    real = calibrate.calibrate_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate, "calibrate_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    record = json.loads((tmp_path / "cal" / "run.json").read_text())
    assert record["status"] == "interrupted", record
    monkeypatch.setattr(calibrate, "calibrate_run", real)
    result = train(cfg)
    record = json.loads((tmp_path / "cal" / "run.json").read_text())
    assert record["status"] == "finished" and result.metrics["epoch"] == 1
    assert (tmp_path / "cal" / "checkpoints" / "last" / "postprocess.json").is_file()


def _wait_for(folder: Path, pattern: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if folder.is_dir() and list(folder.glob(pattern)):
            return
        time.sleep(0.2)
    raise AssertionError(f"{pattern} never appeared under {folder}")


def _published_epoch(model_json: Path) -> int:
    """The epoch of the checkpoint at ``model_json`` (0 while there is none)."""
    try:
        return int(json.loads(model_json.read_text())["metadata"]["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def _wait_registered(run_dir: Path, name: str) -> None:
    """Until Ray Train's controller has registered a checkpoint of run ``name``.

    Our own ``epoch_NNN`` folders are written before ``ray.train.report``, and the report
    waits in the worker until the controller polls it: a kill in between loses it. The
    controller writes this snapshot when it registers a checkpoint.
    """
    _wait_for(run_dir / "_ray" / name, "checkpoint_manager_snapshot.json")


def test_rerun_resumes_interrupted_run(ray_session, store_dir, tmp_path):
    """Kill `cellst train` itself mid-run; the same command resumes from the last epoch."""
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("name: resume-test\n")
    args = [
        str(Path(sys.executable).with_name("cellst")),
        "train",
        str(cfg_file),
        "--set",
        f"store={store_dir}",
        "--set",
        f"train.run_dir={tmp_path}",
        "--set",
        "train.epochs=4",
        "--set",
        "train.run_name=rr",
        "--set",
        "train.val_every=10",
        "--set",
        "train.ema_decay=0.9",
        "--set",
        "train.log_every_steps=1",
    ]
    for o in TINY:
        args += ["--set", o]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    _wait_registered(tmp_path, "rr")
    # killed as soon as epoch 2 is published in the run folder, before Ray Train holds it:
    # the re-run trains epoch 2 again (its metrics were in MLflow twice)
    last = tmp_path / "rr" / "checkpoints" / "last" / "model.json"
    assert kill_group_when(proc, lambda: _published_epoch(last) >= 2, 300)
    proc.wait()
    time.sleep(3)  # let Ray notice the driver is gone and release the workers
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # what to copy is whole on its line, however long (the mlflow ui command is over 120
    # characters: rich wrapped it at the 120 columns of a non-terminal)
    lines = out.stdout.splitlines()
    assert f"  last checkpoint: {tmp_path / 'rr' / 'checkpoints' / 'last'}" in lines, lines
    db = f"sqlite:///{tmp_path / 'rr' / 'mlflow.db'}"
    assert any(ln.endswith(f"mlflow ui --backend-store-uri '{db}'") for ln in lines), lines
    model, _, meta = load_model(tmp_path / "rr" / "checkpoints" / "last")
    # a checkpoint was registered before the kill: the re-run continues from it
    assert meta["epoch"] == 4 and meta["resumed_from_epoch"] >= 1
    # ... and from its moving average of the weights too: one update per step of both runs
    state = _last_train_state(tmp_path)
    assert int(state["ema"]["n_averaged"]) == state["step"]
    # each epoch is in the run's MLflow history once: the discarded one is not
    run_id = json.loads((tmp_path / "rr" / "run.json").read_text())["mlflow_run_id"]
    history = MlflowClient(db).get_metric_history(run_id, "train_loss")
    steps = sorted(m.step for m in history)
    assert len(steps) == len(set(steps)) and steps[-1] == 4, steps
    # ... and so is each step of the kept epochs, none of the discarded one twice
    history = MlflowClient(db).get_metric_history(run_id, "step_loss")
    steps = sorted(m.step for m in history)
    assert steps == list(range(1, state["step"] + 1)), steps


def test_training_in_this_process_resumes_where_it_was_killed(ray_session, store_dir, tmp_path):
    """``train.num_workers=0``: Ray Train's local mode runs the same loop in the ``cellst
    train`` process itself (no worker actor; Ray Train keeps no checkpoint of its own). Killed
    mid-run, the same command continues from the run's own resume state."""
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("name: local-test\n")
    args = [CELLST, "train", str(cfg_file)]
    for o in (
        f"store={store_dir}",
        f"train.run_dir={tmp_path}",
        *TINY,
        "train.num_workers=0",
        "train.epochs=6",
        "train.run_name=local",
        "train.val_every=10",
        "train.ema_decay=0.9",
    ):
        args += ["--set", o]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    run = tmp_path / "local"
    first = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    killed = kill_group_when(first, (run / "resume" / "train_state.pt").is_file, 300)
    assert killed, "the run finished before its first epoch's state was seen"
    first.wait()
    killed_writer = json.loads((run / "run.json").read_text())["writer"]
    # MLflow keeps the killed run RUNNING for ever; compare sees that its process is gone
    from cellst.tracking.compare import collect_runs

    assert collect_runs(run / "mlflow.db")["status"].tolist() == ["KILLED"]
    again = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    _, _, meta = load_model(run / "checkpoints" / "last")
    assert meta["epoch"] == 6 and 1 <= meta["resumed_from_epoch"] < 6
    # the loop ran in the command's own process, and Ray Train kept nothing of its own
    assert json.loads((run / "workers" / "rank0.json").read_text())["pid"] == again.pid
    assert not (tmp_path / "_ray" / "local").exists()
    # the moving average resumed too: one update per step of both runs
    state = torch.load(run / "resume" / "train_state.pt", weights_only=False)
    assert state["epoch"] == 6 and int(state["ema"]["n_averaged"]) == state["step"]
    assert collect_runs(run / "mlflow.db")["status"].tolist() == ["FINISHED"]  # the same run
    # the re-run claimed the run first: the killed attempt could publish nothing more
    from cellst.fs import writer_record

    writer = json.loads((run / "run.json").read_text())["writer"]
    assert writer_record(run).read_text().strip() == writer != killed_writer
    assert "Reported metrics" not in out and "local mode" not in out  # Ray's INFO kept quiet
    # killed after its last epoch was saved (say, during the calibration): the re-run has no
    # epoch left to train and still reports the last one's metrics
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "status": "running", "metrics": {}}))
    third = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and record["metrics"]["epoch"] == 6
    assert "None" not in third.stdout, third.stdout[-2000:]


def test_a_run_is_not_resumed_on_relabelled_items(ray_session, synth_src, tmp_path):
    """An interrupted run resumed after a re-ingest changed a labelled item trained its
    last epochs, and chose its best checkpoint, on other data than its first, and
    ``run.json`` named only the new store version. The resume is refused in one line
    (``--force`` starts it over); a change to the unlabelled items alone resumes."""
    from cellst.data.ingest import ingest

    src, store = tmp_path / "src", tmp_path / "store"
    shutil.copytree(synth_src, src)
    ingest(src, store, progress=False)
    cfg = tiny_cfg(store, tmp_path / "runs", "train.num_workers=0", "train.epochs=1",
                   "train.run_name=relabel", "data.crops_per_epoch=16")  # fmt: skip
    train(cfg)
    run_json = tmp_path / "runs" / "relabel" / "run.json"

    def interrupted() -> None:  # as a Ctrl-C'd run leaves it
        record = json.loads(run_json.read_text())
        run_json.write_text(json.dumps({**record, "status": "interrupted"}))

    interrupted()
    unlabelled = src / "unlabeled" / "images" / "unlabeled_00001.tif"
    tifffile.imwrite(unlabelled, tifffile.imread(unlabelled)[::-1])  # flipped
    ingest(src, store, progress=False)  # an unlabelled image changed: same training data
    assert train(cfg).run_path.name == "relabel"
    interrupted()
    label = sorted((src / "labeled" / "labels").iterdir())[0]
    arr = tifffile.imread(label)
    arr[arr == arr.max()] = 0
    tifffile.imwrite(label, arr)
    ingest(src, store, progress=False)
    with pytest.raises(ConfigError, match="started on other data.*--force"):
        train(cfg)
    assert json.loads(run_json.read_text())["status"] == "interrupted"  # untouched
    assert train(cfg, force=True).metrics["epoch"] == 1


def test_best_never_holds_an_epoch_the_resumed_run_discarded(ray_session, store_dir, tmp_path):
    """``best/`` was published before its epoch was kept for a resume: a kill between the
    two left best/ holding an epoch the resumed run trained again (and may not have chosen),
    while ``run.json`` named another best epoch. It is now published once the epoch is kept,
    and a resumed run puts its restored best epoch back in best/ where best/ holds another
    (as a run of an older cellst may have left it)."""
    from cellst.model.checkpoint_files import read_checkpoint_info
    from cellst.train.checkpoints import RunPaths, _publish

    cfg = tiny_cfg(store_dir, tmp_path, "train.num_workers=0", "train.epochs=3",
                   "train.run_name=bestkill", "train.keep_last=3", "data.crops_per_epoch=16",
                   "train.val_every=1")  # fmt: skip
    res = train(cfg)
    run = tmp_path / "bestkill"
    chosen = res.metrics["best_epoch"]
    assert read_checkpoint_info(run / "checkpoints" / "best")[1]["epoch"] == chosen
    other = next(e for e in (1, 2, 3) if e != chosen)
    _publish(
        RunPaths(run), run / "checkpoints" / f"epoch_{other:03d}", run / "checkpoints" / "best"
    )
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "status": "interrupted"}))
    again = train(cfg)  # killed after its last epoch was kept: nothing left to train
    assert again.metrics["best_epoch"] == chosen
    assert read_checkpoint_info(run / "checkpoints" / "best")[1]["epoch"] == chosen


def test_bad_requests_are_refused_before_training(ray_session, store_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.epochs"):
        tiny_cfg(store_dir, tmp_path, "train.epochs=0")
    with pytest.raises(ConfigError, match="train.bogus: unknown key"):
        tiny_cfg(store_dir, tmp_path, "train.bogus=1")
    with pytest.raises(ConfigError, match="frozen_encoder_epochs"):
        tiny_cfg(store_dir, tmp_path, "train.epochs=2", "train.frozen_encoder_epochs=2")
    with pytest.raises(ConfigError, match="no store configured"):
        check_request(load_config(None, []))
    # the same problem is the same exit code (2, a configuration error) for every command
    (tmp_path / "nostore.yaml").write_text("name: x\n")
    for cmd in (["train"], ["stpp"]):
        res = CliRunner().invoke(app, [*cmd, str(tmp_path / "nostore.yaml")])
        assert res.exit_code == 2 and "no store configured" in res.output, (cmd, res.output)
    with pytest.raises(StoreError, match="pseudo_set='nope'"):
        check_request(tiny_cfg(store_dir, tmp_path, "train.pseudo_set=nope"))
    with pytest.raises(ClusterError, match="GPU"):
        train(tiny_cfg(store_dir, tmp_path, "train.use_gpu=true", "train.run_name=gpu"))
    # training in this process (Ray Train's local mode): CPUs only, and no Tune callbacks
    local = ("train.num_workers=0", "train.run_name=local")
    with pytest.raises(ConfigError, match="num_workers=0 trains in this process on its CPUs"):
        train(tiny_cfg(store_dir, tmp_path, *local, "train.use_gpu=true"))
    with pytest.raises(ConfigError, match="num_workers=0 .* cannot report to Ray Train callbacks"):
        train(tiny_cfg(store_dir, tmp_path, *local), callbacks=[object()])
    assert not (tmp_path / "local").exists()
    # a store with no labelled items
    unl = tmp_path / "unl"
    shutil.copytree(store_dir, unl)
    import pandas as pd

    m = pd.read_parquet(unl / "manifest.parquet")
    m.loc[m["split"] == "labeled", "split"] = "unlabeled"
    m.to_parquet(unl / "manifest.parquet", index=False)
    with pytest.raises(StoreError, match="no labelled items"):
        check_request(tiny_cfg(unl, tmp_path))
    res = CliRunner().invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(f"store: {unl}\n")
    res = CliRunner().invoke(app, ["train", str(cfg_file)])
    assert res.exit_code == 1 and "no labelled items" in res.output


def test_a_pseudo_label_set_never_trains_on_validation_or_test_items(
    ray_session, store_dir, tmp_path, capsys
):
    """``cellst predict`` labels the test split too when a store has no unlabelled items;
    a training on that set learnt its own validation and test images (checkpoint choice,
    calibration and the test F1 all biased). Those items are now left out, with a note."""
    import numpy as np

    from cellst.data.pseudo import PseudoLabelSet
    from cellst.train.trainer import build_dataset

    store_root = tmp_path / "store"
    shutil.copytree(store_dir, store_root)
    store, train_ids, val_ids = check_request(tiny_cfg(store_root, tmp_path))
    m = store.manifest
    test_ids = m.loc[m["split"] == "test", "id"].tolist()
    assert val_ids and test_ids  # the fixture's store has both
    every = PseudoLabelSet(store_root, "every")
    every.create({})
    for row in m.itertuples():
        every.write_item(
            row.id, np.ones((int(row.height), int(row.width)), np.int32), {"id": row.id}
        )
    every.collect_stats()
    build_dataset(
        tiny_cfg(store_root, tmp_path, "train.pseudo_set=every"), store, train_ids, val_ids
    )
    # the stream's pseudo-label crops come from the other items only
    from cellst.data.datasource import crop_items
    from cellst.train.trainer import _pseudo_training_ids

    ids = _pseudo_training_ids(store, "every", val_ids)
    refs = {c.ref.id for c in crop_items(store, ids, pseudo_set="every", source=1)}
    assert refs == set(m["id"]) - set(val_ids) - set(test_ids) and refs
    note = capsys.readouterr().out
    assert (
        f"its {len(val_ids)} validation and {len(test_ids)} test-split items are left out" in note
    )
    # a set of nothing else is refused in one line
    only = PseudoLabelSet(store_root, "only")
    only.create({})
    for i in [*val_ids, *test_ids]:
        row = store.row(i)
        only.write_item(i, np.ones((int(row.height), int(row.width)), np.int32), {"id": i})
    only.collect_stats()
    cfg_only = tiny_cfg(store_root, tmp_path, "train.pseudo_set=only")
    with pytest.raises(StoreError, match="'only' .* has no items a training may learn from"):
        build_dataset(cfg_only, store, train_ids, val_ids)


def test_run_folder_of_an_older_cellst_still_opens(ray_session, store_dir, tmp_path, capsys):
    """run.json written before config fingerprints counted only non-default settings: the
    run is taken as unchanged (one note), not refused as 'a different configuration'. One
    of fingerprint recipe 2 is compared by that recipe."""
    from cellst.fingerprint import VERSION as FINGERPRINT_VERSION
    from cellst.fingerprint import training_fingerprint

    cfg = tiny_cfg(store_dir, tmp_path, "train.run_name=old")
    run = tmp_path / "old"
    run.mkdir()
    (run / "run.json").write_text(
        json.dumps({"config_hash": "0123456789abcdef", "status": "finished", "metrics": {}})
    )
    res = train(cfg)
    assert res.resumed and "written by an older cellst" in capsys.readouterr().out
    state = json.loads((run / "run.json").read_text())
    assert state["fingerprint"] == FINGERPRINT_VERSION and state["status"] == "finished"
    changed = cfg.model_copy(deep=True)
    changed.train.lr = 0.5
    with pytest.raises(ConfigError, match="different configuration"):  # compared from now on
        train(changed)
    # fingerprinted by recipe 2, which also counted sections a training never reads: the
    # same training by that recipe, so it opens (recorded anew), with no note
    cfg.predict.num_actors = 3
    (run / "run.json").write_text(
        json.dumps(
            {
                "config_hash": training_fingerprint(cfg, version=2),
                "fingerprint": 2,
                "status": "finished",
                "metrics": {},
            }
        )
    )
    res = train(cfg)
    assert res.resumed and "older cellst" not in capsys.readouterr().out
    state = json.loads((run / "run.json").read_text())
    assert state["fingerprint"] == FINGERPRINT_VERSION
    assert state["config_hash"] == training_fingerprint(cfg)


_POLL_PROBE = """
import os, ray
from cellst.raycluster import ensure_ray
ensure_ray()
probe = ray.remote(lambda: os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"))
print("POLL=" + str(ray.get(probe.remote())))
"""


@pytest.mark.parametrize(("caller", "expected"), [(None, "0.25"), ("1.5", "1.5")])
def test_every_process_of_a_cellst_job_polls_ray_train_often(ray_session, caller, expected):
    """Ray Train's controller only sees a finished worker group at a health-check poll
    (Ray's default: every 2 s; a run then ended about 5 s after its last step). cellst's
    job runtime environment sets the interval for every process of the job (the
    controller is one), unless the caller set it."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    env.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    if caller:
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = caller
    res = subprocess.run(
        [sys.executable, "-c", _POLL_PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    assert f"POLL={expected}" in res.stdout, res.stdout + res.stderr[-2000:]


_REUSE_PROBE = """
import os, time, psutil, ray
from cellst.raycluster import ensure_ray
ensure_ray(num_cpus=1)
pid = ray.remote(num_cpus=0.25)(lambda: (time.sleep(1.5), os.getpid())[1])
first = set(ray.get([pid.remote() for _ in range(4)]))  # up to four processes at once
time.sleep(4)  # Ray ends idle workers beyond its limit after 1 s
alive = {p for p in first if psutil.pid_exists(p)}
again = set(ray.get([pid.remote() for _ in range(len(alive))]))
print(f"FIRST={len(first)} ALIVE={len(alive)} REUSED={len(alive & again)}")
"""


def test_a_cluster_cellst_starts_keeps_idle_workers_for_reuse():
    """On a 1-CPU cluster Ray would keep one idle worker process and end the others after a
    second, so each stage of a run paid process start-up (and torch + MONAI imports) again.
    A cluster that ``ensure_ray`` starts keeps at least ``MIN_IDLE_WORKERS``: the first
    round's processes outlive the pause and run the next round."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_num_workers")}
    env["RAY_ADDRESS"] = "local"  # a cluster of its own
    res = subprocess.run(
        [sys.executable, "-c", _REUSE_PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    found = re.search(r"FIRST=(\d+) ALIVE=(\d+) REUSED=(\d+)", res.stdout)
    assert found, res.stdout + res.stderr[-2000:]
    first, alive, reused = map(int, found.groups())
    assert first >= 2 and alive == first and reused >= 1, found[0]


def test_a_schedule_stepped_per_step_follows_the_per_epoch_curve_to_zero():
    """``train.schedule_unit=step``: the same curve as the per-epoch schedule at every epoch
    boundary, and in between it keeps falling, so a cosine ends at 0 (per epoch, a 3-epoch
    fine-tune's last epoch runs at a quarter of the rate)."""
    from cellst.train.step import make_scheduler

    def rates(schedule: str, per_step: int | None, n: int) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
        sched = make_scheduler(opt, schedule, 3, 2, 0.5, steps_per_epoch=per_step)
        out = [opt.param_groups[0]["lr"]]
        for _ in range(n):
            opt.step()
            sched.step()
            out.append(opt.param_groups[0]["lr"])
        return out

    for schedule in ("cosine", "step", "none"):
        epochs, steps = rates(schedule, None, 3), rates(schedule, 10, 30)
        assert steps[::10] == pytest.approx(epochs), schedule
    cosine = rates("cosine", 10, 30)
    assert cosine[20] == pytest.approx(0.1) and cosine[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(b < a for a, b in zip(cosine, cosine[1:], strict=False))


def test_an_unusable_run_dir_is_named_before_any_work(store_dir, tmp_path):
    """A file at train.run_dir: one line naming the field (was MLflow's error about its
    database file, after Ray had started); `cellst train` says it before Ray starts."""
    from cellst.train.trainer import check_run_dir

    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(ConfigError, match=f"train.run_dir: {afile} is a file, not a folder"):
        check_run_dir(tiny_cfg(store_dir, afile / "runs"))
    assert afile.read_text() == "mine"


def test_a_run_another_process_trains_is_refused_at_once(ray_session, store_dir, tmp_path):
    """Two `cellst train` of the same run at once both trained into one folder and one
    MLflow run (both exited 0): while one holds the run, the other is refused before it
    writes anything; another run name is free."""
    from cellst.train.trainer import run_folder_lock

    cfg = tiny_cfg(store_dir, tmp_path, "name=busy", "train.num_workers=0", "train.epochs=1")
    with run_folder_lock(tmp_path / "busy-train"):  # the first training
        with pytest.raises(StoreError, match="busy-train is being trained by another process"):
            train(cfg)
        assert not (tmp_path / "busy-train").exists()
        with run_folder_lock(tmp_path / "other-train"):
            pass


def test_a_training_without_validation_items_says_so_and_names_its_last_checkpoint(
    ray_session, store_dir, tmp_path
):
    """With no validation items there is no best checkpoint: `cellst train` warns before it
    trains and prints the last checkpoint, not the path of a best one that does not exist."""
    yml = tmp_path / "exp.yaml"
    yml.write_text("name: noval\n")
    args = ["train", str(yml)]
    for o in (f"store={store_dir}", f"train.run_dir={tmp_path}", *TINY, "train.num_workers=0",
              "train.epochs=1", "data.crops_per_epoch=8", "data.val_fraction=0"):  # fmt: skip
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "warning: no validation items (data.val_fraction=0.0" in out
    assert (
        "best checkpoint:" not in out and not (tmp_path / "noval-train/checkpoints/best").exists()
    )
    assert f"last checkpoint: {tmp_path / 'noval-train' / 'checkpoints' / 'last'}" in out


def test_ctrl_c_stops_a_training_with_workers_in_one_line(ray_session, store_dir, tmp_path):
    """A terminal's Ctrl-C (SIGINT to the command's process group) during a training with
    Ray Train workers: Ray Train's own handler asked the controller to abort, the training
    went on for epochs, and the command exited 1 without a word, its run recorded "failed:
    SystemExit: 1". It stops as SIGTERM does: one line, exit 130, the run `interrupted`
    (which the same command resumes)."""
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("name: ctrl-c\n")
    epochs = 12
    args = [CELLST, "train", str(cfg_file), "--set", f"store={store_dir}"]
    for o in [f"train.run_dir={tmp_path}", f"train.epochs={epochs}", "train.run_name=cc", *TINY]:
        args += ["--set", o]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    last = tmp_path / "cc" / "checkpoints" / "last" / "model.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _published_epoch(last) < 1:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    assert "error: interrupted" in err and "Traceback" not in err, err[-3000:]
    state = json.loads((tmp_path / "cc" / "run.json").read_text())
    assert state["status"] == "interrupted", state
    assert _published_epoch(last) < epochs  # it stopped; it did not train to the end


def test_the_elastic_wait_limit_reads_ray_trains_controller_states():
    """:mod:`cellst.train.elastic_wait` reads the state of Ray Train's controller through a
    private attribute and counts the states in which the controller asks its scaling policy
    for a group: this fails first where a Ray upgrade moves either."""
    from ray.train.v2._internal.execution.controller import state as ray_states

    from cellst.train.elastic_wait import WAITING_STATES, ElasticWaitLimit, state_name

    assert state_name(ray_states.RestartingState(training_failed_error=None)) == "RESTARTING"
    assert state_name(ray_states.InitializingState()) == "INITIALIZING"
    assert state_name(ray_states.RunningState()) == "RUNNING"
    assert state_name(object()) == ""
    assert WAITING_STATES <= {t.name for t in ray_states.TrainControllerStateType}
    with pytest.raises(ValueError, match="must be positive"):
        ElasticWaitLimit(0)


def test_the_elastic_wait_limit_sums_the_waits_paces_them_and_ends_the_last():
    """The controller callback, fed the state changes of Ray Train's control loop on a
    clock of its own: the time in waiting states adds up over the run (running time does
    not), a step that leaves the controller waiting as it was is paced, and once the sum
    reaches the limit a step that still waits raises :class:`NodeWaitExceeded`, which the
    driver tells apart from other failures even wrapped and pickled as Ray Train hands it
    back. A wait that ends in a group is not stopped."""
    import pickle

    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.controller import state as ray_states
    from ray.train.v2.api.exceptions import ControllerError, TrainingFailedError

    from cellst.raycluster import found_no_room, no_room_cause
    from cellst.train.config import TrainConfig
    from cellst.train.elastic_wait import ElasticWaitLimit, NodeWaitExceeded
    from cellst.train.trainer import controller_callbacks

    now, slept = [0.0], []
    limit = ElasticWaitLimit(10, pace_s=0.1, clock=lambda: now[0], sleep=slept.append)
    assert isinstance(limit, ControllerCallback)  # Ray Train calls only those in its controller
    update = limit.after_controller_state_update
    init, running = ray_states.InitializingState(), ray_states.RunningState()
    restarting = ray_states.RestartingState(training_failed_error=None)
    limit.after_controller_start(None)
    now[0] = 4.0
    update(init, running)  # 4 s of waiting for the first group
    now[0] = 100.0
    update(running, restarting)  # a lost node: running time is no wait
    assert limit.waited_s == pytest.approx(4.0) and slept == []
    now[0] = 103.0
    update(restarting, restarting)  # the policy declined: paced
    assert limit.waited_s == pytest.approx(7.0) and slept == [0.1]
    now[0] = 106.0
    with pytest.raises(NodeWaitExceeded, match=r"train.node_wait_s=10 s") as info:
        update(restarting, restarting)
    wrapped = pickle.loads(pickle.dumps(ControllerError(info.value)))
    assert isinstance(wrapped, TrainingFailedError) and found_no_room(wrapped)
    assert isinstance(no_room_cause(wrapped), NodeWaitExceeded)
    assert not found_no_room(ControllerError(RuntimeError("another failure")))

    found = ElasticWaitLimit(2, clock=lambda: now[0], sleep=slept.append)
    found.after_controller_start(None)
    now[0] += 5.0
    found.after_controller_state_update(init, running)  # past the limit, but room was found
    assert found.waited_s == pytest.approx(5.0)

    forever = ElasticWaitLimit(None, clock=lambda: now[0], sleep=slept.append)
    forever.after_controller_start(None)
    now[0] += 1e6
    forever.after_controller_state_update(init, init)  # an autoscaler's wait: paced only
    assert slept[-1] == forever.pace_s
    assert pickle.loads(pickle.dumps(ElasticWaitLimit(None))).limit_s is None  # to Ray Train

    elastic = TrainConfig(num_workers=2, min_workers=1, node_wait_s=30)
    assert [c.limit_s for c in controller_callbacks(elastic)] == [30]
    assert controller_callbacks(TrainConfig(num_workers=2, node_wait_s=30)) == []  # fixed


def test_an_elastic_group_with_room_for_fewer_than_min_workers_stops_at_the_limit(
    ray_session, tmp_path
):
    """A real Ray Train run whose group of 2 workers (at least 2) of 1.5 CPUs can never be
    placed on the 2-CPU session cluster: Ray Train's elastic policy makes no try (Ray alone
    waited for ever, its controller answering no call meanwhile), and the limit cellst puts
    in the controller (``train.node_wait_s=3``) ends the run with an error the driver
    reports as "found no room"."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from cellst.raycluster import found_no_room, no_room_cause
    from cellst.train.config import TrainConfig
    from cellst.train.elastic_wait import NodeWaitExceeded
    from cellst.train.trainer import controller_callbacks

    t = TrainConfig(num_workers=2, min_workers=2, node_wait_s=3)
    trainer = DataParallelTrainer(
        lambda: None,
        scaling_config=ScalingConfig(num_workers=(2, 2), resources_per_worker={"CPU": 1.5}),
        run_config=RunConfig(
            name="below_min", storage_path=str(tmp_path), callbacks=controller_callbacks(t)
        ),
    )
    trainer._register_sigint_handler = lambda controller: None  # as cellst's _fit does
    ended: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            ended.append(exc)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    thread.join(timeout=180)  # (without the limit: still waiting then)
    assert not thread.is_alive(), "the elastic group still waits past train.node_wait_s"
    assert len(ended) == 1 and found_no_room(ended[0]), ended
    cause = no_room_cause(ended[0])
    assert isinstance(cause, NodeWaitExceeded) and cause.waited_s >= 3, cause
