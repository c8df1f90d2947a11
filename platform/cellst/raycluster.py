"""Connecting to Ray the same way from the CLI, from ``ray submit`` scripts and from tests."""

from __future__ import annotations

import logging
import math
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray

from cellst._monai_import import FULL_IMPORT_ENV, skip_monai_extras


class ClusterError(RuntimeError):
    """A request the Ray cluster can never satisfy (GPUs or CPUs it lacks); one line, exit 1."""


def alive_node_resources() -> list[dict[str, float]]:
    """The resources of each alive node of the connected Ray cluster (``CPU``, ``GPU``...),
    read at once, so that a node's CPUs and GPUs are counted together."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def own_node_cpus() -> float:
    """The CPUs Ray schedules on the node this process runs on (0 on a head started with
    none, as in ``cluster.yaml``)."""
    me = ray.get_runtime_context().get_node_id()
    return sum(float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("NodeID") == me)


def actors_per_node(node_gpus: Iterable[float], gpus_per_actor: float) -> list[int]:
    """How many actors of ``gpus_per_actor`` GPUs each node can hold by its GPUs."""
    return [math.floor(g / gpus_per_actor + 1e-9) for g in node_gpus]


def cpus_per_actor(
    node_cpus: Iterable[float],
    n_actors: int,
    requested: float,
    reserve: float,
    max_per_node: Iterable[int] | None = None,
) -> float:
    """The largest CPU share per actor, at most ``requested``, that places ``n_actors``
    actors on the nodes while every node keeps ``reserve`` CPUs for the other stages.

    Fitting against the cluster's total fails on several nodes: two 1-CPU nodes, two actors
    and a 0.25-CPU read stage gave 0.88 CPUs per actor by the total, leaving 0.12 on each
    node, so the reads could never run. Reasoning per node gives 0.75 there.

    ``max_per_node`` caps the actors of each node (GPU actors: :func:`actors_per_node`), so
    that CPUs of a node that cannot hold one count for nothing: an 8-CPU node without a GPU
    beside a 1-CPU GPU node fitted 2 CPUs per GPU actor, which the GPU node could not place.

    Returns
    -------
    float
        The share, or 0.0 if not even a sliver per actor fits.
    """
    cpus = list(node_cpus)
    limits = list(max_per_node) if max_per_node is not None else [n_actors] * len(cpus)
    caps = [(c - reserve, m) for c, m in zip(cpus, limits, strict=True) if c - reserve > 1e-9]
    caps = [(c, m) for c, m in caps if m > 0]
    if not caps or n_actors < 1:
        return 0.0

    def fits(share: float) -> bool:
        return sum(min(math.floor(c / share + 1e-9), m) for c, m in caps) >= n_actors

    if fits(requested):
        return float(requested)
    # the best share divides some node's capacity exactly: try those, largest first
    for share in sorted({c / k for c, _ in caps for k in range(1, n_actors + 1)}, reverse=True):
        if share < requested and fits(share):
            return share
    return 0.0


def elastic_cpus_per_actor(
    node_cpus: Iterable[float],
    n_actors: int,
    requested: float,
    reserve: float,
    max_per_node: Iterable[int] | None = None,
) -> float:
    """A CPU share per actor, as near ``requested`` as can be (above it first), at which as
    many actors as Ray packs on any node still leave that node ``reserve`` CPUs.

    Ray Train's elastic policy sizes a restarted worker group by counting the workers each
    node's resources hold (``floor(cpus / share)``, capped by ``max_per_node``), not the
    read-and-augment tasks beside them: two workers of 1 CPU on the one 2-CPU node left
    after a loss took both CPUs, and the stream that feeds them never ran again. At 1.5
    CPUs per worker that node holds one worker and one read task of 0.5.

    Returns
    -------
    float
        The share, or 0.0 if none places ``n_actors`` actors so.
    """
    cpus = list(node_cpus)
    limits = list(max_per_node) if max_per_node is not None else [n_actors] * len(cpus)

    def packed(c: float, m: int, share: float) -> int:
        return min(math.floor(c / share + 1e-9), m)

    def fits(share: float) -> bool:
        held = [(c, packed(c, m, share)) for c, m in zip(cpus, limits, strict=True)]
        left_ok = all(c - k * share >= reserve - 1e-9 for c, k in held if k > 0)
        return left_ok and sum(k for _, k in held) >= n_actors

    options = {float(requested)} | {
        (c - reserve) / k for c in cpus for k in range(1, n_actors + 1) if c - reserve > 1e-9
    }
    above = sorted(s for s in options if s >= requested and fits(s))
    if above:
        return above[0]
    below = sorted((s for s in options if s < requested and fits(s)), reverse=True)
    return below[0] if below else 0.0


def stream_cpus(total: float, driver_node: float, driver_cpus: float, minimum: float) -> float:
    """The CPUs a stream may use beside a computation in the driver process.

    ``total``: the cluster's CPUs; ``driver_node``: those Ray schedules on the driver's node;
    ``driver_cpus``: the threads the driver computes on. Only the driver's own node is
    shared with it: on a head that gives Ray no CPUs (``cluster.yaml``) nothing is taken
    from the stream, which the cluster's total had held back by the driver's threads.
    """
    return max(minimum, total - min(driver_cpus, driver_node))


def leave_cpus_to_driver(dataset: Any, driver_cpus: float, minimum: float) -> float:
    """Keep ``dataset``'s tasks off the CPUs this process computes on outside Ray.

    A training or prediction in the driver (``train.num_workers=0``,
    ``predict.num_actors=0``) steps on ``driver_cpus`` threads that Ray does not count;
    without a limit the stream's read tasks would take every CPU and slow it down.

    Returns
    -------
    float
        The CPUs left to the stream (:func:`stream_cpus`).
    """
    from ray.data import ExecutionResources

    total = ray.cluster_resources().get("CPU", 0)
    free = stream_cpus(total, own_node_cpus(), driver_cpus, minimum)
    dataset.context.execution_options.resource_limits = ExecutionResources.for_limits(cpu=free)
    return free


def verbose() -> bool:
    """Whether ``CELLST_VERBOSE=1`` asks for Ray's and MLflow's INFO logs in the terminal."""
    return os.environ.get("CELLST_VERBOSE", "0") == "1"


def train_log_level() -> str:
    """Console level of Ray Train's own logs (per-report and checkpoint lines are INFO)."""
    return "INFO" if verbose() else "WARNING"


