"""The checkpoints of a training run, as cellst checkpoint directories.

Layout of ``<run_dir>/<run_name>/``::

    run.json                       state of the run (MLflow run id, config hash, status)
    checkpoints/epoch_007/         the last ``keep_last`` epochs
    checkpoints/best/              best validation F1
    checkpoints/last/              the latest epoch
    checkpoints/snapshot_e007/     ST++ snapshots (about 1/3, 2/3 and the end), always kept
    resume/train_state.pt          the latest epoch's training state (train.num_workers=0)
    overlays/<item>.png            image | label | prediction of validation items

Every checkpoint directory holds ``model.pt`` and ``model.json`` (loadable with
``cellst.model.load_model``); the resumable training state (optimizer, scheduler, epoch)
lives in Ray Train's own checkpoints, or, for a run in this process (``train.num_workers=0``,
where Ray Train keeps none), in ``resume/train_state.pt``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cellst.fs import CorruptFileError, atomic_write_json, read_json
from cellst.model.checkpoint_files import INFO_FILE, WEIGHTS_FILE
from cellst.train.config import CHECKPOINTS_DIR, OVERLAYS_DIR

MODEL_FILES = (WEIGHTS_FILE, INFO_FILE)
#: the resumable training state beside a Ray checkpoint's model files
TRAIN_STATE_FILE = "train_state.pt"
#: names of a run's kept checkpoints under ``checkpoints/``
BEST, LAST = "best", "last"


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps its files.

    ``writer``: the attempt that trains into the run now (:func:`claim`); the checkpoints
    published through these paths land only while it is still the run's writer, so that
    the Ray Train workers of a killed attempt, which Ray stops seconds after its driver,
    never publish into the attempt that took the run over (with ``--force``, another
    config's). None: no check (a reader, a Tune trial's own folder).
    """

    root: Path
    writer: str | None = None

    def claim(self, writer: str) -> RunPaths:
        """Name ``writer`` the run's one writer from now on (:func:`cellst.fs.claim_writing`,
        under the run's lock); the paths its workers publish through."""
        from cellst.fs import claim_writing

        claim_writing(self.root, writer)
        return RunPaths(self.root, writer)

    def check_writer(self) -> None:
        """Raise :class:`cellst.fs.WriterReplaced` unless :attr:`writer` still writes the
        run (called right before a published file is renamed into place)."""
        if self.writer is not None:
            from cellst.fs import check_writing

            check_writing(self.root, self.writer)

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def best(self) -> Path:
        """The checkpoint the selection rule keeps (``train.best_within_se``)."""
        return self.checkpoints / BEST

    @property
    def last(self) -> Path:
        """The checkpoint of the latest epoch."""
        return self.checkpoints / LAST

    @property
    def overlays(self) -> Path:
        return self.root / OVERLAYS_DIR

    @property
    def checkpoint_list(self) -> Path:
        """``checkpoints.json``: each checkpoint folder of a finished run, by name."""
        return self.root / "checkpoints.json"

    @property
    def state(self) -> Path:
        return self.root / "run.json"

    @property
    def resume_state(self) -> Path:
        """The latest epoch's training state of a run in this process (local mode)."""
        return self.root / "resume" / TRAIN_STATE_FILE

    def snapshots(self) -> list[Path]:
        """ST++ snapshots in epoch order."""
        return sorted(self.checkpoints.glob("snapshot_e*"))

    @property
    def workers(self) -> Path:
        """``workers/rank<N>.json``: where each rank of the latest worker group runs."""
        return self.root / "workers"

    def worker_file(self, rank: int) -> Path:
        return self.workers / f"rank{rank}.json"

    @property
    def group_sizes_file(self) -> Path:
        """``worker_groups.json``: the size of each worker group that started, in
        order (an elastic group, ``train.min_workers``, shrinks and grows back)."""
        return self.root / "worker_groups.json"  # (workers/ holds one record per rank)

    def _recorded_group_sizes(self) -> list[int]:
        try:
            return read_json(self.group_sizes_file, missing=[], expect=list)
        except (OSError, CorruptFileError):  # (a record, not worth failing a training for)
            return []

    def group_sizes(self) -> list[int]:
        """The sizes of the worker groups that ran, in order, a restart of the same size
        counted once (``[2, 1, 2]``: a group of two went on with one, then grew back)."""
        sizes = self._recorded_group_sizes()
        return [n for i, n in enumerate(sizes) if i == 0 or n != sizes[i - 1]]

    def record_group_size(self, world: int) -> None:
        """Rank 0 of a starting worker group adds its size to :meth:`group_sizes`."""
        atomic_write_json(self.group_sizes_file, [*self._recorded_group_sizes(), world])

    def worker_records(self) -> list[dict[str, Any]]:
        """Each rank's record (rank, world_size, node_id, host, pid, device, placement
        group), by rank; a record being replaced or unreadable is left out."""
        records = []
        for path in self.workers.glob("rank*.json"):
            try:
                record = read_json(path)
            except (OSError, ValueError):
                continue
            if isinstance(record.get("rank"), int):
                records.append(record)
        return sorted(records, key=lambda r: r["rank"])

    def read_state(self) -> dict[str, Any]:
        return read_json(self.state, missing={})

    def write_state(self, **update: Any) -> dict[str, Any]:
        state = {**self.read_state(), **update}
        atomic_write_json(self.state, state, default=str)
        return state


