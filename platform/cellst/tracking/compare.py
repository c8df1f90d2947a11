"""``cellst compare``: cellst's MLflow runs side by side in the terminal, a CSV and a PNG.

What a row holds
----------------
One row per run: its name, id, experiment, **kind** and **stage** (from the tags cellst sets,
see :data:`KIND_OF_STAGE_TAG`), status, start time, the test and validation F1, overall and
per modality, and its params (the flattened config). The F1 columns have one name for every
kind, the names cellst logs:

* ``test_f1`` and ``test_f1/<modality>``;
* ``val_f1`` and ``val_f1/<modality>``: the best validation F1 (``best_val_f1``, what the
  kept ``best/`` checkpoint scored) when the run logs it, else its ``val_f1`` (a Tune
  post-processing trial's score). A sweep shows the score of what its ``best.yaml``
  recommends (the best trial's, or the current settings' where no trial beat them).

Runs logged before those names were used everywhere are read too: an ST++ pipeline's
``test_f1_<model>[_<modality>]`` (its final model's F1, and each training stage's own), a
pipeline's validation F1 is that of its last training stage, and a training sweep's
``best_best_val_f1``; a post-processing sweep that logged its best trial's score as
``best_val_f1`` (no ``best_trial_val_f1``) shows the better of it and ``baseline_val_f1``.

Where the runs are
------------------
``tracking_uri`` may be an ``http(s)`` server, a ``sqlite:///`` URI, a database file, or a
folder holding cellst's embedded stores (every ``mlflow.db`` below it: each training run,
ST++ pipeline and sweep folder has its own). None: ``$MLFLOW_TRACKING_URI``, else ``runs/``.

Only MLflow is imported (lazily), never torch, Ray or MONAI: the command answers in seconds.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pandas as pd

from cellst.config import ConfigError
from cellst.fs import atomic_write, is_locked
from cellst.provenance import (
    PNG_SOFTWARE_KEY,
    SOFTWARE_TAG,
    csv_begins_with,
    is_cellst_png,
    png_software,
)
from cellst.stpp.outputs import MODELS
from cellst.tracking.config import LOCK_TAG, SUPERSEDED_TAG, _normalise_uri, _sqlite_path
from cellst.train.config import CHECKPOINTS_DIR, OVERLAYS_DIR, RAY_STORAGE_DIR

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

#: ``cellst.stage`` tag value -> kind of run
KIND_OF_STAGE_TAG = {
    "stpp": "pipeline",
    "train": "train",
    "tune": "sweep",
    "tune.trial": "trial",
}
#: every kind; ``stage`` is an ST++ stage run that is not a training (reliability, pseudo
#: labels, evaluation), ``other`` a run without cellst's ``cellst.stage`` tag
KINDS = ("pipeline", "train", "sweep", "trial", "stage", "other")
#: kinds listed when none are asked for
DEFAULT_KINDS = ("pipeline", "train", "sweep")
#: the F1 columns: overall, and ``<prefix>/<modality>`` per modality
F1_PREFIXES = ("test_f1", "val_f1")
#: validation F1 metrics by preference (see the module docstring)
VAL_F1_KEYS = ("best_val_f1", "val_f1", "best_best_val_f1")
#: ST++ model labels -> the stage that trains them (``cellst.stpp.outputs.MODELS``), last first
STPP_MODELS = dict(reversed(MODELS.items()))
#: the columns every row has, in the order the table shows them
BASE_COLUMNS = (
    "name",
    "kind",
    "stage",
    "status",
    "run_id",
    "experiment",
    "start_time",
    "parent_run_id",
    "tracking_uri",
)
#: MLflow's default of 7 retries over minutes is wrong for a command that only reads
DEFAULT_TIMEOUT_S = 5
MAX_RUNS = 10_000
#: folders under a runs folder that never hold an MLflow database
_SKIP_DIRS = {
    RAY_STORAGE_DIR,
    CHECKPOINTS_DIR,
    OVERLAYS_DIR,
    "mlartifacts",
    "mlruns",
    "maps",
    ".git",
}


class CompareError(ValueError):
    """No runs to compare: unknown experiment, no store, unreachable server (one line)."""


# ----------------------------------------------------------------------------- sources
def tracking_sources(
    tracking_uri: str | Path | None = None, root: str | Path = "runs"
) -> list[str]:
    """The tracking URIs to read: a server or database URI, or every ``mlflow.db`` below a
    folder (``root`` when neither ``tracking_uri`` nor ``$MLFLOW_TRACKING_URI`` is set).

    Raises :class:`CompareError` when nothing is there.
    """
    given = tracking_uri if tracking_uri is not None else os.environ.get("MLFLOW_TRACKING_URI")
    given = str(given).strip() if given is not None else ""
    if not given:
        folder = Path(root)
        found = find_stores(folder)
        if not found:
            raise CompareError(
                f"no MLflow store (mlflow.db) under {folder.absolute()}; pass --tracking-uri "
                "(a server, a sqlite:/// URI, a database file or a runs folder) or set "
                "MLFLOW_TRACKING_URI"
            )
        return found
    scheme = urlparse(given).scheme.lower()
    if len(scheme) > 1 and scheme != "file":
        uri = _normalise_uri(given)
        if scheme == "sqlite":
            db = _sqlite_path(uri)
            if db is not None and not Path(db).is_file():
                raise CompareError(f"no MLflow database at {db} ({given})")
        return [uri]
    path = Path(given[len("file://") :] if scheme == "file" else given).expanduser()
    if path.is_file():
        return ["sqlite:///" + str(path.absolute())]
    if path.is_dir():
        found = find_stores(path)
        if not found:
            raise CompareError(f"no MLflow store (mlflow.db) under {path.absolute()}")
        return found
    raise CompareError(f"{given}: no such MLflow database, folder or tracking URI")


def find_stores(folder: str | Path) -> list[str]:
    """``sqlite:///`` URIs of every ``mlflow.db`` below ``folder`` (sorted; none if absent)."""
    found = []
    for top, dirs, files in os.walk(Path(folder).absolute()):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        if "mlflow.db" in files:
            found.append("sqlite:///" + str(Path(top) / "mlflow.db"))
    return found


