"""Best-effort MLflow logging: a tracking server that is down or answers with errors never
stops the work that logs to it.

Every record (a batch of metrics, params, tags, an artifact file, a run's end status) goes
to the server with a short HTTP timeout and at most one quick retry. A record the server
cannot take now is appended to ``<run folder>/tracking-pending.jsonl`` and sent, in order,
by a later call once the server answers again; while it is down the server is tried at most
every ``retry_every_s`` seconds, so logging costs a file append per call. One line says
when tracking becomes unreachable, one when it is back, and :meth:`close` says in one line
what is still unsent and where it is kept (a later run on the same folder sends it: see
:func:`resend_pending`). A record the server refuses for good (HTTP 4xx: a deleted run, an
invalid value) is moved to ``tracking-rejected.jsonl`` with the reason, said once.

The pending file is shared by the processes of one run (the driver and the rank-0 worker):
appends and flushes hold an exclusive ``flock`` on it, and a flush rewrites it atomically.
A healthy server leaves no file behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from cellst.fs import atomic_write_text, locked_file
from cellst.procenv import environ
from cellst.tracking.config import TrackingConfig, resolve_tracking

PENDING_FILE = "tracking-pending.jsonl"
REJECTED_FILE = "tracking-rejected.jsonl"
#: seconds one MLflow HTTP request may take (``MLFLOW_HTTP_REQUEST_TIMEOUT``; MLflow: 120)
DEFAULT_TIMEOUT_S = 10
#: seconds between attempts while the server is unreachable
DEFAULT_RETRY_EVERY_S = 60.0
#: MLflow's limits per ``log_batch`` request
_MAX_METRICS, _MAX_PARAMS = 1000, 100


class TrackingUnavailable(ValueError):
    """The configured tracking server cannot be used (said in one line by the CLI)."""


def say(message: str) -> None:
    """One line on stderr (not ``print``: Ray Train workers re-route ``print`` to a logger)."""
    with contextlib.suppress(Exception):
        sys.stderr.write(f"{message}\n")
        sys.stderr.flush()


@contextlib.contextmanager
def http_limits(timeout_s: int = DEFAULT_TIMEOUT_S, retries: int = 1) -> Iterator[None]:
    """MLflow HTTP requests of this process wait at most ``timeout_s`` per attempt and are
    retried ``retries`` times without back-off (MLflow's default: 7 retries over ~4 minutes).

    MLflow reads these environment variables at every request; the previous values are
    restored afterwards. urllib3's warning per retried attempt is held back meanwhile (the
    callers say in one line what failed).
    """
    pool_log = logging.getLogger("urllib3.connectionpool")  # "Retrying ..." per attempt
    old_level = pool_log.level
    pool_log.setLevel(logging.ERROR)
    limits = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(timeout_s))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(retries)),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    try:
        with environ(limits):
            yield
    finally:
        pool_log.setLevel(old_level)


def classify(exc: BaseException) -> tuple[bool, str]:
    """``(transient, reason)`` of a failed tracking call.

    Transient (kept and sent later): no connection, a timeout, HTTP 5xx, 408 and 429.
    Anything else (HTTP 4xx, a missing local file, an invalid value) will fail again.
    """
    import re

    from mlflow.exceptions import MlflowException, RestException

    text = str(exc)
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, FileNotFoundError):
        return False, f"no such file: {exc.filename}"
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        transient = status >= 500 or status in (408, 429)
        if isinstance(exc, RestException):
            return transient, f"{exc.error_code}: {first[:160]}"
    elif isinstance(exc, OSError):  # requests' errors are OSErrors too
        transient = True
    else:
        return False, f"{type(exc).__name__}: {first[:160]}"
    for pattern, reason in (
        ("Connection refused", "connection refused"),
        ("timed out", "timed out"),
        ("Timeout", "timed out"),
        ("Name or service not known", "unknown host"),
        ("RemoteDisconnected", "connection closed"),
        ("Connection reset", "connection reset"),
        ("Connection aborted", "connection aborted"),
    ):
        if pattern in text:
            return transient, reason
    m = re.search(r"too many (\d{3}) error responses|error code (\d{3})", text)
    if m:
        return transient, f"HTTP {m.group(1) or m.group(2)}"
    return transient, first[:160]


def _rewrite(path: Path, lines: list[str]) -> None:
    """Replace ``path`` by ``lines`` atomically (temp file, then rename); remove it if none."""
    if not lines:
        path.unlink(missing_ok=True)
        return
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def count_records(path: Path) -> int:
    """Number of records in a pending (or rejected) file; 0 when it does not exist."""
    try:
        with open(path, encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())
    except FileNotFoundError:
        return 0


class BufferedMetricLogger:
    """MLflow logging into one run that never raises and never waits long.

    Used by the rank-0 training worker (metrics) and by :func:`cellst.tracking.start_run`
    (everything a driver logs). See the module docstring for what happens when the server
    is down.

    Parameters
    ----------
    tracking_uri : str or None
        MLflow tracking URI; None (or ``run_id`` None, except for :meth:`flush`) disables
        logging.
    run_id : str or None
        The run new records go to. Records already in the pending file keep their own.
    run_dir : path
        Folder of ``tracking-pending.jsonl`` (created only when a record must be kept).
    timeout_s : int
        Seconds one HTTP request may take.
    retry_every_s : float
        While the server is unreachable, records are only appended to the pending file
        until this many seconds have passed since the last attempt.
    echo : callable, optional
        Where the one-line notes go (default: stderr).
    """

    def __init__(
        self,
        tracking_uri: str | None,
        run_id: str | None,
        run_dir: str | Path,
        *,
        timeout_s: int = DEFAULT_TIMEOUT_S,
        retry_every_s: float = DEFAULT_RETRY_EVERY_S,
        echo: Callable[[str], None] = say,
    ):
        self.uri, self.run_id = tracking_uri, run_id
        self.pending = Path(run_dir) / PENDING_FILE
        self.rejected = Path(run_dir) / REJECTED_FILE
        self.timeout_s, self.retry_every_s, self.echo = timeout_s, retry_every_s, echo
        self.down: str | None = None  # the reason, while the server is unreachable
        self.sent = 0  # records sent from the pending file
        self._next_try = 0.0
        self._refused = 0
        self._client = None

    # -- what callers log ----------------------------------------------------------------
    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log finite numeric ``metrics`` at ``step`` (non-finite values are dropped)."""
        self.log_steps([(step, None, metrics)])

    def log_steps(self, entries: Iterable[tuple[int, int | None, Mapping[str, Any]]]) -> None:
        """Log ``(step, time in ms or None for now, metrics)`` entries in one request (an
        epoch's per-step metrics, logged once the epoch is kept)."""
        now = int(time.time() * 1000)
        records = []
        for step, ts, metrics in entries:
            clean = {}
            for k, v in metrics.items():
                with contextlib.suppress(TypeError, ValueError):
                    if math.isfinite(float(v)):
                        clean[str(k)] = float(v)
            if clean:
                when = now if ts is None else int(ts)
                records.append({"kind": "metrics", "step": int(step), "ts": when, "metrics": clean})
        if records:
            self._submit(*records)

    def has_metric_at(self, key: str, step: int) -> bool | None:
        """Whether the run holds metric ``key`` at ``step``; None when that cannot be told
        (no tracking, the server unreachable, or records still waiting in the pending file,
        which may hold it)."""
        if not (self.uri and self.run_id) or self.pending.exists():
            return None
        try:
            with http_limits(self.timeout_s, retries=1):
                history = self._mlflow().get_metric_history(self.run_id, key)
        except Exception:  # noqa: BLE001 - no verdict, nothing logged
            return None
        return any(m.step == step for m in history)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if params:
            self._submit({"kind": "params", "params": {str(k): str(v) for k, v in params.items()}})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if tags:
            self._submit({"kind": "tags", "tags": {str(k): str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file (or a folder's files); if it must wait, they are read when
        they are sent."""
        path = str(Path(path).absolute())
        self._submit({"kind": "artifact", "path": path, "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit({"kind": "text", "text": text, "artifact_file": artifact_file})

    def set_terminated(self, status: str) -> None:
        """End the run with ``status`` (FINISHED, FAILED, KILLED)."""
        now = int(time.time() * 1000)
        self._submit({"kind": "status", "status": status, "end_time": now})

    # -- sending -------------------------------------------------------------------------
    def _submit(self, *records: dict[str, Any]) -> None:
        """Send ``records`` (of one kind) in one request, or keep them in the pending file."""
        if not (self.uri and self.run_id):
            return
        batch = [{"run_id": self.run_id, **r} for r in records]
        try:
            if self.down is not None or self.pending.exists():
                self._append(batch)  # behind what is already waiting, in order
                self.flush()
                return
            try:
                self._send(batch)
            except Exception as exc:  # noqa: BLE001 - tracking never stops the caller
                transient, reason = classify(exc)
                if not transient:
                    self._reject([json.dumps(r) for r in batch], reason)
                    return
                self._append(batch)
                self._went_down(reason)
        except Exception as exc:  # noqa: BLE001 - e.g. the run folder is not writable
            n = f"{len(batch)} records were" if len(batch) > 1 else "a record was"
            self.echo(f"tracking: {n} lost ({type(exc).__name__}: {exc})")

    def flush(self, force: bool = False) -> bool:
        """Send what the pending file holds, in order; True when nothing is left.

        While the server is unreachable this tries again only every ``retry_every_s``
        seconds, unless ``force``. Never raises.
        """
        if not self.uri:
            return True
        if not force and self.down is not None and time.monotonic() < self._next_try:
            return False
        try:
            return self._flush()
        except Exception as exc:  # noqa: BLE001
            self.echo(f"tracking: could not resend {self.pending} ({type(exc).__name__}: {exc})")
            return False

    def _flush(self) -> bool:
        failure, sent, was_down = None, 0, self.down is not None
        with locked_file(self.pending, create=False) as fh:
            if fh is None:
                self.down = None
                return True
            fh.seek(0)
            lines = [line for line in fh.read().splitlines() if line.strip()]
            records, i = [], 0
            for line in lines:
                try:
                    records.append((line, json.loads(line)))
                except json.JSONDecodeError:
                    records.append((line, None))  # a torn last line: cannot be sent
            while i < len(records):
                group = self._group(records, i)
                if group[0][1] is None:
                    self._reject([group[0][0]], "unreadable line")
                    i += 1
                    continue
                try:
                    self._send([r for _, r in group])
                except Exception as exc:  # noqa: BLE001
                    transient, reason = classify(exc)
                    if transient:
                        failure = reason
                        break
                    self._reject([line for line, _ in group], reason)
                else:
                    sent += len(group)
                i += len(group)
            _rewrite(self.pending, [line for line, _ in records[i:]])
        self.sent += sent
        if failure is not None:
            self._went_down(failure)
            return False
        self.down = None
        if sent and was_down:
            self.echo(f"tracking: {self.uri} is back; sent {sent} record(s) kept in {self.pending}")
        elif sent > 1:
            self.echo(f"tracking: sent {sent} record(s) kept in {self.pending}")
        return True

    @staticmethod
    def _group(records: list, i: int) -> list:
        """Records from ``i`` that go in one request: consecutive metric batches of a run."""
        first = records[i][1]
        if first is None or first.get("kind") != "metrics":
            return records[i : i + 1]
        j, n = i, 0
        while j < len(records):
            rec = records[j][1]
            if rec is None or rec.get("kind") != "metrics" or rec["run_id"] != first["run_id"]:
                break
            if n and n + len(rec["metrics"]) > _MAX_METRICS:
                break
            n += len(rec["metrics"])
            j += 1
        return records[i:j]

    def _mlflow(self):
        """The run's MLflow client, made once."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def _send(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self._mlflow()
        with http_limits(self.timeout_s, retries=1):
            if records[0]["kind"] == "metrics":
                batch = [
                    Metric(k, v, r["ts"], r["step"])
                    for r in records
                    for k, v in r["metrics"].items()
                ]
                for j in range(0, len(batch), _MAX_METRICS):
                    client.log_batch(records[0]["run_id"], metrics=batch[j : j + _MAX_METRICS])
                return
            (r,) = records
            run_id, kind = r["run_id"], r["kind"]
            if kind in ("params", "tags"):
                make = Param if kind == "params" else RunTag
                items = [make(k, v) for k, v in r[kind].items()]
                for j in range(0, len(items), _MAX_PARAMS):
                    client.log_batch(run_id, **{kind: items[j : j + _MAX_PARAMS]})
            elif kind == "artifact":
                if not Path(r["path"]).exists():
                    raise FileNotFoundError(2, "no such file", r["path"])
                upload = client.log_artifacts if Path(r["path"]).is_dir() else client.log_artifact
                upload(run_id, r["path"], r.get("artifact_path"))
            elif kind == "text":
                client.log_text(run_id, r["text"], r["artifact_file"])
            elif kind == "status":
                client.set_terminated(run_id, r["status"], r.get("end_time"))
            else:
                raise ValueError(f"unknown record kind {kind!r}")

    # -- files and notes -----------------------------------------------------------------
    def _append(self, records: list[dict[str, Any]]) -> None:
        with locked_file(self.pending, create=True) as fh:
            end = fh.seek(0, os.SEEK_END)
            torn = end > 0 and fh.seek(end - 1) >= 0 and fh.read(1) != "\n"
            fh.write(("\n" if torn else "") + "".join(json.dumps(r) + "\n" for r in records))
            fh.flush()

    def _reject(self, lines: list[str], reason: str) -> None:
        with locked_file(self.rejected, create=True) as fh:
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = line
                fh.write(json.dumps({"error": reason, "record": record}) + "\n")
        if not self._refused:
            self.echo(
                f"tracking: a record cannot be sent to {self.uri} ({reason}); it is kept in "
                f"{self.rejected}"
            )
        self._refused += len(lines)

    def note_failure(self, exc: BaseException) -> bool:
        """Take note of a failed call made elsewhere; True when it was transient (the server
        is then treated as unreachable: records wait in the pending file)."""
        transient, reason = classify(exc)
        if transient:
            self._went_down(reason)
        return transient

    def _went_down(self, reason: str) -> None:
        self._next_try = time.monotonic() + self.retry_every_s
        if self.down is None:
            self.echo(
                f"tracking: server {self.uri} unavailable ({reason}), records kept in "
                f"{self.pending}; will resend"
            )
        self.down = reason

    def close(self) -> int:
        """Send what is pending (whatever the back-off); returns the records left unsent,
        said in one line naming the file that keeps them."""
        self.flush(force=True)
        left = count_records(self.pending)
        if left:
            self.echo(
                f"tracking: {left} record(s) could not be sent to {self.uri} ({self.down}); "
                f"they are kept in {self.pending} and are sent when this run is run again"
            )
        return left


def pending_note(run_dir: str | Path) -> str | None:
    """One line on tracking records a run folder still holds (None: nothing unsent)."""
    run_dir = Path(run_dir)
    left, refused = count_records(run_dir / PENDING_FILE), count_records(run_dir / REJECTED_FILE)
    notes = []
    if left:
        notes.append(f"{left} record(s) not yet sent to MLflow, kept in {run_dir / PENDING_FILE}")
    if refused:
        notes.append(f"{refused} record(s) refused by MLflow, kept in {run_dir / REJECTED_FILE}")
    return "; ".join(notes) or None


def resend_pending(cfg: TrackingConfig, run_dir: str | Path, experiment_default: str) -> str | None:
    """Send the records a run folder keeps from an outage; returns :func:`pending_note`.

    ``cfg`` is the :class:`~cellst.tracking.TrackingConfig` of the run. Does nothing (and
    no network) when there is no pending file or tracking is disabled.
    """
    run_dir = Path(run_dir)
    if cfg.enabled and (run_dir / PENDING_FILE).exists():
        uri = resolve_tracking(cfg, run_dir, experiment_default)[0]
        BufferedMetricLogger(
            uri, None, run_dir, timeout_s=cfg.timeout_s, retry_every_s=cfg.retry_every_s
        ).close()
    return pending_note(run_dir)
