"""Ray Data's streaming executor, kept from spinning while its stream waits for the consumer.

Once a stream's read tasks have output ready that the consumer (the training step, the
model actors) has not taken yet, Ray Data 2.60 holds that output back (backpressure), and
its scheduling loop's ``ray.wait`` on those tasks returns at once, each time: the loop then
runs hundreds of times a second with nothing to do (measured here: 2,600-7,400 steps per
10 s, against about 100 while tasks run). It holds a CPU core and the GIL of its process:
a Ray Train worker's ``SplitCoordinator`` actor (79 CPU-seconds in a 3-minute training on
2 cores, 12 paced), or, with ``train.num_workers=0``, the training process itself, whose
step slowed from about 50 to 11-29 images/s. :class:`PacedLoop` sleeps in a step that
made no progress since the previous one (no task output read, no task submitted, no
output taken by the consumer) and comes sooner than :data:`MIN_STEP_S` after it; a step
after progress runs at once, so a fast stream is never capped. Ray's loop calls each
execution callback once per step; ``benchmarks/bench_train.py`` measures the difference.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback

#: the shortest time between two steps of the scheduling loop that make no progress
#: (Ray's own wait for a running task is 0.1 s)
MIN_STEP_S = 0.02
#: set to 0 to leave Ray Data's loop as it is (for comparisons, or a Ray without the spin)
ENV_SWITCH = "CELLST_PACED_DATA_LOOP"
#: the operator counters whose change means the loop moved the stream on
PROGRESS_COUNTERS = ("num_task_outputs_generated", "num_tasks_submitted", "num_outputs_taken")


def progress_mark(executor: Any) -> tuple[int, ...] | None:
    """What the stream has done so far: each operator's :data:`PROGRESS_COUNTERS`; None
    where this Ray's executor does not expose them (every step is then paced)."""
    try:
        return tuple(
            int(getattr(op.metrics, name))
            for op in executor._topology  # Ray Data 2.60 (pinned)
            for name in PROGRESS_COUNTERS
        )
    except (AttributeError, TypeError):
        return None


class PacedLoop(ExecutionCallback):
    """At most one idle scheduling step per :data:`MIN_STEP_S` (see the module docstring)."""

    def __init__(self) -> None:
        self._last: float | None = None
        self._mark: tuple[int, ...] | None = None

    def on_execution_step(self, executor: Any) -> None:
        now = time.perf_counter()
        mark = progress_mark(executor)
        idle = mark is None or mark == self._mark
        if idle and self._last is not None and (wait := MIN_STEP_S - (now - self._last)) > 0:
            time.sleep(wait)
            now += wait
        self._last, self._mark = now, mark


def pace(dataset: Any) -> Any:
    """``dataset`` with :class:`PacedLoop` in its execution context (returned, for
    chaining). The datasets derived from it, and the ``SplitCoordinator`` that serves it to
    Ray Train's workers, run with the same context. ``CELLST_PACED_DATA_LOOP=0`` in the
    environment leaves it out."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return dataset
    classes = dataset.context.custom_execution_callback_classes
    if PacedLoop not in classes:
        classes.append(PacedLoop)
    return dataset