def check_mlflow_db(db: str | Path) -> None:
    """Refuse, without changing it, a database file that is not an MLflow store.

    ``MlflowClient`` would create and migrate MLflow's schema in any SQLite file it is
    given (an empty file, another program's database), so the file is first opened
    read-only and its tables looked at. Raises :class:`CompareError` naming the file.
    """
    import sqlite3

    path = Path(db)
    try:
        con = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise CompareError(f"{path}: not an MLflow database ({exc})") from None
    if not {"experiments", "runs"} <= tables:
        raise CompareError(
            f"{path}: not an MLflow database (no experiments and runs tables); compare "
            "reads MLflow stores and never changes a file"
        )


def _is_server(uri: str) -> bool:
    return urlparse(uri).scheme.lower() in ("http", "https")


def _unreachable(uri: str, exc: BaseException) -> CompareError:
    from cellst.tracking.buffered import classify

    transient, reason = classify(exc)
    if _is_server(uri):
        what = "is unavailable" if transient else "refuses requests"
        return CompareError(f"MLflow tracking server {uri} {what} ({reason})")
    return CompareError(f"cannot read MLflow store {uri} ({reason})")


# ----------------------------------------------------------------------------- runs
def collect_runs(
    tracking_uri: str | Path | Sequence[str] | None = None,
    experiments: Sequence[str] | None = None,
    max_runs: int = MAX_RUNS,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> pd.DataFrame:
    """Every run of ``experiments`` (all experiments when None) with its kind, stage and F1.

    Parameters
    ----------
    tracking_uri : str, path, list of str or None
        See :func:`tracking_sources`; a list is read as it is (one URI each).
    experiments : list of str, optional
        Experiment names; one that no store holds raises :class:`CompareError`.
    max_runs : int
        At most this many runs per store, newest first.
    timeout_s : int
        Seconds a tracking server may take per request (no retries).

    Returns
    -------
    pandas.DataFrame
        One row per run, newest first: :data:`BASE_COLUMNS`, the F1 columns
        (``test_f1``, ``test_f1/<modality>``, ``val_f1``, ``val_f1/<modality>``) and the
        params as ``params.<field>``.
    """
    from cellst.tracking.buffered import http_limits
    from cellst.tracking.mlflow_utils import TRACKING_ERRORS, quiet_mlflow

    quiet_mlflow()
    if tracking_uri is None or isinstance(tracking_uri, str | Path):
        uris = tracking_sources(tracking_uri)
    else:
        uris = [str(u) for u in tracking_uri]
    wanted = list(dict.fromkeys(experiments or []))
    seen: set[str] = set()
    known: set[str] = set()
    frames = []
    for uri in uris:
        db = _sqlite_path(uri) if urlparse(uri).scheme.lower() == "sqlite" else None
        if db is not None:
            check_mlflow_db(db)
        try:
            with http_limits(timeout_s, retries=0):
                got, names = _store_runs(uri, wanted, max_runs)
        except TRACKING_ERRORS as exc:
            raise _unreachable(uri, exc) from None
        known.update(names)
        seen.update(n for n in wanted if n in names)
        frames.append(got)
    missing = [n for n in wanted if n not in seen]
    if missing:
        where = uris[0] if len(uris) == 1 else f"{len(uris)} stores"
        have = ", ".join(sorted(known)[:12]) or "none"
        raise CompareError(
            f"unknown experiment {', '.join(map(repr, missing))} in {where} (experiments: {have})"
        )
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=list(BASE_COLUMNS))
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values("start_time", ascending=False, kind="mergesort").reset_index(drop=True)


