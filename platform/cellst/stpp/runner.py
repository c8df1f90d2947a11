"""The generic stage runner of an ST++ pipeline.

:class:`StageRunner` runs one stage body under its durable record
(:class:`cellst.stpp.stages.StageBook`): it hashes the stage's inputs, skips a stage done
with the same inputs (unless its outputs are gone), resumes one that was interrupted, starts
the rest afresh, runs each non-training stage inside an MLflow child run of the pipeline's
parent run (:class:`cellst.stpp.parent_run.ParentRun`; a training logs to its own), and
records the outcome: done with its outputs, failed, or interrupted (Ctrl-C, SIGTERM).

It knows nothing of what the stages compute; :mod:`cellst.stpp.pipeline` holds the bodies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cellst.fingerprint import stable_hash
from cellst.stpp.parent_run import ParentRun
from cellst.stpp.stages import StageBook, StageRecord


class UntilReached(Exception):
    """The stage the caller asked to stop after (``until``) is done: no later stage runs."""


class StageRunner:
    """Runs the stages of one pipeline folder, each at most once per distinct input.

    Parameters
    ----------
    book : StageBook
        The pipeline's durable stage records.
    parent : ParentRun
        The pipeline's MLflow parent run (child runs of non-training stages go under it).
    titles : dict
        A short title per stage name, for the log lines.
    log : callable
        Where progress lines go.
    """

    def __init__(
        self,
        book: StageBook,
        parent: ParentRun,
        titles: dict[str, str],
        log: Callable[[str], None] = print,
    ):
        self.book = book
        self.parent = parent
        self.titles = titles
        self.log = log
        #: the stage after which the runner stops (raises :class:`UntilReached`), or None
        self.until: str | None = None
        self.ran: list[str] = []
        self.skipped: list[str] = []
        #: the stage running now was forced (--force-from): its sets are not resumed
        self.fresh = False

    def __call__(
        self,
        name: str,
        inputs: dict[str, Any],
        body: Callable[[str], dict],
        training: bool = False,
        present: Callable[[dict], bool] | None = None,
        recorded_as: list[dict[str, Any]] | None = None,
    ) -> StageRecord:
        """Run ``body(decision)`` as stage ``name`` unless it is done with these inputs.

        ``decision`` is ``"resume"`` or ``"fresh"`` (:meth:`StageBook.decide`).
        ``present(outputs)`` says whether a finished stage's outputs still exist; a stage
        whose outputs were deleted runs again. A training stage (``training``) logs to its
        own MLflow run, whose id its outputs name (``mlflow_run_id``); any other stage runs
        inside a child run of the parent. ``recorded_as``: the same inputs as earlier cellsts
        hashed them; a record of any of those is taken as a record of ``inputs`` (and
        rewritten so).
        """
        book = self.book
        n = book.index(name)
        h = stable_hash(inputs)
        old = book.get(name).input_hash
        if old not in (None, h) and any(old == stable_hash(e) for e in recorded_as or []):
            book.update(name, input_hash=h)
        decision = book.decide(name, h)
        head = f"[stpp] stage {n}/{len(book.names)} {name} ({self.titles[name]})"
        if decision == "skip" and present is not None and not present(book.get(name).outputs):
            self.log(f"{head}: done before, but its outputs are gone -> running again")
            decision = "fresh"
        if decision == "skip":
            self.log(f"{head}: done, inputs unchanged -> skipped")
            self.skipped.append(name)
            return self._stop_if_until(name, book.get(name))
        self.log(f"{head}: {'resuming' if decision == 'resume' else 'running'}")
        # --force-from: its sets are predicted anew, not resumed (a stage re-run because its
        # inputs changed resumes the sets whose own inputs did not: a new reliable fraction
        # re-scores stage 2 without predicting again)
        self.fresh = book.get(name).forced
        earlier_run = book.get(name).mlflow_run_id if decision == "fresh" else None
        rec = book.start(name, h, fresh=decision == "fresh")
        t0 = time.perf_counter()
        try:
            if training:
                outputs = body(decision)
                run_id = outputs.get("mlflow_run_id")
            else:
                with self.parent.child(rec, replaces=earlier_run) as run_id:
                    book.update(name, mlflow_run_id=run_id)
                    outputs = body(decision)
        except BaseException as exc:
            from cellst.raycluster import Terminated

            interrupted = isinstance(exc, KeyboardInterrupt)  # Ctrl-C, or SIGTERM as one
            how = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
            why = f"interrupted ({how})" if interrupted else f"{type(exc).__name__}: {exc}"
            book.fail(name, why, "interrupted" if interrupted else "failed")
            raise
        rec = book.finish(name, dict(outputs), run_id)
        self.ran.append(name)
        self.log(f"{head}: done in {time.perf_counter() - t0:.0f} s")
        return self._stop_if_until(name, rec)

    def _stop_if_until(self, name: str, rec: StageRecord) -> StageRecord:
        if name == self.until:
            raise UntilReached(name)
        return rec
