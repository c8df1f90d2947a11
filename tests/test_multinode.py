"""A real multi-node Ray cluster on this machine, driven the way users drive one.

A head and two worker nodes, each its own raylet (``ray.cluster_utils.Cluster``, Ray's
own multi-node test machinery), the head with no CPUs as in ``cluster.yaml`` and each worker
node with a custom resource of its own. The ``cellst`` console script joins it through
``RAY_ADDRESS`` (token authentication on, as Ray's default) and must give what it gives on
this session's one-node cluster: the same store from ``cellst ingest`` and the same
pseudo-label set from ``cellst predict`` for a fixed checkpoint, whose items were predicted
on both worker nodes, each exactly once, also when a worker node is lost mid-run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellst.data.store import CellStore
from cellst.raycluster import local_system_config
from conftest import free_port, kill_group_when

ROOT = Path(__file__).resolve().parents[1]
CELLST = str(Path(sys.executable).with_name("cellst"))
#: where Ray records "the cluster last started on this machine" (read by ray.init())
RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")

pytestmark = pytest.mark.slow

#: the GCS declares a node dead after this many failed health checks this far apart (Ray's
#: defaults, 5 x 3 s, keep a killed node's work waiting about 15 s before Ray moves it). A
#: check that merely answers slowly on this loaded machine still has Ray's 10 s timeout.
NODE_DEATH_DETECTION = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def cluster(ray_session):
    """Head (0 CPUs) + two worker nodes of 2 CPUs with resources ``node_a`` / ``node_b``.

    Started after the session's own ``ray.init()``, which puts ``RAY_AUTH_MODE=token`` in
    this process's environment: ``ray.cluster_utils.Cluster`` enforces token authentication
    only when started from such a process (without it, a client with a wrong token joined).
    ``ray start --head``, as ``cluster.yaml`` runs it, enforces it from a plain shell.
    """
    from ray.cluster_utils import Cluster

    saved = RAY_ADDRESS_FILE.read_text() if RAY_ADDRESS_FILE.is_file() else None

    def restore_address_file() -> None:
        # a plain ray.init() on this machine (another test, now or later) must not join
        # this cluster: every command here names it through RAY_ADDRESS
        if saved is None:
            RAY_ADDRESS_FILE.unlink(missing_ok=True)
        else:
            RAY_ADDRESS_FILE.write_text(saved)

    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "resources": {"head": 1},
            "include_dashboard": False,
            # as on a machine of its own: idle workers kept for reuse (see local_system_config)
            "_system_config": {**NODE_DEATH_DETECTION, **local_system_config(2)},
        },
    )
    restore_address_file()
    try:
        workers = {
            name: c.add_node(num_cpus=2, resources={name: 1}) for name in ("node_a", "node_b")
        }
        c.wait_for_nodes()
        yield c, workers
    finally:
        c.shutdown()
        restore_address_file()


def _cellst_env(address: str, **extra: str) -> dict[str, str]:
    """This environment joined to the cluster at ``address``, with cellst's own tracking."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "RAY_ADDRESS": address, **extra}