def _store_runs(uri: str, wanted: list[str], max_runs: int) -> tuple[pd.DataFrame, set[str]]:
    """The runs of one store as :func:`collect_runs` rows, and its experiment names."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from cellst.tracking.mlflow_utils import use_tracking_uri

    client = MlflowClient(tracking_uri=uri)
    exps: dict[str, str] = {}
    token = None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        exps.update({e.experiment_id: e.name for e in page})
        token = page.token
        if not token:
            break
    names = set(exps.values())
    ids = [i for i, n in exps.items() if not wanted or n in wanted]
    if not ids:
        return pd.DataFrame(), names
    with use_tracking_uri(uri):
        raw = mlflow.search_runs(
            experiment_ids=ids,
            max_results=max_runs,
            order_by=["attributes.start_time DESC"],
            output_format="pandas",
        )
    return runs_frame(raw, exps, uri), names


def runs_frame(
    raw: pd.DataFrame,
    experiments: Mapping[str, str],
    uri: str,
    lock_free: Callable[[str], bool] | None = None,
) -> pd.DataFrame:
    """``mlflow.search_runs`` output -> :func:`collect_runs` rows.

    ``lock_free(path)`` says whether the lock file a RUNNING run names (:data:`LOCK_TAG`)
    exists and is held by no process (:func:`lock_left_free`, the default): such a run was
    killed."""
    lock_free = lock_left_free if lock_free is None else lock_free
    if raw is None or raw.empty:
        return pd.DataFrame()
    runs = [_split(row) for row in raw.to_dict(orient="records")]
    by_id = {r["run_id"]: r for r in runs}
    children: dict[str, list[dict]] = {}
    for r in runs:
        if r["parent"]:
            children.setdefault(r["parent"], []).append(r)
    rows = []
    for r in runs:
        tags, metrics = r["tags"], r["metrics"]
        kind, stage = run_kind(tags)
        f1 = f1_values(metrics)
        if kind == "train" and "test_f1" not in f1 and r["parent"] in by_id:
            if not r["tags"].get(SUPERSEDED_TAG):  # the parent's score is its successor's
                f1.update(legacy_stpp_test_f1(by_id[r["parent"]]["metrics"], _stage_name(stage)))
        if kind == "sweep" and "best_trial_val_f1" not in metrics and "val_f1" in f1:
            # logged before: the best trial's score, even where best.yaml keeps the current
            # settings (which scored higher, or the same)
            f1["val_f1"] = max(f1["val_f1"], metrics.get("baseline_val_f1", f1["val_f1"]))
        if kind in ("pipeline", "stage"):  # the parent and its evaluation stage
            f1.update({k: v for k, v in legacy_stpp_test_f1(metrics).items() if k not in f1})
        if kind == "pipeline":
            stages = sorted(  # the current stage runs, not those a --force-from replaced
                (
                    c
                    for c in children.get(r["run_id"], [])
                    if c["tags"].get("cellst.stpp.stage") and not c["tags"].get(SUPERSEDED_TAG)
                ),
                key=lambda c: (_stage_index(c["tags"]["cellst.stpp.stage"]), c["start_time"] or 0),
            )
            if stages:
                stage = stages[-1]["tags"]["cellst.stpp.stage"]
            trained = [c for c in stages if c["tags"].get("cellst.stage") == "train"]
            if trained and "val_f1" not in f1:
                last = f1_values(trained[-1]["metrics"])
                f1.update({k: v for k, v in last.items() if k.startswith("val_f1")})
        start = r["start_time"]
        rows.append(
            {
                "name": tags.get("mlflow.runName") or r["run_id"][:8],
                "kind": kind,
                "stage": stage,
                "status": run_status(r, by_id, lock_free),
                "run_id": r["run_id"],
                "experiment": experiments.get(str(r["experiment_id"]), str(r["experiment_id"])),
                "start_time": pd.Timestamp(start) if start is not None else pd.NaT,
                "parent_run_id": r["parent"] or "",
                "tracking_uri": uri,
                **f1,
                **{f"params.{k}": v for k, v in r["params"].items()},
            }
        )
    df = pd.DataFrame(rows)
    return df[[*BASE_COLUMNS, *f1_columns(df), *sorted(c for c in df if c.startswith("params."))]]


def lock_left_free(path: str) -> bool:
    """Whether the lock file ``path`` exists here and no process holds it: its run's process
    is gone. False for a file this machine cannot see (a run on another machine)."""
    try:
        return Path(path).is_file() and not is_locked(path)
    except OSError:  # unreadable here: no verdict
        return False


def run_status(
    run: Mapping[str, Any],
    by_id: Mapping[str, Mapping[str, Any]],
    lock_free: Callable[[str], bool],
) -> str:
    """The status ``cellst compare`` shows: MLflow's, except SUPERSEDED for a run a re-run
    replaced (``train --force``, a changed sweep; its children too) and KILLED for a
    RUNNING run whose process is gone (its lock left free; a killed pipeline's children
    too), which MLflow keeps RUNNING for ever."""
    if _superseded(run, by_id):
        return "SUPERSEDED"
    if run["status"] != "RUNNING":
        return run["status"]
    parent = by_id.get(run["parent"]) if run["parent"] else None
    for r in (run, parent):
        lock = r["tags"].get(LOCK_TAG) if r and r["status"] == "RUNNING" else None
        if lock and lock_free(lock):
            return "KILLED"
    return "RUNNING"


def _superseded(run: Mapping[str, Any], by_id: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether ``run`` or its parent run carries :data:`SUPERSEDED_TAG`."""
    parent = by_id.get(run["parent"]) if run["parent"] else None
    return bool(run["tags"].get(SUPERSEDED_TAG) or (parent and parent["tags"].get(SUPERSEDED_TAG)))


