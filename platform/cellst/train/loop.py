"""``train_loop_per_worker``: what each Ray Train worker runs.

It starts the run's one crop stream (augmented by CPU tasks), then runs the epochs on it
(:func:`cellst.train.worker.run_epochs`: each rank steps on its share, rank 0 validates and
saves a checkpoint, every rank reports). A restarted or resumed run continues from
``ray.train.get_checkpoint()``. This module imports neither torch nor MONAI, so that the
stream starts before the worker spends seconds importing them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, TypeVar

import ray.train

from cellst.fs import remove_orphan_temp_dirs
from cellst.train.config import CHECKPOINT_TEMP_PREFIX

T = TypeVar("T")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function. ``config`` comes from :func:`cellst.train.trainer.train`."""
    from cellst.experiment import ExperimentConfig  # configs only: no torch, no Ray Data
    from cellst.raycluster import quiet_logs

    quiet_logs()  # also when the cluster was started without cellst's runtime environment
    remove_orphan_temp_dirs(CHECKPOINT_TEMP_PREFIX)  # of workers killed on this node before
    cfg = ExperimentConfig.model_validate(config["experiment"])
    tcfg = cfg.train
    # the run's one crop stream (each epoch takes its steps from it; no restart per epoch),
    # started before anything heavy is imported here: its read-and-augment tasks start up
    # (new processes that import torch and MONAI) while this worker imports them too and
    # builds its model, instead of after
    batches = _first_item_fetched_now(
        ray.train.get_dataset_shard("train").iter_batches(
            batch_size=tcfg.batch_size,
            batch_format="numpy",
            drop_last=True,
            prefetch_batches=tcfg.prefetch_batches,
        )
    )
    try:
        from cellst.train.worker import run_epochs  # torch and MONAI: after the stream

        run_epochs(config, cfg, batches)
    finally:
        # now, while Ray is up: a stream finalised at exit (local mode runs in the driver)
        # called Ray after its shutdown, which started a new local cluster and hung
        batches.close()


class _FirstItemFetchedNow:
    """``items`` as an iterator whose first item is already being fetched, by a background
    thread, so that a lazy stream starts now rather than at the first ``next()``. An error
    of that fetch is raised by the first ``next()``, as without the thread. :meth:`close`
    closes the stream (Ray Data's iterator ends its executor then, not at exit)."""

    def __init__(self, items: Iterator[T] | Any):
        self._it = iter(items)
        self._box: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._fetch, name="cellst-first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._box["item"] = next(self._it)
        except StopIteration:
            self._box["end"] = True
        except BaseException as exc:  # handed to the consumer below
            self._box["error"] = exc

    def __iter__(self) -> _FirstItemFetchedNow:
        return self

    def __next__(self) -> T:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if "error" in self._box:
                raise self._box.pop("error")
            if "item" in self._box:
                return self._box.pop("item")
            if self._box.pop("end", False):
                raise StopIteration
        return next(self._it)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def _first_item_fetched_now(items: Iterator[T] | Any) -> _FirstItemFetchedNow:
    """See :class:`_FirstItemFetchedNow`."""
    return _FirstItemFetchedNow(items)
