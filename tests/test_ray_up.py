"""``ray up`` + ``ray submit`` with ``cluster-local.yaml``, the way users launch a cluster.

Ray's launcher with its ``local`` provider logs in over SSH (this machine's own sshd on
127.0.0.1:22) as an ordinary user, runs the config's setup commands there (the checkout
uploaded with rsync, ``pip install -e``, the MLflow server on the head's address, ``ray
start --head`` with token authentication), and ``ray submit`` runs
``experiments/ray_submit.py -- stpp run ... --until 2`` on that head: ST++ at tiny size on
the launched cluster up to the reliability ranking (a Ray Train training and Ray Data actor
pools, the two kinds of work every later stage repeats; the seven stages run end to end in
tests/test_stpp.py and, on a multi-node cluster, tests/test_multinode.py), logged to the
head's MLflow server.

What the test provides is the machine, not the cluster: an account ``cellst-ci`` with an SSH
key, and, so that the setup commands do not download gigabytes, a ``~/venv`` that sees this
environment's packages (a ``.pth`` file; ``pip install -e ~/cellst`` still runs). The account
is not root on purpose: ``ray up`` and ``ray down`` run ``ray stop``, which ends every Ray
process its user may signal, and this session's own cluster must survive. Its environment
(``~/.cellst_env``) moves what would collide with this session's cluster: Ray's temp folder,
the dashboard agent's port, the MLflow port and the shared folder (``cluster.yaml``'s knobs).
``make test`` installs openssh-server, rsync and python3.11 with apt (``make test-host``).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cellst.data.store import CellStore
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
USER = "cellst-ci"
SSHD = "/usr/sbin/sshd"

pytestmark = pytest.mark.slow


def _sh(*cmd: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _as_user(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return _sh("su", "-", USER, "-c", script, timeout=timeout)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _head_ip() -> str:
    """The address the head's setup commands bind MLflow to (``hostname -I``, first)."""
    return _sh("hostname", "-I").stdout.split()[0]


def _require_host() -> None:
    """The machine parts ``make test-host`` installs; one clear failure if absent."""
    missing = [p for p in (SSHD, "/usr/bin/rsync", "/usr/bin/python3.11") if not Path(p).exists()]
    if os.geteuid() != 0 or missing:
        pytest.fail(
            f"the launcher test needs root and {missing or 'sshd, rsync, python3.11'}: run "
            "`make test-host` (apt-get install openssh-server rsync python3.11) as root"
        )


def _open_traversal(path: Path) -> list[tuple[Path, int]]:
    """Let other users pass through ``path``'s folders (never read them): the account must
    reach this environment's packages, wherever the checkout lies. The modes it changed."""
    changed = []
    for folder in reversed(path.parents):
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
            changed.append((folder, mode))
    return changed


def _provision_user(home: Path, site: str, shared: Path, key: Path, ports: dict[str, int]) -> None:
    """The account the launcher logs in as: key, environment, and a venv over this one's
    packages (``site``)."""
    try:
        pwd.getpwnam(USER)
    except KeyError:
        _sh("useradd", "-m", "-s", "/bin/bash", USER).check_returncode()
    env = {
        "RAY_TMPDIR": f"{home}/.raytmp",
        "CELLST_SHARED": str(shared),
        "CELLST_MLFLOW_PORT": str(ports["mlflow"]),
        "RAY_DASHBOARD_AGENT_LISTEN_PORT": str(ports["agent"]),
    }
    lines = "".join(f"export {k}={v}\n" for k, v in env.items())
    script = f"""
set -e
umask 022
mkdir -p ~/.ssh ~/.raytmp && chmod 700 ~/.ssh
cat > ~/.ssh/authorized_keys <<'EOF'
{key.with_suffix(".pub").read_text().strip()}
EOF
chmod 600 ~/.ssh/authorized_keys
cat > ~/.cellst_env <<'EOF'
{lines}EOF
grep -q cellst_env ~/.bashrc || sed -i '1i . ~/.cellst_env' ~/.bashrc
test -x ~/venv/bin/python || python3.11 -m venv --without-pip ~/venv
echo {site} > ~/venv/lib/python3.11/site-packages/cellst-host-env.pth
for tool in ray mlflow; do
  (echo "#!$HOME/venv/bin/python"; tail -n +2 {Path(sys.executable).parent}/$tool) > ~/venv/bin/$tool
  chmod 755 ~/venv/bin/$tool
done
~/venv/bin/python -c 'import ray, torch, mlflow'
"""
    res = _as_user(script)
    assert res.returncode == 0, (
        f"could not set up {USER} (can it read {site}?):\n{res.stdout}\n{res.stderr}"
    )