def _split(row: Mapping[str, Any]) -> dict[str, Any]:
    """A ``search_runs`` record as run id, status, start, parent, tags, metrics, params."""

    def block(prefix: str) -> dict[str, Any]:
        n = len(prefix)
        return {k[n:]: v for k, v in row.items() if k.startswith(prefix) and _present(v)}

    tags = {k: str(v) for k, v in block("tags.").items()}
    return {
        "run_id": str(row["run_id"]),
        "experiment_id": row.get("experiment_id"),
        "status": str(row.get("status") or ""),
        "start_time": row.get("start_time"),
        "parent": tags.get("mlflow.parentRunId", ""),
        "tags": tags,
        "metrics": {k: float(v) for k, v in block("metrics.").items()},
        "params": {k: str(v) for k, v in block("params.").items()},
    }


def _present(v: Any) -> bool:
    if v is None:
        return False
    return not (isinstance(v, float) and math.isnan(v))


def run_kind(tags: Mapping[str, str]) -> tuple[str, str]:
    """``(kind, stage)`` of a run from its cellst tags.

    The stage is the ST++ stage (``4_retrain_reliable``) for a pipeline's stage runs, the
    sweep mode (``tune.postprocess``) for a sweep, otherwise the ``cellst.stage`` tag.
    """
    tag = tags.get("cellst.stage", "")
    stpp_stage = tags.get("cellst.stpp.stage", "")
    if tag in KIND_OF_STAGE_TAG:
        kind = KIND_OF_STAGE_TAG[tag]
    elif tag.startswith("stpp."):
        kind = "stage"
    else:
        kind = "other"
    if stpp_stage and kind in ("train", "stage"):
        return kind, stpp_stage
    if kind == "sweep" and tags.get("cellst.tune.mode"):
        return kind, f"tune.{tags['cellst.tune.mode']}"
    return kind, tag


