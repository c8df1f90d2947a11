"""``train.node_wait_s`` for an elastic group (``train.min_workers``): a limit Ray lacks.

A fixed worker group waits for room in tries that time out, so cellst bounds its wait by
bounding the tries (:func:`cellst.train.trainer.node_wait_policy`). Ray Train's elastic
policy (Ray 2.60, ``ElasticScalingPolicy.make_decision_for_non_running_worker_group``)
makes no try at all while the cluster has room for fewer than ``min_workers``: its
controller stays in the state it was in (RESTARTING after a lost node), no try times out,
and on a fixed cluster that lost its nodes the training waited for ever.

:class:`ElasticWaitLimit` watches the controller from the driver: every ``poll_s`` it asks
the controller its state, adds up the time it spends deciding whether to place a group
(the states in which the policy can decline; over the whole run, as ``node_wait_s`` is a
total; a try itself is bounded by the try's timeout), and past the limit aborts
the run as Ray Train's own Ctrl-C handler does (``TrainController.abort``). The driver then
reports it as the one-line "found no room" error of a fixed group.
"""

from __future__ import annotations

import threading
import time
from typing import Any

#: the controller states in which no worker group runs and each step asks the scaling policy
#: whether to place one (Ray 2.60, ``TrainController._step``): the elastic policy's "not
#: yet" leaves the controller there
WAITING_STATES = frozenset({"INITIALIZING", "RESTARTING", "RESCHEDULING"})


def state_name(state: Any) -> str:
    """The name of a Ray Train controller state (``"SCHEDULING"``...), "" when unknown."""
    kind = getattr(state, "_state_type", None)  # TrainControllerState's only record of it
    return str(getattr(kind, "name", ""))


class ElasticWaitLimit:
    """Abort a Ray Train run whose controller has waited ``limit_s`` in all for a group.

    Parameters
    ----------
    limit_s : float
        Seconds of waiting (summed over the run) before the run is aborted.
    poll_s : float
        Seconds between two questions to the controller; the wait is measured to about this.
    """

    def __init__(self, limit_s: float, poll_s: float = 2.0) -> None:
        if limit_s <= 0 or poll_s <= 0:
            raise ValueError(f"limit_s ({limit_s}) and poll_s ({poll_s}) must be positive")
        self.limit_s = limit_s
        self.poll_s = poll_s
        self.fired = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, controller: Any) -> None:
        """Start watching ``controller`` (a ``TrainController`` actor handle) in a thread."""
        self._thread = threading.Thread(
            target=self._run, args=(controller,), name="cellst-elastic-wait", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (the fit returned or raised)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 5)

    def _run(self, controller: Any) -> None:
        import ray

        last, waited = time.monotonic(), 0.0
        while not self._stop.wait(self.poll_s):
            try:
                state = ray.get(controller.get_state.remote(), timeout=60)
            except ray.exceptions.GetTimeoutError:  # a busy controller: ask again
                continue
            except Exception:  # noqa: BLE001 - the controller ended (finished, failed, aborted)
                return
            now = time.monotonic()
            if state_name(state) in WAITING_STATES:
                waited += now - last
            last = now
            if waited >= self.limit_s and not self._stop.is_set():
                self.fired.set()
                controller.abort.remote()  # the actor exits: fit() raises RayActorError
                return
