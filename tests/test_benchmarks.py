"""Every benchmark runs at its ``--smoke`` size, so that a broken benchmark fails CI.

One test per ``benchmarks/bench_*.py`` (found by glob: a new benchmark is covered without
touching this file). Each runs as ``python bench_X.py --smoke`` would, in a temporary working
folder, with ``--out`` pointing there when the benchmark takes one, so nothing lands in the
repository. A test checks the exit code and that the benchmark printed its side-by-side
comparison; the numbers themselves are not asserted (tiny sizes make speed ratios
meaningless).

The scripts run one after another in one process of their own (``tests/smoke_runner.py``),
joined to the session's Ray cluster as one Ray job, so that they share its imports and its
warm worker processes (see the runner for what that saves); a script that starts a cluster
of its own (:data:`OWN_PROCESS`) runs in a fresh process.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("bench_*.py"))

#: what each benchmark prints for its comparison (a regular expression per line to find)
MARKERS: dict[str, tuple[str, ...]] = {
    "bench_datasource": (r"ray data, 2 CPUs\s*:\s*\d+\s+\([\d.]+x plain",),
    "bench_gpu": (
        r"cellst GPU check \(smoke, CPU\)",
        # where the prediction's first item went (its network and post-processing seconds)
        r"first item: network [\d.]+ s, post-processing [\d.]+ s",
    ),
    "bench_inference": (
        r"ray data, 2 actor\(s\)\s*:.*\([\d.]+x plain\)",
        r"one pass \(predict_sets\)\s*:\s*[\d.]+\s+\([\d.]+x faster\)",
        r"\d+x\d+: inference [\d.]+ s, post-processing [\d.]+ s, \d+ instances, peak RSS",
    ),
    # the 2-node row of the table: a real 2-node cluster streamed and predicted
    "bench_nodes": (r"^\s+2 \|\s+[\d.]+ \([\d.]+x\)",),
    "bench_metric": (r"speed-up\s*:\s*[\d.]+x", r"\| same$"),
    "bench_postprocess": (
        r"speed-up vs MONAI: [\d.]+x",
        r"agreement cellst vs MONAI: F1",
        # every hand-written step beside the library call it replaces, with equal output
        r"markers: opening\s+[\d.]+\s+skimage opening.*[\d.]+x  yes",
        r"watershed per component\s+[\d.]+\s+skimage watershed.*[\d.]+x  yes",
        # the calibration search on one thread and on several, with the same result
        r"calibration search, .*: [\d.]+x, same result: yes",
    ),
    "bench_quality": (
        r"test F1",
        r"wrote .*quality\.csv",
        # one model's test F1 under three post-processing rules, side by side
        r"configured [\d.]+, calibrated on \d+ validation items [\d.]+, on \d+ [\d.]+",
        # and the stored settings on flip-TTA maps (what `cellst predict --tta` gives)
        r"\(cal_all: what training stores\), with flip TTA [\d.]+",
        # and with cell-size rescaling, or without it where the recipe has it on
        r"(with cell-size rescaling \(inference.rescale_diameter=20\)|without cell-size "
        r"rescaling) [\d.]+",
    ),
    # the three selection rules' test F1 on the same training, and the rule's gain
    "bench_selection": (
        r"^last\s+[\d.]+",
        r"rule - highest: [+-][\d.]+ mean F1",
        # the rule's checkpoint: configured vs calibrated post-processing, and the ceiling
        r"configured [\d.]+, calibrated [\d.]+, ceiling [\d.]+; calibrated - configured "
        r"[+-][\d.]+ .*ceiling - calibrated [+-][\d.]+",
    ),
    "bench_startup": (r"b / a = [\d.]+", r"MONAI import, trimmed / whole: e / d = [\d.]+"),
    "bench_stpp": (
        r"full ST\+\+ - supervised: [+-][\d.]+ mean F1",
        # the paired baseline: the same stage-1 model fine-tuned on labelled crops alone
        r"full ST\+\+ - supervised with ST\+\+'s schedule .*: [+-][\d.]+ mean F1",
        # beside it, how precisely the test images measure it (paired per-image differences)
        r"standard error from the test images [\d.]+ \(per seed [\d.]+\)$",
        r"results: .*results\.json",
        # per modality, the baselines beside the ST++ models
        r"^mean test F1 per modality",
    ),
    "bench_targets": (r"speed-up\s+[\d.]+x", r"cellst and MONAI maps: same"),
    "bench_train": (
        r"[\d.]+x the best in-process loop",
        r"counting validation \+ checkpoint per epoch\s*:\s*[\d.]+\s+[\d.]+x; overhead",
        r"=> [\d.]+ CPU cores of augmentation tasks per GPU",
    ),
}
#: a benchmark not listed above must at least print a ratio
DEFAULT_MARKERS = (r"\d(\.\d+)?x\b",)

#: seconds before a smoke run counts as hung (generous: the machine may be shared)
TIMEOUTS = {"bench_stpp": 1200, "bench_quality": 900, "bench_gpu": 900}
DEFAULT_TIMEOUT = 600


def smoke_args(script: Path, work: Path) -> list[str]:
    """``--smoke``, and ``--out`` into ``work`` where the benchmark takes one."""
    args = ["--smoke"]
    if re.search(r'add_argument\(\s*"--out"', script.read_text()):
        args += ["--out", str(work / "out")]
    return args


def smoke_env(ray_address: str | None = None) -> dict[str, str]:
    """This environment for a smoke run: no tracking server or cluster of the caller's, the
    output unbuffered; with ``ray_address``, joined to that cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONUNBUFFERED"] = "1"
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