#: Ray Train's file whose module logger (named after the file path) prints per-report lines
TRAIN_CONTEXT_FILE = "train/v2/_internal/execution/context.py"

#: Ray's own INFO/WARNING lines that say nothing a cellst user can act on, by logger name
NOISY_LOGGERS = {
    # Train V2 re-checks its controller every second through the state API, which needs
    # the dashboard (ray[default]); without it every check warns
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "ray.data": logging.WARNING,
    # cellst turns Ray Data's progress bars off on purpose (it draws its own); Ray warns
    "ray.data._internal.progress": logging.ERROR,
    # local-mode training (train.num_workers=0) runs in this process: Ray Train's INFO
    # lines (local mode, the device, every report's whole metrics dict) would land here
    "ray.train.v2.api.config": logging.WARNING,
    "ray.train.v2._internal.execution.train_fn_utils": logging.WARNING,
    "ray.train.torch.train_loop_utils": logging.WARNING,
}


def _train_context_logger() -> str:
    """Name of the logger of Ray Train's per-report INFO lines (named after its file).

    Found from ``ray``'s own location: importing ``ray.train`` here would cost every Ray
    worker process about 0.9 s of CPU (it pulls in pandas), since this runs in all of them
    as part of the setup hook of :func:`job_runtime_env`.
    """
    import importlib.util

    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / TRAIN_CONTEXT_FILE
    return str(path) if path.is_file() else ""