@pytest.fixture(scope="module")
def launched(ray_session, tmp_path_factory):
    """``ray up -y`` with cluster-local.yaml (its auth pointed at the test account); the
    config path, the launcher's environment, the account's shared folder and MLflow port. ``ray down``,
    and every process of the account ended, afterwards."""
    _require_host()
    tmp = tmp_path_factory.mktemp("rayup")
    key = tmp / "id_cellst"
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)).check_returncode()
    shared = Path(tempfile.mkdtemp(prefix="cellst-shared-", dir="/tmp"))
    shared.chmod(0o777)
    home = Path(f"/home/{USER}")
    site = sysconfig.get_paths()["purelib"]  # this environment's packages
    config = tmp / "cluster-local.yaml"  # (file_mounts' "." is the launcher's folder: ROOT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env["RAY_TMPDIR"] = str(tmp)  # the launcher's own state, not in /tmp/ray
    opened = _open_traversal(Path(site))
    sshd = None
    try:
        ports = {"mlflow": free_port(), "agent": free_port()}
        _provision_user(home, site, shared, key, ports)
        if not _listening(22):
            Path("/run/sshd").mkdir(exist_ok=True)
            _sh("ssh-keygen", "-A").check_returncode()
            sshd = subprocess.Popen([SSHD, "-D", "-o", "ListenAddress=127.0.0.1"])
            deadline = time.time() + 30
            while not _listening(22) and time.time() < deadline:
                time.sleep(0.2)
        cfg = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())
        cfg["auth"] = {"ssh_user": USER, "ssh_private_key": str(key)}
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        up = _sh(RAY, "up", "-y", str(config), timeout=900, env=env, cwd=ROOT)
        assert up.returncode == 0, (up.stdout + up.stderr)[-5000:]
        yield config, env, shared, ports["mlflow"]
    finally:
        if config.is_file():
            _sh(RAY, "down", "-y", str(config), timeout=300, env=env, cwd=ROOT)
        _sh("pkill", "-KILL", "-u", USER)  # the MLflow server `ray down` leaves running
        if sshd is not None:
            sshd.kill()
            sshd.wait()
        shutil.rmtree(shared, ignore_errors=True)
        for folder, mode in opened:
            folder.chmod(mode)


def test_ray_submit_runs_stpp_on_the_launched_cluster(launched):
    """``ray submit cluster-local.yaml experiments/ray_submit.py -- stpp run ...`` as in the
    README, up to stage 2 (``--until 2``: the supervised training and the snapshots'
    predictions) on the launched cluster, its runs on the head's MLflow server, every node
    holding the token of the machine that launched it."""
    from cellst.data.ingest import ingest
    from cellst.data.synth import synthesize_dataset

    config, env, shared, mlflow_port = launched
    synthesize_dataset(shared / "src", 5, 2, 1, seed=11, min_size=96, max_size=128,
                       progress=False)  # fmt: skip
    ingest(shared / "src", shared / "store", progress=False)
    _sh("chmod", "-R", "a+rwX", str(shared)).check_returncode()
    # (a path relative to the checkout, as on the launching machine: ray_submit.py runs
    # the command in the uploaded ~/cellst)
    args = ["stpp", "run", "experiments/demo.yaml", "--quick", "--until", "2"]
    # (`ray submit` joins the arguments with spaces, unquoted: no spaces inside a value)
    settings = [
        f"store={shared / 'store'}",
        f"stpp.run_dir={shared / 'stpp'}",
        "name=launched",
        "data.crops_per_epoch=16",
        "data.crop_size=64",
        "train.val_max_items=1",
        "train.snapshot_fractions=[0.5,1.0]",
        "stpp.retrain_epochs=2",
        "inference.roi=64",
        "tracking.system_metrics=false",
        # training and prediction in the job's driver: what this test checks is the launch
        # and the submission; Ray Train workers and actor pools on nodes are
        # test_multinode.py's (each worker or pool start costs 10-25 s of these two cores)
        "train.num_workers=0",
        "predict.num_actors=0",
    ]
    for o in settings:
        args += ["--set", o]
    sub = _sh(
        RAY, "submit", str(config), "experiments/ray_submit.py", "--", *args,
        timeout=900, env=env, cwd=ROOT,
    )  # fmt: skip
    out = sub.stdout + sub.stderr
    assert sub.returncode == 0, out[-5000:]
    pipe = shared / "stpp" / "launched"
    assert "stopped after stage 2/7 reliability, as asked (--until)" in out, out[-5000:]
    records = sorted((pipe / "stages").glob("*.json"))
    stages = [json.loads(p.read_text()) for p in records]
    assert [(s["name"], s["status"]) for s in stages] == [
        ("supervised", "done"),
        ("reliability", "done"),
    ], stages
    scores = pd.read_csv(pipe / "reliability" / "scores.csv")  # every unlabelled item ranked
    assert sorted(scores["id"]) == sorted(CellStore(shared / "store", lease=False).ids("unlabeled"))
    # the pipeline ran as the SSH user, on the cluster that `ray up` started
    assert pwd.getpwuid(records[-1].stat().st_uid).pw_name == USER
    # MLflow: the head's server (on its own address, not loopback) holds the parent run
    from mlflow.tracking import MlflowClient

    meta = json.loads((pipe / "pipeline.json").read_text())
    tracking = meta["tracking_uri"]
    assert tracking == f"http://{_head_ip()}:{mlflow_port}", tracking
    parent = MlflowClient(tracking).get_run(meta["parent_run_id"])
    assert parent.info.status == "FINISHED", parent.info
    assert parent.data.tags["cellst.stpp.stopped_after"] == "2_reliability"
    # ... and runs without MLflow's job runner (its huey consumers: ~1.8 GiB on the head)
    server = _sh("pgrep", "-u", USER, "-f", "mlflow server")
    assert server.returncode == 0, "the head's MLflow server is not running"
    runner = _sh("pgrep", "-u", USER, "-f", "huey_consumer")
    assert runner.returncode == 1, f"MLflow's job runner runs on the head: {runner.stdout}"
    # the token: the launching machine's, shipped by file_mounts
    token = Path.home() / ".ray" / "auth_token"
    assert (Path(f"/home/{USER}") / ".ray" / "auth_token").read_text() == token.read_text()
