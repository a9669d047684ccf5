"""Mine hard negatives, fine-tune the student, evaluate it — one Ray job.

    python jobs/mine_and_train.py [--config NAME|FILE] [--address ADDR] [--data DIR_OR_URI]
                                  [--output DIR_OR_URI] [--stages embed,search,mine,train,evaluate] [key=value ...]

The same command as ``raymine run`` (raymine/cli.py; ``--help`` explains every flag): exit code 0 done,
2 a user error (one line naming the file:line, key or stage and what to do), 1 anything else (with its traceback).
With no arguments: the embedded default (configs/scifact_minilm.yaml) on local Ray, CPU.
Ray: ``--address``, else ``RAY_ADDRESS`` (set by ``ray job submit``), else a head started with ``ray start``
on this machine, else a private local instance.
On a cluster: ``ray job submit --working-dir . -- python jobs/mine_and_train.py --config ...``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a submitted working dir runs without `pip install -e .`

from raymine.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main())