def run_smoke(
    script: Path, work: Path, timeout: float, ray_address: str | None = None
) -> tuple[int, str]:
    """Run ``script --smoke`` in ``work``; exit code and output (stdout + stderr).

    The benchmark runs in its own process group, so a hung run is stopped with everything
    it started. With ``ray_address`` it joins that Ray cluster (the session's: warm worker
    processes, no cluster start-up per benchmark) instead of starting a local one.
    """
    cmd = [sys.executable, str(script), *smoke_args(script, work)]
    env = smoke_env(ray_address)
    log = work / "output.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd, cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{script.name} --smoke still running after {timeout:.0f} s:\n{tail(log)}")
    return code, log.read_text(errors="replace")


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else f"({log} not written)"


#: benchmarks that run in a fresh process, not in the smoke runner: ``bench_nodes`` starts
#: a multi-node cluster of its own and joins it, which a process joined to the session's
#: cluster cannot do
OWN_PROCESS = {"bench_nodes"}

RUNNER = Path(__file__).with_name("smoke_runner.py")


class SmokeRunner:
    """``tests/smoke_runner.py`` in its own process group, joined to the cluster at
    ``address``: :meth:`run` has it run one script and waits for its exit code."""

    def __init__(self, address: str, folder: Path):
        self.log = folder / "runner.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNER), address, str(self.log)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=smoke_env(),
            text=True,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, script: Path, work: Path, timeout: float) -> tuple[int, str]:
        """Exit code and output of ``script --smoke`` run in ``work`` by the runner; a run
        still going after ``timeout`` s stops the runner with all it started and fails."""
        log = work / "output.log"
        req = {"script": str(script), "args": smoke_args(script, work), "cwd": str(work)}
        self.proc.stdin.write(json.dumps({**req, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            what = f"still running after {timeout:.0f} s" if not ready else "ended the runner"
            pytest.fail(f"{script.name} --smoke {what}:\n{tail(log)}\n{tail(self.log)}")
        return json.loads(line)["code"], log.read_text(errors="replace")

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        self.proc.stdin.close()  # the runner ends at the end of its input
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.stop()


@pytest.fixture(scope="module")
def smoke_runner(ray_session, tmp_path_factory):
    """``runner()``: the module's :class:`SmokeRunner` (a new one if a run stopped it)."""
    address = ray_session.get_runtime_context().gcs_address
    folder = tmp_path_factory.mktemp("smoke_runner")
    runners: list[SmokeRunner] = []

    def runner() -> SmokeRunner:
        if not runners or not runners[-1].alive():
            (folder / str(len(runners))).mkdir()
            runners.append(SmokeRunner(address, folder / str(len(runners))))
        return runners[-1]

    yield runner
    if runners:
        runners[-1].close()


@pytest.mark.parametrize("script", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_benchmark_smoke(script: Path, tmp_path: Path, ray_session, smoke_runner) -> None:
    timeout = TIMEOUTS.get(script.stem, DEFAULT_TIMEOUT)
    if script.stem in OWN_PROCESS:
        address = ray_session.get_runtime_context().gcs_address
        code, out = run_smoke(script, tmp_path, timeout, address)
    else:
        code, out = smoke_runner().run(script, tmp_path, timeout)
    assert code == 0, f"{script.name} --smoke exited {code}:\n{out[-4000:]}"
    for marker in MARKERS.get(script.stem, DEFAULT_MARKERS):
        assert re.search(marker, out, re.MULTILINE), (
            f"{script.name} --smoke did not print /{marker}/:\n{out[-4000:]}"
        )


def test_every_benchmark_is_found() -> None:
    """The glob finds the benchmarks, and every benchmark listed here still exists."""
    assert {p.stem for p in BENCHMARKS} >= set(MARKERS)


def test_the_smoke_runner_runs_each_script_as_python_would(
    tmp_path: Path, ray_session, smoke_runner
) -> None:
    """Exit codes, output (also of the processes a script starts) and a failure come back as
    from ``python SCRIPT``, and what one script changes in the process is put back for the
    next."""
    first, second = tmp_path / "first.py", tmp_path / "second.py"
    first.write_text(
        "import os, subprocess, sys\n"
        "os.environ['CELLST_SMOKE_LEFT'] = '1'\n"
        "os.chdir('/')\n"
        "print('from the script', sys.argv[1:])\n"
        "subprocess.run([sys.executable, '-c', 'print(\"from its child\")'], check=True)\n"
        "sys.exit(3)\n"
    )
    second.write_text(
        "import os\n"
        "print('left:', os.environ.get('CELLST_SMOKE_LEFT'), 'in', os.getcwd())\n"
        "raise ValueError('broken benchmark')\n"
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    code, out = smoke_runner().run(first, tmp_path / "a", timeout=60)
    assert code == 3, out
    assert "from the script ['--smoke']" in out and "from its child" in out, out
    code, out = smoke_runner().run(second, tmp_path / "b", timeout=60)
    assert code == 1, out
    assert f"left: None in {tmp_path / 'b'}" in out, out
    assert "ValueError: broken benchmark" in out, out
