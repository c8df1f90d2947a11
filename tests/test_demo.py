"""`make demo`'s script at its ``--quick`` size, so that a broken demo fails CI.

It runs in a fresh process, in a temporary folder (its own local Ray cluster, its own
MLflow SQLite store), and must finish all seven ST++ stages and write the F1 table. The F1
values are not asserted: the quick data and model are far too small to mean anything.
A second run must resume: every stage already done, nothing trained again.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run_demo(out: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    res = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "run_demo.py"), "--quick", "--out", str(out)],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout


def test_quick_demo_runs_end_to_end_and_resumes(tmp_path):
    out = _run_demo(tmp_path / "demo")
    assert "mean test F1: supervised-only" in out
    assert "(7 stage(s) run, 0 already done)" in out
    table = Path(re.search(r"\(table: (\S+report\.csv)\)", out).group(1))
    report = pd.read_csv(table)
    assert list(report["model"]) == ["supervised", "round1", "round2"]
    assert report["f1"].between(0, 1).all()
    again = _run_demo(tmp_path / "demo")
    assert "(0 stage(s) run, 7 already done)" in again
