"""Entry point for ``ray submit cluster.yaml experiments/ray_submit.py -- COMMAND ARGS...``.

Runs a ``cellst`` command on the head node against the running cluster (``ray.init()``
joins it), with MLflow pointed at the head's tracking server unless the environment or the
config says otherwise. ``ray submit`` runs this file from the home folder; the command runs
in the checkout the launcher uploaded (``~/cellst``), so relative paths such as
``experiments/cellseg2022.yaml`` mean what they mean on your machine. Examples::

    ray submit cluster.yaml experiments/ray_submit.py -- ingest /shared/raw --out /shared/store
    ray submit cluster.yaml experiments/ray_submit.py -- stpp experiments/cellseg2022.yaml
    ray submit cluster.yaml experiments/ray_submit.py -- predict --checkpoint /shared/runs/x/\
checkpoints/best --input /shared/store --set-name pseudo --num-actors 4 --num-gpus-per-actor 1
"""

from __future__ import annotations

import os
import sys


def head_tracking_uri() -> str:
    """The MLflow server that ``cluster.yaml`` starts on the head: it listens on the head's
    own address (the one Ray uses for this node), not on loopback, so workers reach it."""
    from ray.util import get_node_ip_address

    return f"http://{get_node_ip_address()}:{os.environ.get('CELLST_MLFLOW_PORT', '5000')}"


def main() -> None:
    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = head_tracking_uri()
    os.environ.setdefault("RAY_ADDRESS", "auto")
    checkout = os.path.expanduser("~/cellst")  # the launcher's file_mounts put it there
    if os.path.isdir(checkout):
        os.chdir(checkout)
    from cellst.cli import main as cellst_main

    sys.argv = ["cellst", *sys.argv[1:]]
    cellst_main()


if __name__ == "__main__":
    main()