def save_epoch(
    directory: Path, model: torch.nn.Module, model_cfg, state: dict, metrics: dict
) -> None:
    """A Ray checkpoint directory: a cellst checkpoint plus the resumable training state."""
    from cellst.model import save_checkpoint

    save_checkpoint(directory, model, model_cfg, {k: v for k, v in metrics.items()})
    torch.save(state, directory / TRAIN_STATE_FILE)


def keep_resume_state(paths: RunPaths, src: Path) -> None:
    """Keep the training state of checkpoint directory ``src`` as the run's resume state
    (atomically: a re-run reads the previous epoch's whole state, or this one's)."""
    from cellst.fs import atomic_write

    atomic_write(
        paths.resume_state,
        lambda tmp: shutil.copyfile(src / TRAIN_STATE_FILE, tmp),
        before_rename=paths.check_writer,
    )


def _publish(paths: RunPaths, src: Path, dst: Path) -> None:
    """Copy the model files of ``src`` to ``dst`` atomically (temp sibling, then
    :func:`cellst.fs.replace_dir`, which puts the old folder back if the swap fails), while
    ``paths.writer`` still writes the run (:meth:`RunPaths.check_writer`)."""
    from cellst.fs import link_or_copy, replace_dir, stale_siblings, temp_sibling

    paths.check_writer()  # first: a replaced attempt must not clear the new one's copies
    for stale in [*stale_siblings(dst, ".publishing"), *stale_siblings(dst, "")]:
        shutil.rmtree(stale, ignore_errors=True)  # of a rank 0 killed mid-copy
    tmp = temp_sibling(dst, suffix=".publishing")
    tmp.mkdir(parents=True)
    try:
        for name in MODEL_FILES:
            link_or_copy(src / name, tmp / name)
        paths.check_writer()  # and last, right before the copy is renamed into place
        replace_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_best(paths: RunPaths, src: Path) -> None:
    """Publish checkpoint directory ``src`` as the run's ``best/``: called once its epoch
    is kept for a resume (Ray Train holds it, or the resume state is saved), so that best/
    never holds an epoch a resumed run discards."""
    _publish(paths, src, paths.best)


def restore_best(paths: RunPaths, epoch: int | None) -> None:
    """On resume: make ``best/`` the restored selection's epoch where it holds another (a
    run of an older cellst, killed between publishing best/ and keeping its epoch), from
    that epoch's folder if it is still kept."""
    if not epoch or not paths.best.is_dir():
        return
    from cellst.model.checkpoint_files import CheckpointError, read_checkpoint_info

    try:
        held = read_checkpoint_info(paths.best)[1].get("epoch")
    except (CheckpointError, OSError):
        held = None
    src = paths.checkpoints / f"epoch_{int(epoch):03d}"
    if held != epoch and src.is_dir():
        _publish(paths, src, paths.best)


def keep_checkpoints(
    paths: RunPaths, src: Path, epoch: int, *, is_best: bool, is_snapshot: bool, keep_last: int
) -> None:
    """Publish the epoch's checkpoint as epoch/last (and best/snapshot); prune old epochs."""
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    _publish(paths, src, paths.checkpoints / f"epoch_{epoch:03d}")
    _publish(paths, src, paths.last)
    if is_best:
        _publish(paths, src, paths.best)
    if is_snapshot:
        _publish(paths, src, paths.checkpoints / f"snapshot_e{epoch:03d}")
    epochs = sorted(paths.checkpoints.glob("epoch_*"))
    for old in epochs[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
