"""Mine hard negatives, fine-tune the student, evaluate it — one Ray job.

    python jobs/mine_and_train.py [--config FILE] [--data DIR_OR_URI] [--output DIR_OR_URI]
                                  [--stages embed,search,mine,train,evaluate] [key=value ...]

With no arguments: the embedded default (configs/scifact_minilm.yaml) on local Ray, CPU.
On a cluster: ``ray job submit --working-dir . -- python jobs/mine_and_train.py --config ...``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a submitted working dir runs without `pip install -e .`

from raymine.config import ConfigError, load_config  # noqa: E402
from raymine.pipeline import STAGES, PipelineError, run_pipeline  # noqa: E402
from raymine.raycluster import init_ray, shutdown_ray  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "scifact_minilm.yaml"
log = logging.getLogger("mine_and_train")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: the embedded SciFact run)")
    p.add_argument("--data", help="BEIR folder or Parquet tables (overrides ingest.data)")
    p.add_argument("--output", help="output folder or URI (overrides output)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list out of {','.join(STAGES)}")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. mine.method=naive search.num_shards=4")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("RAYMINE_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"ingest.data={args.data}")
    if args.output:
        overrides.append(f"output={args.output}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        p.error(str(e))
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]

    init_ray()
    try:
        report = run_pipeline(cfg, stages)
    except PipelineError as e:
        log.error("%s", e)
        return 2
    finally:
        shutdown_ray()
    print(Path(cfg.output, "report.md").read_text() if "://" not in cfg.output else report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
