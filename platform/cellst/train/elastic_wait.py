"""``train.node_wait_s`` for an elastic group (``train.min_workers``): a limit Ray lacks.

A fixed worker group waits for room in tries that time out, so cellst bounds its wait by
bounding the tries (:func:`cellst.train.trainer.node_wait_policy`). Ray Train's elastic
policy (Ray 2.60, ``ElasticScalingPolicy.make_decision_for_non_running_worker_group``)
makes no try at all while the cluster has room for fewer than ``min_workers``: its
controller stays in the state it was in (RESTARTING after a lost node), no try times out,
and on a fixed cluster that lost its nodes the training waited for ever.

Nothing outside the controller can see that wait while it lasts: the controller's control
loop then re-asks the policy at once, without ever awaiting, so its actor answers no call
(``get_state``, ``abort``) until the loop moves on, and it holds a whole core meanwhile.
:class:`ElasticWaitLimit` therefore runs inside the controller, as a Ray Train controller
callback called on every step of that loop (``after_controller_state_update``). It adds up
the time spent in the states in which the policy can decline (over the whole run, as
``node_wait_s`` is a total; a try itself is bounded by the try's timeout), paces the
loop while the policy keeps declining, and past the limit raises :class:`NodeWaitExceeded`.
Ray Train ends the run with it (a callback's error is a controller failure, and a
controller that holds no group cannot retry), and the driver reports it as the one-line
"found no room" error of a fixed group (:func:`cellst.raycluster.found_no_room`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback

#: the controller states in which no worker group runs and each step asks the scaling policy
#: whether to place one (Ray 2.60, ``TrainController._step``): the elastic policy's "not
#: yet" leaves the controller there
WAITING_STATES = frozenset({"INITIALIZING", "RESTARTING", "RESCHEDULING"})


def state_name(state: Any) -> str:
    """The name of a Ray Train controller state (``"SCHEDULING"``...), "" when unknown."""
    kind = getattr(state, "_state_type", None)  # TrainControllerState's only record of it
    return str(getattr(kind, "name", ""))


class NodeWaitExceeded(RuntimeError):
    """An elastic group found room for fewer than ``train.min_workers`` for the whole of
    ``train.node_wait_s``. Told apart from other failures by its class name
    (:func:`cellst.raycluster.found_no_room`), as Ray Train hands it back wrapped."""

    def __init__(self, limit_s: float, waited_s: float) -> None:
        super().__init__(
            f"the elastic worker group waited {waited_s:.0f} s in all for room for "
            f"train.min_workers workers (the limit: train.node_wait_s={limit_s:g} s)"
        )
        self.limit_s, self.waited_s = limit_s, waited_s

    def __reduce__(self):  # raised in the controller, re-raised in the driver
        return (type(self), (self.limit_s, self.waited_s))


class ElasticWaitLimit(ControllerCallback):
    """End a Ray Train run whose controller has waited ``limit_s`` in all for a group.

    Parameters
    ----------
    limit_s : float or None
        Seconds of waiting (summed over the run) before the run ends with
        :class:`NodeWaitExceeded`; None waits for ever (for an autoscaler), only pacing.
    pace_s : float
        Pause after each step that left the controller waiting as it was. Ray's loop asks
        the scaling policy again at once; the policy itself reads the cluster at most once
        a second, so pacing loses nothing and frees the core the loop held.
    clock, sleep : callable
        Time source and pause (replaced in tests).
    """

    def __init__(
        self,
        limit_s: float | None,
        pace_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if (limit_s is not None and limit_s <= 0) or pace_s < 0:
            raise ValueError(
                f"limit_s ({limit_s}) must be positive, pace_s ({pace_s}) not negative"
            )
        self.limit_s, self.pace_s = limit_s, pace_s
        self._clock, self._sleep = clock, sleep
        self.waited_s = 0.0
        self._last: float | None = None  # when the controller entered its current state

    def after_controller_start(self, train_run_context: Any) -> None:
        """The controller starts in INITIALIZING: its wait counts from here."""
        self._last = self._clock()

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        """Count the time ``previous_state`` lasted if it was a wait; end a run that has
        waited too long and still waits; pace a wait that did not change."""
        now = self._clock()
        if self._last is not None and state_name(previous_state) in WAITING_STATES:
            self.waited_s += now - self._last
        self._last = now
        waiting = state_name(current_state) in WAITING_STATES
        if waiting and self.limit_s is not None and self.waited_s >= self.limit_s:
            raise NodeWaitExceeded(self.limit_s, self.waited_s)
        if waiting and previous_state is current_state and self.pace_s:
            self._sleep(self.pace_s)  # the policy declined; the loop would ask again at once
