"""Run benchmark scripts one after another in this one process, each as ``python SCRIPT``.

Started by ``tests/test_benchmarks.py`` with the address of the test session's Ray cluster
(``python smoke_runner.py ADDRESS LOG``). Each request is a line of JSON on stdin,
``{"script": ..., "args": [...], "cwd": ..., "log": ...}``: the script runs as ``__main__``
(:func:`runpy.run_path`) with ``sys.argv = [script, *args]`` in ``cwd``, with this process's
standard output and error (file descriptors 1 and 2, so the processes it starts and the
lines Ray forwards from its workers too) going to ``log``. The answer is a line of JSON on
the original standard output, ``{"code": N}``: the script's exit code, as ``python SCRIPT``
would give it.

Why one process: every smoke run is one or two trainings or actor pools at the smallest
size that runs their path, so what each costs is start-up. A process of its own per script
imported torch, MONAI and Ray again and, being a new Ray job, started fresh worker
processes that imported them again too. Here the smoke runs are one Ray job, whose idle
workers serve the next script (2026-12-07, six Ray benchmarks one after another against a
warm 2-CPU cluster: 97 s and 142 CPU-s here, 160 s and 223 CPU-s as processes of their own).

Between scripts the runner puts back what a script may change in the process: the
environment, working folder, ``sys.argv``, ``sys.path``, torch's thread count and Ray
Data's ``DataContext``, and reconnects to the cluster where a script disconnected.
"""

from __future__ import annotations

import copy
import json
import os
import runpy
import sys
import traceback


def exit_code(exc: SystemExit) -> int:
    """The exit code ``python SCRIPT`` gives for ``exc`` (a message is printed, code 1)."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def run_script(script: str, args: list[str], cwd: str, log: str, own_fd: int) -> int:
    """Run ``script`` as ``__main__`` with its output in ``log``; its exit code."""
    sys.argv = [script, *args]
    os.chdir(cwd)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as exc:
        return exit_code(exc)
    except BaseException:  # noqa: BLE001 - as the interpreter would: traceback, exit 1
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(own_fd, 1)
        os.dup2(own_fd, 2)


def main() -> None:
    address, own_log = sys.argv[1], sys.argv[2]
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    own_fd = os.open(own_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(own_fd, 1)
    os.dup2(own_fd, 2)

    import ray
    import torch
    from ray.data import DataContext

    from cellst.raycluster import ensure_ray

    ensure_ray(address=address)  # as each script's own ensure_ray() would join it
    env, cwd, path, argv = dict(os.environ), os.getcwd(), list(sys.path), list(sys.argv)
    threads, data_context = torch.get_num_threads(), copy.deepcopy(DataContext.get_current())
    for line in sys.stdin:
        req = json.loads(line)
        code = run_script(req["script"], req["args"], req["cwd"], req["log"], own_fd)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.path[:] = path
        sys.argv = argv
        torch.set_num_threads(threads)
        DataContext._set_current(copy.deepcopy(data_context))
        if not ray.is_initialized():  # the script shut its connection down
            ensure_ray(address=address)
        replies.write(json.dumps({"code": code}) + "\n")


if __name__ == "__main__":
    main()
