"""Shared fixtures: one real local Ray instance per session, and real synthetic data on disk."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# A suite started as a background job of a non-interactive shell (`make test &`, nohup,
# some CI runners) inherits SIGINT *ignored*, and so would every command a test starts:
# Python keeps an ignored SIGINT ignored, and the Ctrl-C tests would see their interrupt
# vanish. Give this process, and through it the commands, the terminal's default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: fixtures that start a Ray cluster, a training or a server: a test using any of them is
#: marked ``slow`` (``make test-fast`` leaves those out; ``make test`` runs everything)
SLOW_FIXTURES = {
    "ray_session",
    "store_dir",
    "learn_store",
    "mlflow_server",
    "mlflow_server_process",
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: needs a Ray cluster, a training, an ST++ pipeline, a sweep, a server or a "
        "subprocess cluster (set automatically from the fixtures a test uses)",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster with 2 CPUs, shared by every test of the session."""
    import ray

    from cellst.raycluster import job_runtime_env, local_system_config, quiet_ray_data

    if not ray.is_initialized():
        ray.init(
            address="local",  # the session's own cluster, never another one on the machine
            num_cpus=2,
            include_dashboard=False,
            logging_level="ERROR",
            runtime_env=job_runtime_env(),  # as every cellst command's job
            _system_config=local_system_config(2),  # as a cluster cellst starts itself
        )
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


@pytest.fixture(scope="session")
def quick_train():
    """``quick_train(model, store, ids, steps)``: a few Adam steps on random flipped crops of
    ``ids``, in this process (no Ray): the quickest way to a real model that finds cells."""
    import numpy as np
    import torch

    from cellst.model import HoVerLoss, make_targets

    def run(model, store, ids, steps: int, crop: int = 96, batch: int = 8):
        rng = np.random.default_rng(0)
        images = [store.image(i) for i in ids]
        labels = [store.label(i) for i in ids]
        loss_fn = HoVerLoss()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            xs, ys = [], []
            for _ in range(batch):
                k = rng.integers(len(images))
                y0 = rng.integers(images[k].shape[0] - crop + 1)
                x0 = rng.integers(images[k].shape[1] - crop + 1)
                im = images[k][y0 : y0 + crop, x0 : x0 + crop]
                lab = labels[k][y0 : y0 + crop, x0 : x0 + crop]
                if rng.random() < 0.5:
                    im, lab = im[:, ::-1], lab[:, ::-1]
                xs.append(np.ascontiguousarray(im))
                ys.append(np.ascontiguousarray(lab))
            x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255
            opt.zero_grad()
            loss_fn(model(x), make_targets(torch.from_numpy(np.stack(ys))))["loss"].backward()
            opt.step()
        model.eval()
        return model

    return run


def store_of_a_declared_and_a_plain_pixel_size(folder: Path) -> Path:
    """A store of two 48 x 48 images: ``a`` from an OME-TIFF declaring 0.5 um pixels,
    ``b`` from a TIFF declaring none (``folder/src`` ingested into ``folder/store``)."""
    import numpy as np
    import tifffile

    from cellst.data.ingest import ingest

    src = folder / "src"
    src.mkdir()
    arr = np.full((48, 48), 7, np.uint16)
    tifffile.imwrite(src / "a.ome.tif", arr, ome=True,
                     metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})  # fmt: skip
    tifffile.imwrite(src / "b.tif", arr)
    ingest(src, folder / "store", progress=False)
    return folder / "store"


def kill_group_when(proc: subprocess.Popen, ready, timeout: float, poll: float = 0.05) -> bool:
    """SIGKILL the process group of ``proc`` (started with ``start_new_session=True``) once
    ``ready()`` holds, or when ``timeout`` seconds have passed; whether it was still running
    then (False: it ended first). Waits for it either way."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(poll)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed


def held_in_another_process(imports: str, context: str) -> subprocess.Popen:
    """Another process inside ``with CONTEXT:`` (after ``IMPORTS``) until its stdin closes:
    a lock another run holds. Returns once it holds it; ``proc.communicate("")`` ends it."""
    code = f"import sys\n{imports}\nwith {context}:\n    print('held', flush=True)\n    sys.stdin.read()\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, proxied artifacts) that a test
    can kill by PID and restart on the same port and backend store."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, free_port(), None
        folder.mkdir(parents=True, exist_ok=True)
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # MLflow 3.17 otherwise starts a job runner with ~7 huey consumers (~1 GB RSS)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with open(self.folder / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("mlflow")),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{self.folder / 'srv.db'}",
                    "--artifacts-destination",
                    str(self.folder / "art"),
                ],
                cwd=self.folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow server not healthy:\n{self.log()}")
            time.sleep(0.3)

    def log(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """SIGKILL by PID (the server and its uvicorn worker: one process group)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # the worker process may outlive the group leader for a moment
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)


@pytest.fixture
def mlflow_server(tmp_path):
    """A running :class:`MlflowServer`; yields ``(url, folder)`` and kills it afterwards."""
    srv = MlflowServer(tmp_path / "server").start()
    try:
        yield srv.uri, srv.folder
    finally:
        srv.kill()


@pytest.fixture
def mlflow_server_process(tmp_path):
    """An :class:`MlflowServer` not yet started (``.start()``, ``.kill()``, restart)."""
    srv = MlflowServer(tmp_path / "server")
    yield srv
    srv.kill()
