"""Is PercPos's lead over naive top-k outside the seed noise? The default job (SciFact, MiniLM + BM25) run
for naive and PercPos with several seeds each (mining sampling + training order/init), printing mean ± std
of nDCG@10 on SciFact test, and the same under two variants:

* ``one_positive``: every multi-positive training query keeps ONE random positive (the others hidden from
  mining and training, as in users' data with incomplete labels: ``mine.hide_positive_fraction=1``);
* ``pos_aware``: positive-aware masking of in-batch negatives on (``train.positive_aware=mine``).

Each (variant, method) shares one output folder, so ingest, embed and search run once and each further
seed re-runs mine → train → evaluate only (≈ 5 min per seed on 2 cores).

    .venv/bin/python bench/bench_seeds.py --seeds 13,14,15 --variants base,one_positive,pos_aware
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"base": [], "one_positive": ["mine.hide_positive_fraction=1.0"], "pos_aware": ["train.positive_aware=mine"]}


def run(out: Path, method: str, seed: int, extra: list[str]) -> float:
    cmd = [sys.executable, str(ROOT / "jobs" / "mine_and_train.py"), "--output", str(out), f"mine.method={method}",
           f"mine.seed={seed}", f"train.seed={seed}", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return float(report["evaluate"]["after"]["ndcg_at_10"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="13,14,15")
    ap.add_argument("--variants", default="base,one_positive,pos_aware")
    ap.add_argument("--methods", default="naive,percpos")
    ap.add_argument("--work", default="runs/bench_seeds")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for variant in args.variants.split(","):
        for method in args.methods.split(","):
            scores = []
            for seed in seeds:
                scores.append(run(Path(args.work) / variant / method, method, seed, VARIANTS[variant]))
                print(f"{variant:13s} {method:8s} seed {seed}: nDCG@10 {100 * scores[-1]:.2f}", flush=True)
            sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
            rows.append((variant, method, statistics.fmean(scores), sd, scores))
    print("\n| variant | method | nDCG@10 mean ± std | seeds |\n|---|---|---:|---|")
    for variant, method, mean, sd, scores in rows:
        print(f"| {variant} | {method} | {100 * mean:.2f} ± {100 * sd:.2f} | "
              f"{', '.join(f'{100 * s:.2f}' for s in scores)} |")
    by = {(v, m): (mu, sd) for v, m, mu, sd, _ in rows}
    for variant in args.variants.split(","):
        if (variant, "naive") in by and (variant, "percpos") in by:
            (a, sa), (b, sb) = by[(variant, "naive")], by[(variant, "percpos")]
            print(f"{variant}: PercPos - naive = {100 * (b - a):+.2f} points; noise (std) {100 * sa:.2f} / "
                  f"{100 * sb:.2f}: {'outside' if abs(b - a) > 2 * max(sa, sb) else 'inside'} 2 std")


if __name__ == "__main__":
    main()
