"""Ray Data's streaming executor, kept from spinning while its stream waits for the consumer.

Once a stream's read tasks have output ready that the consumer (the training step, the
model actors) has not taken yet, Ray Data 2.60 holds that output back (backpressure), and
its scheduling loop's ``ray.wait`` on those tasks returns at once, each time: the loop then
runs thousands of times a second (measured here: 2,600-7,400 steps per 10 s instead of
about 100). It holds a CPU core and the GIL of its process: a Ray Train worker's
``SplitCoordinator`` actor (half a core of a 2-core machine, taken from the training), or,
with ``train.num_workers=0``, the training process itself, where the step slowed from
about 50 to 17-28 images/s. :class:`PacedLoop` sleeps in any step of the loop that comes
sooner than :data:`MIN_STEP_S` after the previous one. A step that waited for a task is
longer than that and is never delayed; an idle one costs a sleep. Ray's loop calls each
execution callback once per step; ``benchmarks/bench_train.py`` measures the difference.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback

#: the shortest time between two steps of the scheduling loop (Ray's own wait is 0.1 s)
MIN_STEP_S = 0.02
#: set to 0 to leave Ray Data's loop as it is (for comparisons, or a Ray without the spin)
ENV_SWITCH = "CELLST_PACED_DATA_LOOP"


class PacedLoop(ExecutionCallback):
    """At most one scheduling step per :data:`MIN_STEP_S` (see the module docstring)."""

    def __init__(self) -> None:
        self._last: float | None = None

    def on_execution_step(self, executor: Any) -> None:
        now = time.perf_counter()
        if self._last is not None and (wait := MIN_STEP_S - (now - self._last)) > 0:
            time.sleep(wait)
            now += wait
        self._last = now


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