#: the errors of a worker group that found no room: Ray Train's try that timed out
#: (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``), and cellst's limit on an elastic group's
#: wait (:class:`cellst.train.elastic_wait.NodeWaitExceeded`)
NO_ROOM_ERRORS = frozenset({"WorkerGroupStartupTimeoutError", "NodeWaitExceeded"})


def found_no_room(exc: BaseException) -> bool:
    """Whether ``exc`` is, or wraps, one of :data:`NO_ROOM_ERRORS`: the worker group could
    not be placed within ``train.node_wait_s``."""
    return no_room_cause(exc) is not None


def no_room_cause(exc: BaseException) -> BaseException | None:
    """The error of :data:`NO_ROOM_ERRORS` that ``exc`` is or wraps, else None. Told by
    class name: Ray Train's class is private, and this module is imported where Ray Train
    is not."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if any(c.__name__ in NO_ROOM_ERRORS for c in type(cur).__mro__):
            return cur
        cur = getattr(cur, "controller_failure", None) or cur.__cause__ or cur.__context__
    return None


class _NoRoomYet(logging.Filter):
    """Ray Train's controller logs each timed-out wait for room for its worker group, and
    the error of cellst's limit on an elastic group's wait, as an unexpected error with a
    traceback. cellst expects both (``train.node_wait_s``), so the record becomes one plain
    line; any other record passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        cause = no_room_cause(record.exc_info[1]) if record.exc_info else None
        if cause is not None:
            record.msg = (
                f"{cause}; cellst stops the training"
                if type(cause).__name__ == "NodeWaitExceeded"
                else "no room on the cluster for the training workers yet (a lost node?); "
                "Ray Train tries again, and cellst stops the training after train.node_wait_s"
            )
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


#: Ray Train's loggers of the controller's errors: its control loop's, and its callbacks'
TRAIN_CONTROLLER_LOGGERS = (
    "ray.train.v2._internal.execution.controller.controller",
    "ray.train.v2._internal.execution.callback_manager",
)


def quiet_logs() -> None:
    """Lower Ray's chatty loggers in this process (unless ``CELLST_VERBOSE=1``)."""
    if verbose():
        return
    for name, level in {**NOISY_LOGGERS, _train_context_logger(): logging.WARNING}.items():
        if name:
            logging.getLogger(name).setLevel(level)
    for name in TRAIN_CONTROLLER_LOGGERS:
        controller = logging.getLogger(name)
        if not any(isinstance(f, _NoRoomYet) for f in controller.filters):
            controller.addFilter(_NoRoomYet())
    import warnings

    warnings.filterwarnings("ignore", message=".*exclude_resources.*is deprecated")


#: how often Ray Train's controller polls its workers (Ray's default: 2 s). The controller
#: notices a finished or failed worker group only at a poll, and a run ends after a few of
#: them, so with Ray's default every training returned about 5 s after its last step
#: (measured on a 1-worker run: 5.7 s at 2 s, 0.4 s at 0.2 s). A poll is one tiny actor
#: call per worker; a hanging one is only declared dead after Ray's own 10 minutes.
TRAIN_POLL_INTERVAL_S = "0.25"
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def job_runtime_env() -> dict[str, Any]:
    """Runtime environment of every cellst job: quiet worker processes (see
    :func:`quiet_logs`; their INFO lines stay in ``/tmp/ray/session_latest/logs``), Ray
    Train's poll interval (:data:`TRAIN_POLL_INTERVAL_S`, or the caller's own
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), and the caller's ``CELLST_FULL_MONAI_IMPORT``
    where it is set (see :mod:`cellst._monai_import`)."""
    env = {TRAIN_POLL_ENV: os.environ.get(TRAIN_POLL_ENV, TRAIN_POLL_INTERVAL_S)}
    env.update({"CELLST_VERBOSE": "1"} if verbose() else {"RAY_DATA_LOG_LEVEL": "WARNING"})
    if FULL_IMPORT_ENV in os.environ:  # the driver's choice holds on every node
        env[FULL_IMPORT_ENV] = os.environ[FULL_IMPORT_ENV]
    return {"env_vars": env, "worker_process_setup_hook": "cellst.raycluster.setup_worker"}


