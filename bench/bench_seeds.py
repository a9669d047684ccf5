"""Is PercPos's lead over naive top-k outside the seed noise? The default job (SciFact, MiniLM + BM25) run
for naive and PercPos with several seeds each (mining sampling + training order/init), printing mean ± std
of nDCG@10 on SciFact test, and the same under two variants:

* ``one_positive``: every multi-positive training query keeps ONE random positive (the others hidden from
  mining and training, as in users' data with incomplete labels: ``mine.hide_positive_fraction=1``);
* ``pos_aware``: positive-aware masking of in-batch negatives on (``train.positive_aware=mine``);
* ``one_negative``: one of the 4 mined negatives per row per epoch (``train.num_hard_negatives=1``; the
  default trains on all of them).

Every run uses one output folder (``--run``, default ``WORK/run``): ingest, embed and the dense search
depend on none of the varied keys, so they run once (or never, when ``--run`` names a finished default run
such as ``runs/scifact_minilm``: their stage keys match) and each run re-does mine → train → evaluate only
(≈ 8 min on 2 cores). A changed key re-runs its stage, so a wrong folder costs time, never correctness.
Every score is appended to ``WORK/scores.jsonl``; the table covers all scores recorded there.

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
VARIANTS = {"base": [], "one_positive": ["mine.hide_positive_fraction=1.0"], "pos_aware": ["train.positive_aware=mine"],
            "one_negative": ["train.num_hard_negatives=1"]}


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
    ap.add_argument("--run", help="the output folder every run uses (default WORK/run); a finished default run "
                    "(e.g. runs/scifact_minilm) skips ingest and embed")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    log = Path(args.work) / "scores.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    out = Path(args.run or Path(args.work) / "run")
    for variant in args.variants.split(","):
        for method in args.methods.split(","):
            for seed in seeds:
                score = run(out, method, seed, VARIANTS[variant])
                with log.open("a") as f:
                    f.write(json.dumps({"variant": variant, "method": method, "seed": seed, "ndcg_at_10": score}) + "\n")
                print(f"{variant:13s} {method:8s} seed {seed}: nDCG@10 {100 * score:.2f}", flush=True)
    table(log)


def table(log: Path) -> None:
    """mean ± std per (variant, method) over every score in ``log`` (the latest score of each seed)."""
    latest: dict[tuple[str, str, int], float] = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        latest[(r["variant"], r["method"], r["seed"])] = r["ndcg_at_10"]
    rows = []
    for variant, method in dict.fromkeys((v, m) for v, m, _ in latest):
        scores = [s for (v, m, _), s in sorted(latest.items()) if (v, m) == (variant, method)]
        sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
        rows.append((variant, method, statistics.fmean(scores), sd, scores))
    print("\n| variant | method | nDCG@10 mean ± std | seeds |\n|---|---|---:|---|")
    for variant, method, mean, sd, scores in rows:
        print(f"| {variant} | {method} | {100 * mean:.2f} ± {100 * sd:.2f} | "
              f"{', '.join(f'{100 * s:.2f}' for s in scores)} |")
    by = {(v, m): (mu, sd) for v, m, mu, sd, _ in rows}

    def compare(label: str, x: tuple[str, str], y: tuple[str, str]) -> None:
        if x in by and y in by:
            (a, sa), (b, sb) = by[x], by[y]
            print(f"{label} = {100 * (b - a):+.2f} points; noise (std) {100 * sa:.2f} / {100 * sb:.2f}: "
                  f"{'outside' if abs(b - a) > 2 * max(sa, sb) else 'inside'} 2 std")

    for variant in dict.fromkeys(v for v, _ in by):
        compare(f"{variant}: PercPos - naive", (variant, "naive"), (variant, "percpos"))
    for method in ("naive", "percpos"):
        compare(f"{method}: positive-aware masking on - off", ("base", method), ("pos_aware", method))
        compare(f"{method}: all negatives - one", ("one_negative", method), ("base", method))


if __name__ == "__main__":
    main()