def _cellst(
    *args: str, address: str, timeout: float = 600, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = _cellst_env(address, **(env_extra or {}))
    res = subprocess.run([CELLST, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert res.returncode == 0, f"cellst {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
    return res


def _last_epoch(run: Path) -> int:
    """The epoch of the run's ``last`` checkpoint; 0 before there is one (or while it is
    being replaced). ``epoch_NNN`` folders are no proof: only ``train.keep_last`` stay."""
    from cellst.model.checkpoint_files import CheckpointError, read_checkpoint_info

    try:
        return int(read_checkpoint_info(run / "checkpoints" / "last")[1]["epoch"])
    except (CheckpointError, OSError, KeyError):
        return 0


def _same_store(a: Path, b: Path) -> None:
    sa, sb = CellStore(a, lease=False), CellStore(b, lease=False)
    cols = ["id", "split", "modality", "height", "width"]
    ma = sa.manifest[cols].sort_values("id").reset_index(drop=True)
    mb = sb.manifest[cols].sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(ma, mb)
    for item in ma["id"]:
        assert np.array_equal(sa.image(item), sb.image(item)), item
        if sa.row(item).label_array:
            assert np.array_equal(sa.label(item), sb.label(item)), item


def test_ingest_on_three_nodes_equals_one_node(cluster, synth_src, store_dir, tmp_path):
    c, _ = cluster
    _cellst("ingest", str(synth_src), "--out", str(tmp_path / "store"), address=c.address)
    _same_store(tmp_path / "store", store_dir)


def test_predict_spreads_over_the_nodes_and_survives_losing_one(
    cluster, ray_session, store_dir, tmp_path, quick_train
):
    """`cellst predict` on the multi-node cluster writes the same set as on one node, its
    items predicted on both worker nodes. Then a third worker node joins, takes part, and
    is removed (its raylet and every process on it killed) once it has written an item,
    while items are still to do: the command still ends with every item written exactly
    once, and the same labels."""
    import torch

    from cellst.model import ModelConfig, build_model, save_checkpoint

    c, workers = cluster
    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    torch.manual_seed(0)
    mcfg = ModelConfig(name="hovernet-lite", width=8)
    s = CellStore(store, lease=False)
    items = s.ids("labeled")
    model = quick_train(build_model(mcfg), s, items[:4], steps=30)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, mcfg)
    # test-time flips and small windows: a few seconds per item, so the loss hits mid-run
    args = ["predict", "--checkpoint", str(ckpt), "-i", str(store), "--split", "labeled"]
    args += ["--set", "inference.tta=true", "--set", "inference.roi=64"]
    one_node = ray_session.get_runtime_context().gcs_address
    _cellst(*args, "--set-name", "one", "--num-actors", "1", address=one_node)
    # no item handed out before both actors are up: on a loaded machine the first one ready
    # otherwise finished every item before the other had imported torch
    wait_for_all = {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "180"}
    _cellst(
        *args, "--set-name", "multi", "--num-actors", "2", address=c.address, env_extra=wait_for_all
    )

    doomed = c.add_node(num_cpus=2, resources={"node_c": 1})
    c.wait_for_nodes()
    done_at_loss: list[int] = []
    before_loss: dict[str, int] = {}  # item -> write time of its label, when the node went

    def written_items(base: Path) -> list[Path]:
        """The ``zarr.json`` of each item written (renamed into place: a hidden ``.tmp-``
        folder of an item being written is not one, and is gone a moment later)."""
        found = base.glob("*/zarr.json") if base.is_dir() else []
        return [p for p in found if not p.parent.name.startswith(".")]

    def remove_when_it_has_written() -> None:
        base = store / "pseudo" / "lost"
        deadline = time.time() + 300
        while time.time() < deadline:
            for p in written_items(base):
                if json.loads(p.read_text()).get("attributes", {}).get("node_id") == doomed.node_id:
                    c.remove_node(doomed, allow_graceful=False)
                    now = written_items(base)
                    before_loss.update({q.parent.name: q.stat().st_mtime_ns for q in now})
                    done_at_loss.append(len(now))
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=remove_when_it_has_written, daemon=True)
    killer.start()
    # one actor per node (1.5 of a node's 2 CPUs, the read stage keeps 0.25), and no item
    # handed out before all three actors are up: otherwise, on a loaded machine, the two
    # warm nodes finished every item before the new node's actor had imported torch (CI)
    try:
        _cellst(
            *args,
            *("--set-name", "lost", "--num-actors", "3"),
            *("--set", "predict.num_cpus_per_actor=1.5"),
            address=c.address,
            timeout=300,
            env_extra=wait_for_all,
        )
        killer.join(timeout=10)
    finally:
        if not done_at_loss:  # never leave the extra node to the module's later tests
            c.remove_node(doomed, allow_graceful=False)

    s = CellStore(store, lease=False)
    sets = {name: s.pseudo_items(name) for name in ("one", "multi", "lost")}
    for name, df in sets.items():
        assert sorted(df["id"]) == sorted(items), name
        assert df["id"].is_unique, name  # each item written exactly once
    for item in items:
        one = s.pseudo_label("one", item)
        assert np.array_equal(one, s.pseudo_label("multi", item)), item
        assert np.array_equal(one, s.pseudo_label("lost", item)), item
    assert sum(int(s.pseudo_label("one", i).max()) for i in items) > 0  # cells were found
    # both worker nodes predicted (the head has no CPUs: it cannot host an actor)
    worker_ids = {w.node_id for w in workers.values()}
    assert set(sets["multi"]["node_id"]) == worker_ids, (set(sets["multi"]["node_id"]), worker_ids)
    # the lost node took part, and was lost with items still to do
    assert done_at_loss, "the third node never wrote an item"
    assert done_at_loss[0] < len(items), f"the node was lost after the run: {done_at_loss}"
    assert doomed.node_id in set(sets["lost"]["node_id"])
    # written once: what was there when the node went was never written again (a re-run
    # task's write of an item already there is refused), the lost node's items included
    base = store / "pseudo" / "lost"
    assert {i: (base / i / "zarr.json").stat().st_mtime_ns for i in before_loss} == before_loss


def test_a_client_with_a_wrong_token_is_refused(cluster):
    """Token authentication stays on: the right token (the one Ray wrote for this machine)
    joins, a wrong one is refused with an error, not served."""
    c, _ = cluster
    probe = "import ray; ray.init(); print('JOINED', sum(n['Alive'] for n in ray.nodes()))"
    env = {**os.environ, "RAY_ADDRESS": c.address}
    ok = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )
    assert ok.returncode == 0 and "JOINED 3" in ok.stdout, ok.stdout + ok.stderr
    env["RAY_AUTH_TOKEN"] = "not-the-cluster-token"
    # a refused client retries the GCS once a second for 20 s before it gives up (Ray's
    # NUM_REDIS_GET_RETRIES); the refusal is the same after 2
    env["RAY_gcs_server_port_wait_time_s"] = "2"
    try:
        bad = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a client with a wrong token hung instead of being refused")
    assert bad.returncode != 0 and "JOINED" not in bad.stdout
    assert "auth" in (bad.stdout + bad.stderr).lower(), bad.stderr[-2000:]


