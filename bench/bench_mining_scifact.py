"""Mining on SciFact train with MiniLM: drop counts, shortfall and known-false-negative rates per method.

Runs the pipeline up to the mine stage for each variant, all sharing one set of teacher embeddings
(embedded once, or reused from a finished run with ``--reuse runs/scifact_minilm``):

* naive top-k and PercPos 0.95, 4 negatives, sampling ``top`` and ``top1_sampled`` (first 10 kept);
* PercPos 0.95 with the ceiling *not* applied in the search and a fixed depth of 100 — what a tool
  that filters a fixed top-k list gets (the shortfall the ceiling-aware search removes);
* analysis mode: half of the multi-positive queries' positives hidden from the teacher, so the share of
  mined negatives that the full qrels call relevant (the known-false-negative rate) can be measured.

    .venv/bin/python bench/bench_mining_scifact.py [--reuse runs/scifact_minilm] [--out bench/out/mining_scifact]

Prints one table and writes it (Markdown + JSON) under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raymine.config import load_config  # noqa: E402
from raymine.pipeline import run_pipeline  # noqa: E402
from raymine.raycluster import init_ray, shutdown_ray  # noqa: E402

VARIANTS = {
    "naive/top": ["mine.method=naive", "mine.sampling=top"],
    "naive/top1_sampled": ["mine.method=naive", "mine.sampling=top1_sampled"],
    "percpos/top": ["mine.method=percpos", "mine.sampling=top"],
    "percpos/top1_sampled": ["mine.method=percpos", "mine.sampling=top1_sampled"],
    "percpos/top, fixed depth 100, no ceiling": ["mine.method=percpos", "mine.sampling=top",
                                                 "search.use_ceiling=false", "search.depth=100"],
    "naive/top, half positives hidden": ["mine.method=naive", "mine.sampling=top", "mine.hide_positive_fraction=0.5"],
    "percpos/top, half positives hidden": ["mine.method=percpos", "mine.sampling=top",
                                           "mine.hide_positive_fraction=0.5"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "scifact_minilm.yaml"))
    p.add_argument("--reuse", help="a finished run whose ingest/ and embed/ folders are copied (same teacher config)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "mining_scifact"))
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "_shared"
    init_ray()
    rows = []
    try:
        for name, overrides in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            run_dir = out / name.replace("/", "_").replace(", ", "_").replace(" ", "_")
            shutil.rmtree(run_dir, ignore_errors=True)
            src = Path(args.reuse) if args.reuse and not base.exists() else base
            if src.exists():  # the same teacher + embed config: the embed stage recognises its manifests
                for sub in ("ingest", "embed"):
                    if (src / sub).exists():
                        shutil.copytree(src / sub, run_dir / sub)
            cfg = load_config(args.config, ["teachers=minilm", "mine.num_negatives=4", "mine.sample_top_k=10",
                                            f"output={run_dir}", *overrides])
            t0 = time.time()
            report = run_pipeline(cfg, ("mine",))
            wall = time.time() - t0
            if not base.exists():
                for sub in ("ingest", "embed"):
                    shutil.copytree(run_dir / sub, base / sub)
            mine = report["stages"]["mine"]["report"]
            t = mine["per_teacher"]["minilm"]
            search = report["stages"]["search:minilm"]
            rows.append({
                "variant": name,
                "queries": t["present"],
                "requested": t["requested"],
                "delivered": t["delivered"],
                "shortfall_pct": round(100 * t["shortfall"], 2),
                "queries_short": t["short"],
                "seen": t["seen"],
                "drop_positive": t["drop_positive"],
                "drop_excluded": t["drop_excluded"],
                "drop_method": t["drop_method"],
                "above_ceiling": t.get("above_ceiling"),
                "known_fn": t["known_fn"],
                "known_fn_rate_pct": round(100 * t["known_fn"] / max(t["delivered"], 1), 2),
                "hidden_positives": report.get("analysis", {}).get("hidden_positives", 0),
                "depth": search.get("depth"),
                "wall_s": round(wall, 1),
            })
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutdown_ray()

    cols = ["variant", "queries", "requested", "delivered", "shortfall_pct", "queries_short", "drop_positive",
            "drop_method", "above_ceiling", "hidden_positives", "known_fn", "known_fn_rate_pct", "wall_s"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r.get(c)) for c in cols) + " |" for r in rows]
    text = "\n".join(md)
    print("\n" + text)
    (out / "mining_scifact.md").write_text(text + "\n")
    (out / "mining_scifact.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