def setup_worker() -> None:
    """Setup hook of every worker process of a cellst job: :func:`pin_cluster_address`,
    :func:`quiet_logs`, and MONAI's import without its unused extras
    (:func:`cellst._monai_import.skip_monai_extras`)."""
    pin_cluster_address()
    quiet_logs()
    skip_monai_extras()


def pin_cluster_address() -> None:
    """Set ``RAY_ADDRESS`` in this worker process to the cluster it belongs to.

    Ray's address lookups without an address (Ray Train's ``PlacementGroupCleaner`` asks the
    state API about its controller that way, every second) look for the Ray instances on
    this machine, and fail when there are several: two cellst commands each with a local
    cluster, or a multi-node cluster started on one machine. The helper's thread then died
    with a ``ConnectionError`` traceback in the user's terminal, and with it the clean-up of
    a crashed run's placement group.
    """
    try:
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception:  # not connected (never in a Ray worker): nothing to pin
        pass


#: idle worker processes a cluster on one machine keeps for its jobs to reuse. Ray keeps
#: one per CPU and ends the rest after a second, so on a small machine each stage of a run
#: started fresh processes that import torch and MONAI again (measured on a ``--quick``
#: ST++ run on 2 CPUs: 286 -> 204 CPU-s and 179 -> 139 s with 6; about 2 GiB of RSS held
#: by idle workers). Ray's own default where it is larger (a machine with more CPUs).
MIN_IDLE_WORKERS = 6


def local_system_config(num_cpus: int | None = None) -> dict[str, int]:
    """Ray system config (``_system_config``) of a cluster started on this machine alone:
    at least :data:`MIN_IDLE_WORKERS` idle worker processes kept for reuse."""
    cpus = num_cpus or os.cpu_count() or 1
    return {"num_workers_soft_limit": max(int(cpus), MIN_IDLE_WORKERS)}


def check_answers(address: str | None, timeout_s: float = 5.0) -> None:
    """Raise :class:`ClusterError` at once if nothing listens at a ``host:port`` (or
    ``ray://host:port``) Ray address (``auto``: the ``RAY_ADDRESS`` it means).

    ``ray.init`` given the address of a cluster that is gone retries its connection for
    ever, printing a warning every few seconds: a typo in ``--ray-address`` or a stale
    ``RAY_ADDRESS`` hung the command. ``None``, ``"local"``, ``"auto"`` without
    ``RAY_ADDRESS`` (they fail fast by themselves) and Ray's other client schemes are left
    to Ray.
    """
    if address == "auto":  # ray.init("auto") joins RAY_ADDRESS where it is set
        address = os.environ.get("RAY_ADDRESS")
    if not address or address in ("local", "auto"):
        return
    scheme, _, hostport = address.rpartition("://")
    if scheme not in ("", "ray"):
        return  # another Ray client scheme (``anyscale://``, ``module://``): Ray's own
    host, _, port = hostport.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"the Ray address {address!r} (--ray-address / RAY_ADDRESS) is not HOST:PORT"
        )
    import socket

    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ClusterError(
            f"no Ray cluster answers at {address} (--ray-address / RAY_ADDRESS): {reason}"
        ) from None


def recorded_cluster() -> str | None:
    """The address of the cluster last started on this machine (``ray start``), as Ray
    records it for ``ray.init()`` to join (``/tmp/ray/ray_current_cluster``); None if none."""
    try:
        from ray._private.services import find_bootstrap_address

        return find_bootstrap_address(None) or None
    except Exception:  # Ray's private helper moved or the record is unreadable: none
        return None


