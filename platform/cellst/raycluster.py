"""Connecting to Ray the same way from the CLI, from ``ray submit`` scripts and from tests."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import ray


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process.

    An explicit ``address`` (or ``RAY_ADDRESS``) joins that cluster; otherwise Ray joins the
    cluster last started on this machine (as on the head node under ``ray submit``) or
    starts a local one with ``num_cpus`` CPUs.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address is None and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    ray.init(address=address, **kwargs)
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Keep Ray Data's per-dataset INFO logs and progress bars out of the terminal.

    cellst draws its own progress bars; set ``CELLST_RAY_PROGRESS=1`` to see Ray's.
    """
    verbose = os.environ.get("CELLST_RAY_PROGRESS", "0") == "1"
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def as_completed(refs: Iterable[ray.ObjectRef]) -> Iterator[Any]:
    """Yield task results in completion order (for progress bars)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])