def _stage_index(key: str) -> int:
    head = key.split("_", 1)[0]
    return int(head) if head.isdigit() else -1


def _stage_name(key: str) -> str:
    head, _, rest = key.partition("_")
    return rest if head.isdigit() else key


def f1_values(metrics: Mapping[str, float]) -> dict[str, float]:
    """The F1 columns of a run from its metrics (names as in the module docstring)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "test_f1" or key.startswith("test_f1/"):
            out[key] = value
    val = next((k for k in VAL_F1_KEYS if k in metrics), None)
    if val is not None:
        out["val_f1"] = metrics[val]
    for prefix in ("best_val_f1/", "val_f1/"):  # the best epoch's when logged
        for key, value in metrics.items():
            if key.startswith(prefix):
                out.setdefault("val_f1/" + key[len(prefix) :], value)
    return out


def legacy_stpp_test_f1(metrics: Mapping[str, float], stage: str | None = None) -> dict[str, float]:
    """``test_f1[/<modality>]`` from an ST++ parent's ``test_f1_<model>[_<modality>]``.

    ``stage`` None: the last model the pipeline evaluated (round 2, else round 1, else
    supervised); else the model that ``stage`` (e.g. ``retrain_all``) trains.
    """
    if stage is None:
        model = next((m for m in STPP_MODELS if f"test_f1_{m}" in metrics), None)
    else:
        model = next((m for m, s in STPP_MODELS.items() if s == stage), None)
    if model is None or f"test_f1_{model}" not in metrics:
        return {}
    head = f"test_f1_{model}_"
    out = {"test_f1": metrics[f"test_f1_{model}"]}
    out.update({f"test_f1/{k[len(head) :]}": v for k, v in metrics.items() if k.startswith(head)})
    return out


def f1_columns(df: pd.DataFrame | Iterable[str]) -> list[str]:
    """The F1 columns present, ordered: ``test_f1``, its modalities, ``val_f1``, its
    modalities."""
    cols = list(df.columns if isinstance(df, pd.DataFrame) else df)
    out = []
    for prefix in F1_PREFIXES:
        if prefix in cols:
            out.append(prefix)
        out.extend(sorted(c for c in cols if c.startswith(prefix + "/")))
    return out


def modalities(df: pd.DataFrame) -> list[str]:
    """Modalities that have an F1 column (test or validation)."""
    return sorted({c.split("/", 1)[1] for c in f1_columns(df) if "/" in c})


# ----------------------------------------------------------------------------- the table
def differing_params(df: pd.DataFrame) -> list[str]:
    """Config fields (``params.`` stripped) whose values differ between the runs of ``df``.

    A run that lacks a field (a post-processing trial logs only its swept fields) is not a
    difference; two runs that log it with different values are.
    """
    out = []
    for col in sorted(c for c in df.columns if c.startswith("params.")):
        values = df[col].dropna().astype(str)
        if values.nunique() > 1:
            out.append(col[len("params.") :])
    return out


def compare_table(
    df: pd.DataFrame,
    sort_by: str = "test_f1",
    ascending: bool = False,
    limit: int | None = None,
    kinds: Sequence[str] | None = DEFAULT_KINDS,
) -> pd.DataFrame:
    """The runs to show, sorted: base columns, F1 columns and the params that differ.

    Parameters
    ----------
    df : DataFrame
        From :func:`collect_runs`.
    sort_by : str
        Any column: an F1 column (``test_f1``, ``val_f1/fluorescence``...), ``start_time``,
        ``name``, or a config field (``train.lr``). Runs without a value come last; ties keep
        the newest first. A known F1 name that no run has is allowed (nothing to sort by).
    ascending : bool
        Smallest first.
    limit : int, optional
        Keep the first ``limit`` runs after sorting.
    kinds : list of str, optional
        Kinds of run to keep (:data:`KINDS`); None keeps every run.

    Raises
    ------
    ConfigError
        For an unknown ``sort_by`` column or kind (exit code 2 on the command line).
    """
    bad = [k for k in kinds or () if k not in KINDS]
    if bad:
        raise ConfigError(f"--kind: unknown kind {bad[0]!r}; choose from {', '.join(KINDS)}")
    if kinds is not None and not df.empty:
        df = df[df["kind"].isin(list(kinds))]
    df = df.sort_values("start_time", ascending=False, kind="mergesort")
    key = sort_column(df, sort_by)
    if key is not None:
        values = df[key]
        if key.startswith("params."):
            numeric = pd.to_numeric(values, errors="coerce")
            if numeric.notna().sum() == values.notna().sum():
                values = numeric
        order = values.sort_values(ascending=ascending, kind="mergesort", na_position="last")
        df = df.loc[order.index]
    if not df.empty:  # runs a re-run replaced go last, whatever their scores
        df = df.iloc[df["status"].eq("SUPERSEDED").argsort(kind="stable")]
    if limit is not None:
        df = df.head(limit)
    params = differing_params(df)
    fixed = set(BASE_COLUMNS) | set(f1_columns(df))
    renamed = {f"params.{p}": (p if p not in fixed else f"params.{p}") for p in params}
    cols = [*BASE_COLUMNS, *f1_columns(df.dropna(axis=1, how="all")), *renamed]
    return df[cols].rename(columns=renamed).reset_index(drop=True)


def sort_column(df: pd.DataFrame, sort_by: str) -> str | None:
    """The column of ``df`` that ``sort_by`` names; for ``test_f1`` (the default) where no
    run has it, ``val_f1``; None for an F1 name no run has (newest first, then)."""
    for cand in (sort_by, f"params.{sort_by}"):
        if cand in df.columns and df[cand].notna().any():
            return cand
    if sort_by == "test_f1" and "val_f1" in df.columns and df["val_f1"].notna().any():
        return "val_f1"  # training runs alone: no test split scored yet
    for cand in (sort_by, f"params.{sort_by}"):
        if cand in df.columns:
            return cand
    if sort_by in F1_PREFIXES or re.fullmatch(r"(test|val)_f1/[\w.-]+", sort_by):
        return None
    metrics = ", ".join(f1_columns(df)) or "test_f1, val_f1"
    raise ConfigError(
        f"--sort: no column {sort_by!r}; use an F1 column ({metrics}), start_time, name, or a "
        "config field such as train.lr"
    )


# ----------------------------------------------------------------------------- outputs
def write_outputs(
    table: pd.DataFrame, out_dir: str | Path, stem: str = "compare"
) -> tuple[Path, Path]:
    """``<stem>.csv`` (the table) and ``<stem>.png`` (F1 per modality, one bar group per
    run), both written atomically. Returns their paths."""
    out = Path(out_dir)
    csv = atomic_write(out / f"{stem}.csv", lambda tmp: table.to_csv(tmp, index=False))
    fig = f1_figure(table)
    mark = {PNG_SOFTWARE_KEY: SOFTWARE_TAG}  # so that a re-run may replace it
    png = atomic_write(
        out / f"{stem}.png", lambda tmp: fig.savefig(tmp, format="png", metadata=mark)
    )
    fig.clear()
    return csv, png


def foreign_outputs(out_dir: str | Path, stem: str = "compare") -> list[Path]:
    """Files at :func:`write_outputs`' names in ``out_dir`` that cellst did not write (a
    user's own ``compare.csv``, say), which writing the table would replace."""
    out = Path(out_dir)
    csv, png = out / f"{stem}.csv", out / f"{stem}.png"
    csv_ours = csv_begins_with(csv, BASE_COLUMNS)
    theirs = [csv] if csv.exists() and not csv_ours else []
    # a figure from before the PNG mark (2026-12-03) is ours when its table beside it is
    if png.exists() and not is_cellst_png(png) and not (csv_ours and _matplotlib_png(png)):
        theirs.append(png)
    return theirs


