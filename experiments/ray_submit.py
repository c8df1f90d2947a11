"""Entry point for ``ray submit cluster.yaml experiments/ray_submit.py -- COMMAND ARGS...``.

Runs a ``cellst`` command on the head node against the running cluster (``ray.init()``
joins it), with MLflow pointed at the head's tracking server unless the environment or the
config says otherwise. Examples::

    ray submit cluster.yaml experiments/ray_submit.py -- ingest /shared/raw --out /shared/store
    ray submit cluster.yaml experiments/ray_submit.py -- stpp experiments/cellseg2022.yaml
    ray submit cluster.yaml experiments/ray_submit.py -- predict --checkpoint /shared/runs/x/\
checkpoints/best --input /shared/store --set-name pseudo --num-actors 4 --num-gpus-per-actor 1
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    os.environ.setdefault("RAY_ADDRESS", "auto")
    from cellst.cli import main as cellst_main

    sys.argv = ["cellst", *sys.argv[1:]]
    cellst_main()


if __name__ == "__main__":
    main()
