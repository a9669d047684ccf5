"""Do the mined negatives train a better student where labels are incomplete — and is the shipped model never
worse than the base? Base vs naive top-k vs TopK-PercPos, one command per seed, then a table of mean ± std.

Incomplete labels: every multi-positive training query keeps ONE given positive, chosen by the seed; the
others are hidden from mining and training (``mine.hide_positive_fraction=1``) and count the known false
negatives among each method's training negatives. Model selection runs on the validation split (the data's
``dev`` when it has one, else a held-out slice of the training queries) and never on the test split; the
test nDCG@10 of the shipped model is what the table reports, with the step it kept.

Each run is the whole job (``jobs/mine_and_train.py``) in one output folder per data (``WORK/run``): ingest and
embed run once, search / mine / train / evaluate per method. ~10 min per run on 2 cores for SciFact, ~16 for
HotpotQA (bench/data/hotpotqa_bench, built by scripts/make_hotpotqa_bench.py: two judged passages per query; the
substitute for FiQA, whose corpus no reachable snapshot holds).

    .venv/bin/python bench/bench_quality.py --seed 13        # naive + percpos with seed 13
    .venv/bin/python bench/bench_quality.py --table          # the table over every recorded run
    .venv/bin/python bench/bench_quality.py --data bench/data/hotpotqa_bench --seed 13 --work runs/bench_quality_hotpotqa

Extra ``key=value`` arguments go to every run (e.g. ``train.lr=1e-5``); they are part of the recorded variant.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, data: str, method: str, seed: int, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "jobs" / "mine_and_train.py"), "--output", str(out), "--data", data,
           f"mine.method={method}", f"mine.seed={seed}", f"train.seed={seed}", "mine.hide_positive_fraction=1.0",
           *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    r = json.loads((out / "report.json").read_text())
    val = r["stages"]["train"].get("validation") or {}
    totals = r["stages"]["mine"]["report"]["totals"]
    return {"base": r["evaluate"]["before"]["ndcg_at_10"], "after": r["evaluate"]["after"]["ndcg_at_10"],
            "kept_step": val.get("kept_step"), "last_step": val.get("last_step"), "val_steps": val.get("steps"),
            "val_scores": val.get("scores"), "known_fn": totals.get("known_fn"), "delivered": totals.get("delivered"),
            "known_fn_rate": totals.get("known_false_negative_rate"), "wall_s": r.get("wall_s")}


def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def table(log: Path) -> None:
    """mean ± std per (data, variant, method) over the latest score of each seed in ``log``."""
    latest: dict[tuple[str, str, str, int], dict] = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        latest[(r["data"], r["variant"], r["method"], r["seed"])] = r
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for (data, variant, method, _), r in sorted(latest.items()):
        groups.setdefault((data, variant), {}).setdefault(method, []).append(r)
    for (data, variant), by in groups.items():
        print(f"\n{data} {variant or '(defaults)'}\n")
        print("| model | test nDCG@10, mean ± std | per seed | kept step / last step | validation nDCG@10, step 0 → "
              "last | known FN of training negatives |")
        print("|---|---:|---|---|---|---:|")
        base = [r["base"] for rs in by.values() for r in rs]
        print(f"| base (before training) | {100 * statistics.fmean(base):.2f} | – | – | – | – |")
        stats = {}
        for method, rs in by.items():
            mu, sd = _ms([r["after"] for r in rs])
            stats[method] = (mu, sd, rs)
            fn = sum(r["known_fn"] or 0 for r in rs) / max(1, sum(r["delivered"] or 0 for r in rs))
            per_seed = ", ".join("s{} {:.2f}".format(r["seed"], 100 * r["after"]) for r in rs)
            kept = ", ".join("{}/{}".format(r["kept_step"], r["last_step"]) for r in rs)
            curve = ", ".join("{:.2f} → {:.2f}".format(100 * r["val_scores"][0], 100 * r["val_scores"][-1])
                              if r.get("val_scores") else "–" for r in rs)
            print(f"| {method}-trained | {100 * mu:.2f} ± {100 * sd:.2f} | {per_seed} | {kept} | {curve} | {100 * fn:.2f}% |")
        if {"naive", "percpos"} <= set(stats):
            (a, sa, _), (b, sb, rs) = stats["naive"], stats["percpos"]
            pooled = math.sqrt((sa ** 2 + sb ** 2) / 2)
            seeds = min(len(stats["naive"][2]), len(rs))
            verdict = ("met" if b - a > 2 * pooled else "NOT met") if seeds > 1 else "no std from one seed"
            print(f"\nPercPos - naive = {100 * (b - a):+.2f} points; 2 pooled std = {200 * pooled:.2f}: {verdict}")
            kept = all((r["kept_step"] or 0) > 0 for r in rs)
            print(f"PercPos - base = {100 * (b - statistics.fmean(base)):+.2f} points; kept step > 0 in every run: {kept}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--data", default="data/scifact")
    ap.add_argument("--methods", default="naive,percpos")
    ap.add_argument("--work", default="runs/bench_quality")
    ap.add_argument("--table", action="store_true", help="print the table of every recorded run and stop")
    ap.add_argument("extra", nargs="*", help="key=value overrides for every run")
    args = ap.parse_args()
    log = Path(args.work) / "scores.jsonl"
    if args.table:
        table(log)
        return
    if args.seed is None:
        raise SystemExit("--seed is needed (or --table)")
    log.parent.mkdir(parents=True, exist_ok=True)
    out = Path(args.work) / ("run-" + Path(args.data).name)
    for method in args.methods.split(","):
        r = run(out, args.data, method, args.seed, args.extra)
        r.update(data=args.data, variant=" ".join(args.extra), method=method, seed=args.seed)
        with log.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{args.data} {method} seed {args.seed}: base {100 * r['base']:.2f} -> {100 * r['after']:.2f} "
              f"(kept step {r['kept_step']}/{r['last_step']}; known FN {r['known_fn']}/{r['delivered']})", flush=True)
    table(log)


if __name__ == "__main__":
    main()
