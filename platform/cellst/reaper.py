"""Stop what is left of a local Ray cluster when the cellst process that started it dies.

Ray ties the GCS server and the raylet of a local cluster to the driver that started them
(``PR_SET_PDEATHSIG``), and on an exception, Ctrl-C or SIGTERM the driver shuts the cluster
down itself. A SIGKILL (or the kernel's OOM killer) cannot be caught, and after one the
raylet's agents (dashboard agent, runtime-env agent) outlive the driver by about a minute:
they report the raylet's death to the dead GCS server with a 60 s timeout
(``ray._private.process_watcher``).

:func:`watch_local_cluster` starts a small separate process (this module, about 15 MB; it
imports only psutil) that waits for the driver to end, then terminates the processes the
driver had started. It knows them by pid *and* start time, refreshed every
:data:`REFRESH_S` while the driver lives, so a reused pid is never touched. It learns of
the driver's end from a pipe only the driver holds (EOF on any death), or at the latest
at the next refresh.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys

#: seconds between two looks at the driver's processes
REFRESH_S = 10.0
#: seconds a process has to exit after SIGTERM before it gets SIGKILL
GRACE_S = 3.0

_started: list[int] = []  # the write end of the pipe, held open for this process's life


def watch_local_cluster() -> subprocess.Popen | None:
    """Start the watcher if this process started the local Ray cluster it is connected to.

    Returns the watcher process, or None when there is nothing to watch (Ray joined an
    existing cluster, or the watcher already runs).
    """
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    started_here = node is not None and "gcs_server" in getattr(node, "all_processes", {})
    if _started or not started_here:
        return None
    read_end, write_end = os.pipe()  # not inherited by the processes Ray spawns
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cellst.reaper", str(os.getpid()), str(read_end)],
            pass_fds=(read_end,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C or hang-up of the terminal does not stop it
        )
    finally:
        os.close(read_end)
    _started.append(write_end)
    return proc


def _alive(driver) -> bool:
    import psutil

    try:
        return driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch(driver_pid: int, read_fd: int) -> int:
    """Wait for the driver to end, then stop its leftover processes; returns how many."""
    import psutil

    me = os.getpid()
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        return 0
    known: dict[int, float] = {}  # pid -> start time of every process the driver started
    while _alive(driver):
        with contextlib.suppress(psutil.Error):
            for p in driver.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    known[p.pid] = p.create_time()
        ready, _, _ = select.select([read_fd], [], [], REFRESH_S)
        if ready and not os.read(read_fd, 4096):  # EOF: the driver is gone
            break
    known.pop(me, None)
    left = []
    for pid, started in known.items():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, still = psutil.wait_procs(left, timeout=GRACE_S)
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return len(left)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