#: Ray Train's autoscaling coordinator looks at the cluster every 20 s (Ray 2.60), and an
#: elastic group is sized by what it saw: this probe makes it look again as soon as a node
#: dies or joins (``get_reserved_resources(recompute=True)``), so that a test waits for Ray
#: Train, not for the tick. It writes ``argv[1]`` once connected, and stops once the test
#: removes that file.
COORDINATOR_FOLLOWS_THE_NODES = """
import pathlib, sys, time, ray
ray.init(logging_level="ERROR")
running = pathlib.Path(sys.argv[1])
alive = lambda: frozenset(n["NodeID"] for n in ray.nodes() if n["Alive"])
seen, looks = alive(), 0
running.touch()
while running.is_file():
    now = alive()
    if now != seen:
        try:
            coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
            ray.get(coordinator.get_reserved_resources.remote("cellst-test", recompute=True))
            seen, looks = now, looks + 1
        except ValueError:  # no training has created it yet
            seen = now
    time.sleep(0.1)
print(f"the coordinator looked at the cluster {looks} time(s)")
"""


@contextlib.contextmanager
def _coordinator_follows_the_nodes(address: str, folder: Path) -> Iterator[list[str]]:
    """Run :data:`COORDINATOR_FOLLOWS_THE_NODES` while the block runs; the list yielded
    holds what it printed, once the block is over."""
    running, said = folder / "probe_running", []
    probe = subprocess.Popen(
        [sys.executable, "-c", COORDINATOR_FOLLOWS_THE_NODES, str(running)],
        env=_cellst_env(address), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    connected = False
    try:
        deadline = time.time() + 120
        while not running.is_file() and probe.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        connected = running.is_file()
        if connected:
            yield said
    finally:
        running.unlink(missing_ok=True)
        if not connected:
            probe.kill()
        try:
            said.append(probe.communicate(timeout=30)[0])
        finally:
            probe.kill()
    if not connected:
        pytest.fail(f"the probe did not connect: {said[-1]}")


SHARED_PROBE = """
import sys, ray
from cellst.raycluster import ClusterError, check_shared_paths
ray.init()
ok = check_shared_paths(read=[sys.argv[1]], write=[sys.argv[2]])
print("CHECKED", len(ok), len(set(ok)), flush=True)
try:
    check_shared_paths(read=[sys.argv[3]])
    print("NO ERROR")
except ClusterError as exc:
    print("ERROR", exc)
"""


def test_storage_is_checked_on_every_node_before_work(cluster, tmp_path):
    """The shared-storage preflight runs a task on each of the three nodes (the 0-CPU head
    too); a path some node cannot see is one error naming the node and the path."""
    c, _ = cluster
    env = _cellst_env(c.address)
    missing = tmp_path / "not-mounted-here"
    res = subprocess.run(
        [sys.executable, "-c", SHARED_PROBE, str(tmp_path), str(tmp_path / "runs"), str(missing)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "CHECKED 3 3" in res.stdout, res.stdout + res.stderr
    assert (tmp_path / "runs").is_dir() and not list((tmp_path / "runs").iterdir())  # no probe left
    line = next(x for x in res.stdout.splitlines() if x.startswith("ERROR"))
    assert f"{missing} is not visible" in line, line
    assert re.search(r"^ERROR node \S+ \([0-9a-f]{12}\): ", line), line


def test_a_node_sees_a_write_folder_only_where_the_drivers_marker_is(tmp_path):
    """The probe on each node made every write folder it did not find (``mkdir``): a node
    without the shared mount passed, and wrote its results to its own disk. The probe
    now creates nothing; a folder there must hold the marker the driver left in it."""
    from cellst.raycluster import SHARED_MARKER, _probe_paths

    absent, local, shared = tmp_path / "absent", tmp_path / "local", tmp_path / "shared"
    local.mkdir()
    shared.mkdir()
    (shared / SHARED_MARKER.format(token="t1")).touch()
    problems = _probe_paths([], [str(absent), str(local), str(shared)], "t1")
    assert problems == [
        f"{absent} is not visible",
        f"{local} is another folder than the driver's (it lacks its marker)",
    ]
    assert not absent.exists()  # nothing made on the node


def test_storage_check_is_skipped_on_the_drivers_own_single_node(ray_session, tmp_path):
    from cellst.raycluster import check_shared_paths

    assert check_shared_paths(read=[tmp_path / "missing"], write=[tmp_path]) == []


def test_storage_check_skips_a_node_that_left_the_cluster(ray_session, tmp_path, monkeypatch):
    """Right after a node is lost the GCS still lists it as alive for a few seconds, while
    Ray can no longer schedule anything there (seen when ST++ was re-submitted at once
    after the loss of its driver's node: the storage check failed the stage). Such a node
    is skipped; the nodes that are there are still checked."""
    import ray

    from cellst.raycluster import check_shared_paths

    real = ray.nodes()
    gone = {**real[0], "NodeID": "ab" * 28, "NodeManagerAddress": "192.0.2.99"}
    monkeypatch.setattr(ray, "nodes", lambda: [*real, gone])  # the GCS's stale view
    checked = check_shared_paths(read=[tmp_path], write=[tmp_path / "runs"])
    assert checked == [n["NodeID"] for n in real if n.get("Alive")]


def test_stpp_runs_on_the_nodes_and_resumes_after_its_driver_is_killed(
    cluster, store_dir, tmp_path
):
    """`cellst stpp run --quick` on the multi-node cluster: its driver (the `cellst` process
    on this machine, the head, with everything it started here) is SIGKILLed while stage 5
    runs. The same command again (with ``--until 5``: stages 6-7 repeat the work of stages
    4-5, and the single-node ST++ tests run them) skips stages 1-4 (records and trainings
    untouched) and redoes stage 5, each item once; trainings and predictions ran on the
    worker nodes only."""
    c, workers = cluster
    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    args = ["stpp", "run", str(ROOT / "experiments" / "demo.yaml"), "--quick"]
    for o in (f"store={store}", f"stpp.run_dir={tmp_path / 'stpp'}", "name=mn",
              "data.crops_per_epoch=16", "train.val_max_items=1", "inference.roi=64",
              "train.snapshot_fractions=[0.5, 1.0]", "tracking.system_metrics=false"):  # fmt: skip
        args += ["--set", o]
    pipe = tmp_path / "stpp" / "mn"
    stage5 = pipe / "stages" / "5_pseudo_unreliable.json"
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [CELLST, *args],
            env=_cellst_env(c.address),
            stdout=fh,
            stderr=fh,
            start_new_session=True,
        )
        killed = kill_group_when(
            proc,
            lambda: stage5.is_file() and json.loads(stage5.read_text())["status"] == "running",
            900,
        )
    assert killed, f"the pipeline ended before stage 5 was seen running:\n{log.read_text()[-3000:]}"
    records = {p.name: p.read_text() for p in sorted((pipe / "stages").glob("[1-4]_*.json"))}
    assert len(records) == 4 and all('"done"' in r for r in records.values()), records
    trainings = sorted(p.name for p in (pipe / "train").iterdir())
    assert "mn-4_retrain_reliable" in trainings and "mn-6_retrain_all" not in trainings

    res = _cellst(*args, "--until", "5", address=c.address, timeout=900)  # the same again
    assert "stopped after stage 5/7" in res.stdout, res.stdout[-3000:]
    assert {p.name: p.read_text() for p in (pipe / "stages").glob("[1-4]_*.json")} == records
    assert sorted(p.name for p in (pipe / "train").iterdir()) == trainings  # none redone
    stages = [json.loads(p.read_text()) for p in sorted((pipe / "stages").glob("*.json"))]
    assert [r["status"] for r in stages] == ["done"] * 5
    assert stages[4]["attempts"] == 2
    # the work ran on the worker nodes (the head has no CPUs)
    worker_ids = {w.node_id for w in workers.values()}
    for run in (pipe / "train").glob("mn-*"):
        ranks = [json.loads(p.read_text()) for p in (run / "workers").glob("rank*.json")]
        assert ranks and {r["node_id"] for r in ranks} <= worker_ids, run.name
    done = CellStore(store, lease=False).pseudo_items("mn-unreliable")
    assert done["id"].is_unique and set(done["node_id"]) <= worker_ids


class PortCut:
    """A TCP port that forwards to ``target_port`` on 127.0.0.1 until :meth:`cut`: then it
    refuses connections (and drops the open ones) like a dead server, until :meth:`restore`,
    which answers again at once. A real ``mlflow server`` restarted by PID takes 10-40 s
    here before it answers, longer than a short test training lasts after epoch 1."""

    def __init__(self, target_port: int):
        self.port, self.target = free_port(), target_port
        self.uri = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: list = []
        self._listener = None
        self.restore()

    def restore(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._listener = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def cut(self) -> None:
        # new connections: refused (shutdown wakes the accept() that close() alone does not)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.close()
            self._open.clear()

    def _accept(self, srv) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:  # cut
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.close()


def test_ddp_training_on_the_nodes_rides_out_a_tracking_outage(
    cluster, store_dir, tmp_path, mlflow_server_process
):
    """`cellst train` with a rank on each worker node logs to a real MLflow server whose
    address stops answering once epoch 1 is saved (connection refused, open connections
    dropped: :class:`PortCut`) and answers again once the run has had to keep a record in
    its folder, before the last epoch.

    The training neither crashes nor waits for the server: it finishes with every epoch's
    checkpoint. Once the server answers again, during the run, what was kept meanwhile is
    sent (one line says so): every epoch's metrics reach the server exactly once, the run
    ends FINISHED there, and nothing is left pending in the run folder. (A real server
    killed by PID, kept down to the end, then restarted: test_tracking_outage.py.)"""
    from mlflow.tracking import MlflowClient

    from cellst.tracking import PENDING_FILE

    server = mlflow_server_process.start()
    cut = PortCut(server.port)
    c, _ = cluster
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("name: mn-outage\n")
    runs = tmp_path / "runs"
    epochs = 8
    overrides = [
        f"store={store_dir}",
        f"train.run_dir={runs}",
        "train.run_name=tracked",
        "train.num_workers=2",
        "train.placement_strategy=STRICT_SPREAD",
        f"train.epochs={epochs}",
        "train.val_every=100",
        "train.calibrate_postprocess=false",
        "model.width=8",
        "data.crop_size=96",
        "data.crops_per_epoch=32",
        "train.batch_size=8",
        "train.val_max_items=1",
        "train.log_every_steps=1",
        "inference.roi=96",
        "tracking.system_metrics=false",
        f"tracking.tracking_uri={cut.uri}",
        "tracking.retry_every_s=0.5",
    ]
    args = ["train", str(cfg_file)]
    for o in overrides:
        args += ["--set", o]
    run = runs / "tracked"
    events: dict[str, int] = {}

    def outage() -> None:
        deadline = time.time() + 300
        while _last_epoch(run) < 1 and time.time() < deadline:
            time.sleep(0.02)
        cut.cut()
        events["cut_at"] = _last_epoch(run)
        # back once the run has felt the outage (a record kept in its folder: epochs are
        # logged by the Ray Train controller as it registers them, a moment after rank 0
        # saved them), and by the last epoch at the latest
        while time.time() < deadline and _last_epoch(run) < epochs:
            if (run / PENDING_FILE).is_file():
                events["felt_at"] = _last_epoch(run)
                break
            time.sleep(0.02)
        cut.restore()
        events["back_at"] = _last_epoch(run)

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    res = _cellst(*args, address=c.address, timeout=400)
    thread.join(timeout=10)
    out = res.stdout + res.stderr
    # the outage fell inside the run: from epoch 1 (or 2) until a record had to be kept,
    # before the last epoch of 8
    assert events.get("cut_at") in (1, 2) and "felt_at" in events, events
    assert events["back_at"] < epochs, events
    assert "unavailable (" in out and "is back; sent" in out, out[-3000:]
    # two Ray instances on this machine (the session's and this cluster): Ray Train's helper
    # actors still find their own (a worker with no address failed in Ray's lookup)
    assert "Found multiple active Ray instances" not in out, out[-3000:]
    assert (run / "checkpoints" / f"epoch_{epochs:03d}").is_dir()
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "finished" and state["tracking"] is None, state
    assert not (run / PENDING_FILE).exists()
    client = MlflowClient(server.uri)
    got = client.get_run(state["mlflow_run_id"])
    assert got.info.status == "FINISHED"
    for name in ("epoch", "train_loss"):
        steps = sorted(m.step for m in client.get_metric_history(got.info.run_id, name))
        assert steps == list(range(1, epochs + 1)), (name, steps)
    steps = sorted(m.step for m in client.get_metric_history(got.info.run_id, "step_loss"))
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= epochs, steps  # each once
    ranks = [json.loads(p.read_text()) for p in sorted((run / "workers").iterdir())]
    assert len({r["node_id"] for r in ranks}) == 2  # a rank on each worker node


def _train_args(tmp_path: Path, store: Path, name: str, epochs: int, *extra: str) -> list[str]:
    """``cellst train`` of a tiny two-worker run ``name`` under ``tmp_path/runs`` (``extra``
    overrides last)."""
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text(f"name: {name}\n")
    args = ["train", str(cfg_file)]
    for o in (
        f"store={store}",
        f"train.run_dir={tmp_path / 'runs'}",
        f"train.run_name={name}",
        "train.num_workers=2",
        f"train.epochs={epochs}",
        f"train.val_every={epochs}",
        "model.width=8",
        "data.crop_size=96",
        "data.crops_per_epoch=32",
        "train.batch_size=8",
        "train.val_max_items=1",
        "inference.roi=96",
        "tracking.system_metrics=false",
        *extra,
    ):
        args += ["--set", o]
    return args


def _ranks(run: Path) -> list[dict]:
    """Each rank's ``workers/rank<N>.json`` of training ``run`` (where it runs), by rank."""
    from cellst.train.checkpoints import RunPaths

    return RunPaths(run).worker_records()


def test_ddp_training_spans_nodes_and_survives_losing_one(cluster, store_dir, tmp_path):
    """`cellst train` with two ranks on different worker nodes (DDP over gloo between two
    raylets, ``train.placement_strategy=STRICT_SPREAD``).

    1. Once Ray Train has registered a checkpoint, the node of rank 1 is removed (raylet and
       processes killed). A spare worker node is there, as an autoscaler would provide: Ray
       Train restarts the group from the last checkpoint (``train.max_failures``). (A
       worker process killed on one node, as by the OOM killer, takes the same path.)
    2. Once the restarted group has saved a checkpoint, the node of its rank 0 is removed
       too. Nothing replaces it: within ``train.node_wait_s`` the command stops with exit 1
       and one line saying so (no traceback), the run's checkpoints kept.
    3. A node is added, as an operator would, and the same command resumes the run to its
       last epoch; the two ranks end with identical parameters.

    Runs last in this module: the cluster has two nodes fewer afterwards."""
    c, workers = cluster
    spare = c.add_node(num_cpus=2, resources={"node_d": 1})
    c.wait_for_nodes()
    nodes = {n.node_id: n for n in (*workers.values(), spare)}
    runs = tmp_path / "runs"
    # enough epochs that the second node loss lands before the last one: on a fast day the
    # restarted group saved its last (6th) epoch before the removal took effect
    epochs = 10
    args = _train_args(
        tmp_path,
        store_dir,
        "lossy",
        epochs,
        "train.placement_strategy=STRICT_SPREAD",
        "train.max_failures=2",
        "train.node_wait_s=20",
    )
    run = runs / "lossy"
    lost: list[str] = []

    def remove_two_nodes() -> None:
        snapshot = runs / "_ray" / "lossy" / "checkpoint_manager_snapshot.json"
        deadline = time.time() + 300
        while time.time() < deadline and not lost:
            now = _ranks(run)
            if snapshot.is_file() and len(now) == 2:
                lost.append(now[1]["node_id"])
                c.remove_node(nodes[lost[0]], allow_graceful=False)
            time.sleep(0.1)
        moved: list[dict] = []
        while time.time() < deadline and not moved:  # the restarted group is up
            now = _ranks(run)
            if len(now) == 2 and lost and lost[0] not in {r["node_id"] for r in now}:
                moved = now
            time.sleep(0.1)
        epoch = 0
        while time.time() < deadline and not epoch:
            epoch = _last_epoch(run)
            time.sleep(0.1)
        while time.time() < deadline and len(lost) == 1:
            if _last_epoch(run) > epoch:  # the restarted group has saved one
                lost.append(moved[0]["node_id"])
                c.remove_node(nodes[lost[1]], allow_graceful=False)
            time.sleep(0.1)

    killer = threading.Thread(target=remove_two_nodes, daemon=True)
    killer.start()
    env = _cellst_env(c.address)
    res = subprocess.run([CELLST, *args], capture_output=True, text=True, env=env, timeout=400)
    killer.join(timeout=10)
    assert len(lost) == 2, f"removed {lost} only:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    error = [line for line in res.stderr.splitlines() if "found no room" in line]
    assert len(error) == 1 and "train.node_wait_s" in error[0], res.stderr[-3000:]
    # no traceback of the command itself (the lines Ray forwards from its actors start with
    # "(ActorName pid=...)": the surviving rank's broken collective, for one)
    assert not any(ln.startswith("Traceback") for ln in (res.stdout + res.stderr).splitlines())
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "failed" and "found no room" in state["error"], state
    stopped_at = _last_epoch(run)
    assert 1 <= stopped_at < epochs  # its checkpoints are kept
    from cellst.model.checkpoint import load_model

    _, _, meta = load_model(run / "checkpoints" / "last")  # saved by the restarted group,
    assert meta["resumed_from_epoch"] >= 1, meta  # which went on from a checkpoint

    extra = c.add_node(num_cpus=2, resources={"node_e": 1})
    nodes[extra.node_id] = extra
    c.wait_for_nodes()
    _cellst(*args, address=c.address, timeout=400)  # the same command resumes the run
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "finished", state
    _, _, meta = load_model(run / "checkpoints" / "last")
    # from the last checkpoint Ray Train registered (the node may have gone between the
    # save of `last` and its registration, so that can be the epoch before)
    assert meta["epoch"] == epochs and 1 <= meta["resumed_from_epoch"] <= stopped_at, meta
    final = _ranks(run)
    assert [r["rank"] for r in final] == [0, 1] and {r["world_size"] for r in final} == {2}
    assert not set(lost) & {r["node_id"] for r in final}  # the group moved off both
    assert len({r["node_id"] for r in final}) == 2  # one rank per node
    assert {r["node_id"] for r in final} <= set(nodes)  # worker nodes only, never the head
    digests = {p.read_text() for p in run.glob("params_rank*.sha256")}
    assert len(digests) == 1  # the ranks stayed in step across the nodes


def test_an_elastic_training_shrinks_on_a_lost_node_and_grows_back(cluster, store_dir, tmp_path):
    """`cellst train` with ``train.min_workers=1``: Ray Train's elastic group.

    1. Once Ray Train has registered a checkpoint, the node of rank 1 is removed and nothing
       replaces it at once: the training goes on from that checkpoint with one worker on the
       node that remains, with no operator and no wait.
    2. Once that group of one runs, a node joins, as an autoscaler would bring one: at its
       next check (``train.elastic_resize_s``) Ray Train grows the group back to two
       workers, again from the last checkpoint, and the run finishes with both.

    cellst sizes the workers (1.5 CPUs on these 2-CPU nodes, a note says so) so that the
    node Ray refills still runs the read tasks: at 1 CPU Ray put both workers on it and the
    stream that feeds them never ran again.

    Runs after the fixed-group test, on the nodes it leaves (added here where fewer)."""
    c, _ = cluster
    alive = list(c.worker_nodes)  # (a removed node leaves this set)
    while len(alive) < 2:
        alive.append(c.add_node(num_cpus=2, resources={f"node_el{len(alive)}": 1}))
    c.wait_for_nodes()
    nodes = {n.node_id: n for n in alive}
    runs = tmp_path / "runs"
    epochs = 6
    args = _train_args(
        tmp_path,
        store_dir,
        "elastic",
        epochs,
        "train.min_workers=1",
        "train.elastic_resize_s=2",
        "train.placement_strategy=SPREAD",
        "train.calibrate_postprocess=false",
    )
    run = runs / "elastic"
    lost: list[str] = []
    shrunk_at: list[int] = []  # the last checkpoint's epoch when the group of one ran
    joined: list[str] = []
    snapshot = runs / "_ray" / "elastic" / "checkpoint_manager_snapshot.json"
    logs = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    from cellst.train.checkpoints import RunPaths

    # the group of one waits before each epoch while this file exists, so that it is still
    # training when Ray Train sees the joined node: the group of one trained the 23 epochs
    # of a first version of this test in 16 s, never growing back
    hold, released = tmp_path / "hold", 0.0
    # the probe makes Ray Train's autoscaling coordinator see the lost and the joined node
    # at once, not at its next 20-s tick; until it sees the loss, the elastic policy asks
    # for a group of 2, in tries shortened here to 5 s (15 s in cellst: a try also waits for
    # a node an autoscaler starts)
    env = _cellst_env(
        c.address, CELLST_HOLD_EPOCHS_WHILE=str(hold), RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="5"
    )
    # nodes change from this (main) thread: Cluster.add_node sets signal handlers
    with (
        _coordinator_follows_the_nodes(c.address, tmp_path) as probed,
        logs[0].open("w") as fo,
        logs[1].open("w") as fe,
    ):
        proc = subprocess.Popen([CELLST, *args], stdout=fo, stderr=fe, env=env)
        deadline = time.time() + 400
        while proc.poll() is None and time.time() < deadline:
            now = _ranks(run)
            if not lost:
                if snapshot.is_file() and len(now) == 2 and now[1]["node_id"] in nodes:
                    hold.touch()
                    lost.append(now[1]["node_id"])
                    c.remove_node(nodes[lost[0]], allow_graceful=False)
            elif not joined and len(now) == 1 and now[0]["world_size"] == 1:  # a group of one
                shrunk_at.append(_last_epoch(run))
                joined.append(c.add_node(num_cpus=2, resources={"node_joined": 1}).node_id)
                released = time.time() + 120  # (a group that never grows still finishes)
            elif joined and hold.exists():
                if len(RunPaths(run).group_sizes()) == 3 or time.time() > released:
                    hold.unlink()
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, *(f.read_text() for f in logs))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert len(lost) == 1 and len(joined) == 1, out[-3000:]
    assert re.search(r"looked at the cluster [1-9]\d* time", probed[0]), probed
    assert shrunk_at[0] < epochs, (shrunk_at, out[-3000:])  # it ran as one before the end
    assert "1.50 CPUs per worker" in out, out[-3000:]
    said = "workers: 2 -> 1 -> 2: the elastic group (train.min_workers=1) lost room and grew back"
    assert said in res.stdout and "ended with" not in res.stdout, out[-3000:]
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "finished", state
    from cellst.model.checkpoint import load_model

    _, _, meta = load_model(run / "checkpoints" / "last")
    assert meta["epoch"] == epochs and meta["resumed_from_epoch"] >= 1, meta
    final = _ranks(run)
    assert [(r["rank"], r["world_size"]) for r in final] == [(0, 2), (1, 2)], final  # grown
    where = {r["node_id"] for r in final}
    assert lost[0] not in where and joined[0] in where, (final, lost, joined)


def test_an_elastic_group_left_below_min_workers_stops_within_node_wait_s(
    cluster, store_dir, tmp_path
):
    """`cellst train` with ``train.min_workers=2`` of 2, one worker of 1.75 CPUs per node.

    Once Ray Train has registered a checkpoint, the node of rank 1 is removed. The node left
    holds one such worker, fewer than min_workers, and once Ray Train's autoscaling
    coordinator has seen the loss, its elastic policy makes no try to place a group, so no
    try times out: Ray alone waited for ever (and its controller answered no call
    meanwhile). The limit cellst puts in the controller (:mod:`cellst.train.elastic_wait`)
    ends that wait after ``train.node_wait_s``: exit 1, the one line of a fixed group, the
    checkpoints kept.

    The coordinator looks at the cluster every 20 s; until then the policy still asks for a
    group of 2, in tries that time out (bounded as for a fixed group, 2 tries of 3 s here):
    which wait ended the run depended on timing (CI once saw one try, then the wait without
    tries). So a probe makes the coordinator look as soon as the node is dead, and at most
    the first try comes before the wait this test is about.

    Runs last in this module: the cluster has a node fewer afterwards."""
    c, _ = cluster
    alive = list(c.worker_nodes)
    while len(alive) < 2:
        alive.append(c.add_node(num_cpus=2, resources={f"node_min{len(alive)}": 1}))
    c.wait_for_nodes()
    nodes = {n.node_id: n for n in alive}
    args = _train_args(
        tmp_path,
        store_dir,
        "below_min",
        20,
        "train.min_workers=2",
        "train.placement_strategy=SPREAD",
        "train.node_wait_s=6",
        "train.calibrate_postprocess=false",
    )
    run = tmp_path / "runs" / "below_min"
    snapshot = tmp_path / "runs" / "_ray" / "below_min" / "checkpoint_manager_snapshot.json"
    lost: list[str] = []
    logs = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    env = _cellst_env(c.address)
    # nodes change from this (main) thread: Cluster.remove_node sets signal handlers
    with (
        _coordinator_follows_the_nodes(c.address, tmp_path) as probed,
        logs[0].open("w") as fo,
        logs[1].open("w") as fe,
    ):
        proc = subprocess.Popen([CELLST, *args], stdout=fo, stderr=fe, env=env)
        deadline = time.time() + 240  # (Ray alone: still waiting then)
        while proc.poll() is None and time.time() < deadline:
            now = _ranks(run)
            if not lost and snapshot.is_file() and len(now) == 2 and now[1]["node_id"] in nodes:
                lost.append(now[1]["node_id"])
                c.remove_node(nodes[lost[0]], allow_graceful=False)
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    out, err = (f.read_text() for f in logs)
    assert len(lost) == 1, out[-3000:] + err[-3000:]
    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    said = [line for line in err.splitlines() if "found no room" in line]
    assert len(said) == 1, err[-3000:]
    assert "(at least 2: train.min_workers)" in said[0] and "node_wait_s=6 s" in said[0], said
    assert "looked at the cluster 1 time(s)" in probed[0], probed
    # the wait without tries ended it, in cellst's line from Ray Train's controller
    ended = [ln for ln in err.splitlines() if "elastic worker group waited" in ln]
    assert len(ended) == 1 and "cellst stops the training" in ended[0], err[-3000:]
    assert not any(ln.startswith("Traceback") for ln in (out + err).splitlines()), err[-3000:]
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "failed" and "found no room" in state["error"], state
    assert 1 <= _last_epoch(run) < 20  # its checkpoints are kept