def recorded_cluster_answers(timeout_s: float = 2.0) -> bool:
    """Whether ``ray.init()`` with no address has a live cluster to join: True where none is
    recorded (it starts one) or the recorded one answers.

    A cluster whose head was killed leaves its record behind, and ``ray.init()`` then
    retried the dead address for ever ("Failed to connect to GCS"): every later cellst
    command on the machine hung. Where the record is stale, a note says so and the command
    starts a local cluster of its own instead.
    """
    last = recorded_cluster()
    if last is None:
        return True
    try:
        check_answers(last, timeout_s=timeout_s)
    except ClusterError:
        print(
            f"note: the Ray cluster last started on this machine ({last}) does not answer "
            "any more: starting a local one for this command (set RAY_ADDRESS or "
            "--ray-address to join another)",
            file=sys.stderr,
        )
        return False
    return True


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process.

    An explicit ``address`` (or ``RAY_ADDRESS``) joins that cluster; otherwise Ray joins the
    cluster last started on this machine (as on the head node under ``ray submit``) where
    it still answers (:func:`recorded_cluster_answers`), or starts a local one with
    ``num_cpus`` CPUs. A local cluster started here is stopped when
    this process ends, even by SIGKILL (:func:`cellst.reaper.watch_local_cluster`).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None and not recorded_cluster_answers():
        address = "local"  # ray.init(None) would wait for the dead one for ever
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    kwargs["runtime_env"] = job_runtime_env()
    if address in (None, "local") and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    # a local cluster started here lives as long as this command: no dashboard process
    # (ignored when joining a running cluster, which keeps its own)
    kwargs["include_dashboard"] = False
    check_answers(address)
    if address in (None, "local"):
        # read by the raylet if this call starts one (ray.init takes no _system_config when
        # it joins the cluster last started here); the caller's own setting wins
        for key, value in local_system_config(num_cpus).items():
            os.environ.setdefault(f"RAY_{key}", str(value))
    ray.init(address=address, **kwargs)
    interrupt_on_sigterm()
    quiet_ray_data()
    from cellst.reaper import watch_local_cluster

    watch_local_cluster()


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill PID``, a scheduler's stop), taken as Ctrl-C."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def interrupt_on_sigterm() -> None:
    """Make SIGTERM stop a command the way Ctrl-C does (:class:`Terminated`, a
    ``KeyboardInterrupt``): what runs is recorded as interrupted, and the command ends in
    one line with exit 130. ``ray.init`` installs a handler that calls ``sys.exit``, which
    unwound through running stages as a ``SystemExit`` and was recorded as a failure with
    Ray's tracebacks. Only in the main thread (where Python runs signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def quiet_ray_data() -> None:
    """Keep Ray Data's per-dataset INFO logs and progress bars out of the terminal.

    cellst draws its own progress bars; set ``CELLST_RAY_PROGRESS=1`` to see Ray's, and
    ``CELLST_VERBOSE=1`` for Ray's INFO logs as well.
    """
    shown = os.environ.get("CELLST_RAY_PROGRESS", "0") == "1" or verbose()
    ray.data.DataContext.get_current().enable_progress_bars = shown
    if not shown:
        quiet_logs()


def as_completed(
    refs: Iterable[ray.ObjectRef], on_crash: Callable[[int, Exception], Any] | None = None
) -> Iterator[Any]:
    """Yield task results in completion order (for progress bars).

    ``on_crash(i, exc)``, where given, stands in for the result of ``refs[i]`` whose
    process died past its retries (``WorkerCrashedError``: a segfault in native code;
    ``OutOfMemoryError``: Ray's memory monitor killed it), so one bad input is reported
    with the others instead of ending the whole job with a traceback.
    """
    pending = list(refs)
    index = {ref: i for i, ref in enumerate(pending)}
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            result = ray.get(done[0])
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as exc:
            if on_crash is None:
                raise
            result = on_crash(index[done[0]], exc)
        yield result


#: the hidden file :func:`check_shared_paths` leaves in each write folder while it checks
SHARED_MARKER = ".cellst-shared-{token}"


def _probe_paths(read: list[str], write: list[str], token: str) -> list[str]:
    """On one node: what is wrong with the paths there (empty when all is well).

    A write folder must exist here and hold the driver's marker file (``token``): only
    then is it the driver's folder, not one of the same name on this node's own disk.
    Nothing is created (an ``mkdir`` here made a node without the shared mount pass, and
    its results then went to its local disk); the write check leaves no file behind.
    """
    from cellst.fs import unwritable_reason

    problems = []
    for p in map(pathlib.Path, read):
        if not p.exists():
            problems.append(f"{p} is not visible")
    for p in map(pathlib.Path, write):
        if not p.is_dir():
            problems.append(f"{p} is not visible")
            continue
        if not (p / SHARED_MARKER.format(token=token)).is_file():
            problems.append(f"{p} is another folder than the driver's (it lacks its marker)")
            continue
        reason = unwritable_reason(p)
        if reason:
            problems.append(reason)
    return problems


def check_shared_paths(
    read: Iterable[str | os.PathLike[str]] = (),
    write: Iterable[str | os.PathLike[str]] = (),
    timeout_s: float = 120.0,
) -> list[str]:
    """Check, before any work, that every node of the cluster sees the paths cellst's Ray
    tasks and workers will use: ``read`` must exist there; ``write`` (created here if
    needed) must be this folder, seen through a shared file system: a marker file left in
    it for the check must be visible there, and it must be writable.

    A cluster without shared storage would otherwise fail deep inside a stage (or, worse,
    write half of the results to a node's local disk). One zero-CPU task runs on each alive
    node. On a single node that is the driver's own, nothing is checked (same file system).

    Returns
    -------
    list of str
        The IDs of the nodes checked (empty when the check was skipped).

    Raises
    ------
    ClusterError
        Naming the first node (address and ID) and path that failed.
    """

    read = [str(os.path.abspath(p)) for p in read]
    write = [str(os.path.abspath(p)) for p in write]
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    if not (read or write) or (len(nodes) == 1 and nodes[0]["NodeID"] == here):
        return []
    token = f"{os.getpid()}-{time.time_ns()}"
    markers = []
    try:
        for folder in map(pathlib.Path, write):  # made here, marked: the nodes must see it
            folder.mkdir(parents=True, exist_ok=True)
            marker = folder / SHARED_MARKER.format(token=token)
            marker.touch()
            markers.append(marker)
        return _probe_nodes(nodes, read, write, token, timeout_s)
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)


def _probe_nodes(
    nodes: list[dict], read: list[str], write: list[str], token: str, timeout_s: float
) -> list[str]:
    """Run :func:`_probe_paths` on each of ``nodes``; the IDs of the nodes checked."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_paths)
    refs = [
        probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(read, write, token)
        for n in nodes
    ]
    deadline = time.monotonic() + timeout_s
    checked = []
    for node, ref in zip(nodes, refs, strict=True):
        try:
            problems = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(
                f"the storage check did not finish on every node within {timeout_s:.0f} s"
            ) from None
        except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError):
            # the node left the cluster (the GCS may still list it as alive for a few
            # seconds after it was lost): nothing will run there, so nothing to check
            logging.getLogger(__name__).warning(
                "node %s left the cluster during the storage check; skipped", node["NodeID"][:12]
            )
            continue
        except ray.exceptions.RayError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ClusterError(f"the storage check failed on a node: {first}") from None
        if problems:
            raise ClusterError(
                f"node {node.get('NodeManagerAddress', '?')} ({node['NodeID'][:12]}): "
                f"{problems[0]}; every node must share the store and run folders (a network "
                "file system mounted at the same path on each node)"
            )
        checked.append(node["NodeID"])
    return checked