def _matplotlib_png(path: Path) -> bool:
    return (png_software(path) or "").startswith("Matplotlib")


def f1_figure(table: pd.DataFrame):
    """Bar groups of F1 per run: overall plus each modality; one panel for test F1 and one
    for validation F1 (only those that some run has). Agg canvas, no pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [p for p in F1_PREFIXES if any(c in table for c in _panel_columns(table, p))]
    panels = [p for p in panels if table[_panel_columns(table, p)].notna().any().any()]
    n = max(1, len(table))
    bars = max([len(_panel_columns(table, p)) for p in panels] or [1])
    width = min(40.0, max(6.0, 0.28 * n * (bars + 1)))
    fig = Figure(figsize=(width, 3.6 * max(1, len(panels)) + 0.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if not panels:
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no F1 logged by these runs", ha="center", va="center")
        return fig
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    labels = [_short(str(v), 28) for v in table["name"]]
    x = list(range(len(table)))
    for ax, prefix in zip(axes, panels, strict=True):
        cols = _panel_columns(table, prefix)
        w = 0.8 / len(cols)
        for i, col in enumerate(cols):
            vals = pd.to_numeric(table[col], errors="coerce").fillna(0.0).tolist()
            label = "overall" if col == prefix else col.split("/", 1)[1]
            ax.bar([xi - 0.4 + w * (i + 0.5) for xi in x], vals, w, label=label)
        ax.set_xticks(x, labels, rotation=30 if n > 3 else 0, ha="right" if n > 3 else "center")
        ax.set_ylim(0, 1.15)  # room for the legend above the highest possible bar
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_ylabel("F1")
        ax.set_title(f"{'test' if prefix == 'test_f1' else 'validation'} F1 (IoU 0.5)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8, ncols=min(len(cols), 5))
    return fig


def _panel_columns(table: pd.DataFrame, prefix: str) -> list[str]:
    return [c for c in f1_columns(table) if c == prefix or c.startswith(prefix + "/")]


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ----------------------------------------------------------------------------- terminal
def rich_table(table: pd.DataFrame, title: str | None = None) -> Table:
    """The comparison as a ``rich`` table (run id shortened, F1 to 4 decimals, ``-`` where
    a run has no value; experiment shown when there are several)."""
    from rich.table import Table

    hidden = {"parent_run_id", "tracking_uri"}
    if table["experiment"].nunique() <= 1:
        hidden.add("experiment")
    cols = [c for c in table.columns if c not in hidden]
    out = Table(title=title)
    f1 = set(f1_columns(table))
    for c in cols:
        out.add_column("run" if c == "run_id" else c, justify="right" if c in f1 else "left")
    for row in table.to_dict(orient="records"):
        out.add_row(*[_cell(c, row[c], c in f1) for c in cols])
    return out


def _cell(col: str, value: Any, is_f1: bool) -> str:
    if not _present(value) or value is pd.NaT:
        return "-"
    if col == "run_id":
        return str(value)[:8]
    if col == "start_time":
        ts = pd.Timestamp(value)
        return (ts.tz_convert(None) if ts.tzinfo else ts).strftime("%Y-%m-%d %H:%M")
    if is_f1:
        return f"{float(value):.4f}"
    return str(value)


def print_table(table: pd.DataFrame, title: str | None = None, console: Console | None = None):
    """Print the whole table: on a terminal at its width; piped or logged as wide as the
    table needs, so no column is cut."""
    from rich.console import Console

    rendered = rich_table(table, title)
    if console is None:
        if sys.stdout.isatty():
            console = Console()
        else:
            wide = Console(width=100_000)
            need = wide.measure(rendered).maximum
            console = Console(width=max(80, need + 2), soft_wrap=False)
    console.print(rendered)


# ----------------------------------------------------------------------------- the command
def compare_command(
    experiment: list[str] | None = None,
    tracking_uri: str | None = None,
    sort: str = "test_f1",
    out: Path | None = None,
    limit: int = 50,
    kind: list[str] | None = None,
    ascending: bool = False,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    console: Console | None = None,
) -> pd.DataFrame:
    """``cellst compare``: collect, sort, print, and (with ``out``) write CSV + PNG.

    Raises :class:`CompareError` (exit 1) for an unknown experiment, an unreachable server
    or no runs, and :class:`~cellst.config.ConfigError` (exit 2) for a bad ``sort`` or
    ``kind``. Returns the table shown.
    """
    kinds = None if kind and "all" in kind else tuple(kind or DEFAULT_KINDS)
    if limit < 1:
        raise ConfigError(f"--limit: must be at least 1, got {limit}")
    uris = tracking_sources(tracking_uri)
    runs = collect_runs(uris, experiment, timeout_s=timeout_s)
    table = compare_table(runs, sort_by=sort, ascending=ascending, limit=limit, kinds=kinds)
    if table.empty:
        what = "runs" if kinds is None else f"{'/'.join(kinds)} runs"
        scope = f"experiment {', '.join(experiment)}" if experiment else "any experiment"
        where = uris[0] if len(uris) == 1 else f"{len(uris)} stores"
        hint = f"; {len(runs)} run(s) of other kinds (--kind all lists them)" if len(runs) else ""
        raise CompareError(f"no {what} in {scope} at {where}{hint}")
    kept = runs if kinds is None or runs.empty else runs[runs["kind"].isin(list(kinds))]
    key = sort_column(kept, sort)
    order = f"({'smallest' if ascending else 'largest'} first)"
    if key is None:
        by = f"newest first (no run has {sort})"
    elif key.removeprefix("params.") != sort:
        by = f"by {key} {order}, as no run has {sort}"
    else:
        by = f"by {sort} {order}"
    title = f"{len(table)} of {len(runs)} runs, {by}"
    print_table(table, title, console)
    if out is not None:
        csv, png = write_outputs(table, out)
        from rich.console import Console

        (console or Console(soft_wrap=True)).print(f"wrote {csv} and {png}", highlight=False)
    return table
