"""Every benchmark runs at its ``--smoke`` size, so that a broken benchmark fails CI.

One test per ``benchmarks/bench_*.py`` (found by glob: a new benchmark is covered without
touching this file). Each runs in a fresh process, in a temporary working folder, with
``--out`` pointing there when the benchmark takes one, so nothing lands in the repository.
A test checks the exit code and that the benchmark printed its side-by-side comparison;
the numbers themselves are not asserted (tiny sizes make speed ratios meaningless).
"""

from __future__ import annotations

import os
import re
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


def run_smoke(
    script: Path, work: Path, timeout: float, ray_address: str | None = None
) -> tuple[int, str]:
    """Run ``script --smoke`` in ``work``; exit code and output (stdout + stderr).

    The benchmark runs in its own process group, so a hung run is stopped with everything
    it started. With ``ray_address`` it joins that Ray cluster (the session's: warm worker
    processes, no cluster start-up per benchmark) instead of starting a local one.
    """
    cmd = [sys.executable, str(script), "--smoke"]
    if re.search(r'add_argument\(\s*"--out"', script.read_text()):
        cmd += ["--out", str(work / "out")]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONUNBUFFERED"] = "1"
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
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
    return log.read_text(errors="replace")[-chars:]


@pytest.mark.parametrize("script", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_benchmark_smoke(script: Path, tmp_path: Path, ray_session) -> None:
    address = ray_session.get_runtime_context().gcs_address
    code, out = run_smoke(script, tmp_path, TIMEOUTS.get(script.stem, DEFAULT_TIMEOUT), address)
    assert code == 0, f"{script.name} --smoke exited {code}:\n{out[-4000:]}"
    for marker in MARKERS.get(script.stem, DEFAULT_MARKERS):
        assert re.search(marker, out, re.MULTILINE), (
            f"{script.name} --smoke did not print /{marker}/:\n{out[-4000:]}"
        )


def test_every_benchmark_is_found() -> None:
    """The glob finds the benchmarks, and every benchmark listed here still exists."""
    assert {p.stem for p in BENCHMARKS} >= set(MARKERS)
