"""Durable stage records: what lets an ST++ pipeline survive a crash, Ctrl-C or SIGKILL.

Also the pipeline's own metadata file, ``<pipeline>/pipeline.json`` (:func:`read_meta`,
:func:`update_meta`): the MLflow parent run, the pseudo-label sets the pipeline owns.

Each stage has one JSON record, ``<pipeline>/stages/<n>_<stage>.json``, written atomically
(temporary sibling + rename), holding:

* ``status``: ``pending`` (never ran, or invalidated by ``--force-from``), ``running``
  (started; a record left ``running`` means the process died), ``done``, ``failed`` or
  ``interrupted`` (Ctrl-C);
* ``input_hash``: a hash of everything the stage reads (its configuration and the output
  digests of the stages it depends on);
* ``outputs`` and their ``output_digest`` (which later stages hash as their input);
* the MLflow run id of the stage's child run, start/finish times, attempts, the last error.

:meth:`StageBook.decide` turns a record and the stage's current input hash into one of:

* ``skip``: done with the same inputs, nothing to do;
* ``resume``: started with the same inputs but not finished (a crash); the stage continues
  where it stopped (training resumes from its last checkpoint, prediction skips the items
  already written, the MLflow run is re-attached);
* ``fresh``: never ran, inputs changed, or forced; the stage starts over.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cellst import fs
from cellst.fingerprint import stable_hash

STATUSES = ("pending", "running", "done", "failed", "interrupted")
#: the pipeline's metadata file, beside ``stages/``
META = "pipeline.json"
Decision = Literal["skip", "resume", "fresh"]


def pipeline_lock(pipeline_dir: str | Path) -> Path:
    """The file a process running the pipeline of ``pipeline_dir`` holds locked."""
    return Path(pipeline_dir) / ".lock"


def read_meta(pipeline_dir: str | Path) -> dict[str, Any]:
    """``pipeline.json`` of a pipeline folder (empty before the first run)."""
    p = Path(pipeline_dir) / META
    return fs.read_json(p, missing={})


def update_meta(pipeline_dir: str | Path, **update: Any) -> dict[str, Any]:
    """Merge ``update`` into ``pipeline.json`` (written atomically); the new contents."""
    meta = {**read_meta(pipeline_dir), **update}
    fs.atomic_write_json(Path(pipeline_dir) / META, meta, default=str)
    return meta


@dataclass
class StageRecord:
    """The durable state of one stage."""

    index: int
    name: str
    status: str = "pending"
    input_hash: str | None = None
    output_digest: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    forced: bool = False
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.index}_{self.name}"

    @property
    def seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class StageBook:
    """The records of a pipeline's stages, in order.

    Parameters
    ----------
    root : path
        The pipeline folder; records go to ``root/stages/``.
    names : sequence of str
        Stage names in execution order (stage ``n`` is ``names[n - 1]``).
    """

    def __init__(self, root: str | Path, names: Sequence[str]):
        self.root = Path(root)
        self.names = list(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"stage names must be unique: {self.names}")

    # -- lookup ---------------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self.root / "stages"

    def index(self, name: str) -> int:
        return self.names.index(name) + 1

    def path(self, name: str) -> Path:
        return self.folder / f"{self.index(name)}_{name}.json"

    def get(self, name: str) -> StageRecord:
        p = self.path(name)
        if p.is_file():
            return StageRecord.from_dict(fs.read_json(p))
        return StageRecord(self.index(name), name)

    def records(self) -> list[StageRecord]:
        return [self.get(n) for n in self.names]

    def resolve(self, ref: str | int) -> str:
        """A stage from its number (``4``), name (``retrain_reliable``) or key (``4_...``)."""
        text = str(ref).strip()
        if text.isdigit() and 1 <= int(text) <= len(self.names):
            return self.names[int(text) - 1]
        for i, n in enumerate(self.names, 1):
            if text in (n, f"{i}_{n}"):
                return n
        choices = ", ".join(f"{i} ({n})" for i, n in enumerate(self.names, 1))
        raise ValueError(f"unknown stage {ref!r}; stages are {choices}")

    def _write(self, rec: StageRecord) -> StageRecord:
        fs.atomic_write_json(self.path(rec.name), asdict(rec), default=str)
        return rec

    # -- transitions ----------------------------------------------------------------------------
    def force_from(self, ref: str | int) -> list[str]:
        """Invalidate a stage and every later one: they run again (from scratch) next time.

        Returns the invalidated stage names. Their old outputs stay in the record until they
        are replaced, and ``forced`` stays set until the stage finishes, so a crash between
        this call and the re-run does not lose the request.
        """
        first = self.index(self.resolve(ref))
        names = self.names[first - 1 :]
        for n in names:
            rec = self.get(n)
            rec.status, rec.forced = "pending", True
            self._write(rec)
        return names

    def decide(self, name: str, input_hash: str) -> Decision:
        """``skip``, ``resume`` or ``fresh``: see the module docstring."""
        rec = self.get(name)
        if rec.forced or rec.input_hash != input_hash:
            return "fresh"
        if rec.status == "done":
            return "skip"
        if rec.status in ("running", "failed", "interrupted"):
            return "resume"
        return "fresh"

    def start(self, name: str, input_hash: str, fresh: bool) -> StageRecord:
        """Mark a stage running (keeping the MLflow run id when resuming)."""
        rec = self.get(name)
        if fresh:
            rec.outputs, rec.output_digest, rec.mlflow_run_id = {}, None, None
        rec.status, rec.input_hash = "running", input_hash
        rec.started_at, rec.finished_at, rec.error = time.time(), None, None
        rec.attempts += 1
        return self._write(rec)

    def update(self, name: str, **fields: Any) -> StageRecord:
        rec = self.get(name)
        for k, v in fields.items():
            if k not in StageRecord.__dataclass_fields__:
                raise KeyError(k)
            setattr(rec, k, v)
        return self._write(rec)

    def finish(
        self, name: str, outputs: dict[str, Any], mlflow_run_id: str | None = None
    ) -> StageRecord:
        """Mark a stage done with its outputs (their digest is what later stages hash)."""
        rec = self.get(name)
        rec.status, rec.forced, rec.error = "done", False, None
        rec.outputs = outputs
        rec.output_digest = stable_hash(outputs)
        if mlflow_run_id is not None:
            rec.mlflow_run_id = mlflow_run_id
        rec.finished_at = time.time()
        return self._write(rec)

    def fail(self, name: str, error: str, status: str = "failed") -> StageRecord:
        """Record a stage that stopped before its end: ``failed`` (an error) or
        ``interrupted`` (Ctrl-C, as its training's ``run.json`` says); both resume."""
        rec = self.get(name)
        rec.status, rec.error, rec.finished_at = status, error[:2000], time.time()
        return self._write(rec)

    def reset(self, name: str) -> StageRecord:
        """Back to pending with no inputs (a stage that cannot run for this store)."""
        rec = self.get(name)
        rec.status, rec.input_hash, rec.output_digest, rec.outputs = "pending", None, None, {}
        return self._write(rec)
