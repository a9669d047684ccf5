"""Throughput of the Ray embed stage vs sentence-transformers ``encode`` on the same SciFact passages.

Measured side by side in one run, same model (all-MiniLM-L6-v2 by default), same max length:
  1. sentence-transformers ``encode`` in this process,
  2. raymine's ``Encoder`` in this process (length-sorted batches),
  3. the Ray Data stage (actor pool; includes actor start-up and model load, excludes ``ray.init``).
Prints docs/s of each and the ratios, and the largest difference between the Ray output and
sentence-transformers' vectors.

    .venv/bin/python bench/bench_embed.py --limit 2000
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_corpus(path: Path, limit: int) -> tuple[list[str], list[str]]:
    """(ids, 'title text') of the first ``limit`` SciFact documents (0 = all)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = islice(f, limit) if limit > 0 else f
        docs = [json.loads(line) for line in lines]
    ids = [str(d["_id"]) for d in docs]
    texts = [(d.get("title", "") + " " + d.get("text", "")).strip() for d in docs]
    return ids, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(ROOT / "data" / "scifact" / "corpus.jsonl.gz"))
    ap.add_argument("--limit", type=int, default=2000, help="documents embedded (0 = whole corpus)")
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256, help="tokens (sentence-transformers' MiniLM uses 256)")
    ap.add_argument("--num-actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=0.5)
    ap.add_argument("--rows-per-block", type=int, default=256)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch
    from sentence_transformers import SentenceTransformer

    from raymine.config import EmbedConfig, TeacherConfig
    from raymine.embed import EmbedInput, embed_tables, read_embeddings
    from raymine.encoders import Encoder, resolve_model_path

    ids, texts = load_corpus(Path(args.corpus), args.limit)
    n = len(texts)
    path = resolve_model_path(args.model)
    print(f"{n} SciFact docs, model {args.model}, max_length {args.max_length}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}")

    # 1. sentence-transformers
    st = SentenceTransformer(path, device="cpu")
    st.max_seq_length = args.max_length
    t0 = time.perf_counter()
    st_emb = st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)
    st_s = time.perf_counter() - t0
    del st

    # 2. raymine Encoder, same process
    teacher = TeacherConfig(model=path, batch_size=args.batch_size, passage_max_length=args.max_length)
    enc = Encoder(teacher)
    t0 = time.perf_counter()
    enc_emb = enc.encode(texts, "passage")
    enc_s = time.perf_counter() - t0
    del enc

    # 3. Ray Data stage

    from raymine.raycluster import init_ray

    t0 = time.perf_counter()
    init_ray()
    init_s = time.perf_counter() - t0
    cfg = EmbedConfig(num_actors=args.num_actors, num_cpus_per_actor=args.cpus_per_actor,
                      rows_per_block=args.rows_per_block)
    with tempfile.TemporaryDirectory() as tmp:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"doc_id": ids, "text": texts}), f"{tmp}/corpus.parquet",
                       row_group_size=args.rows_per_block)
        t0 = time.perf_counter()
        manifest = embed_tables(teacher, cfg, [EmbedInput("passage", f"{tmp}/corpus.parquet", "doc_id", "text",
                                                          f"{tmp}/emb/corpus")], f"{tmp}/emb", f"bench-{time.time()}")
        ray_s = time.perf_counter() - t0
        ray_ids, ray_emb = read_embeddings(f"{tmp}/emb/corpus", "doc_id")
    print(f"Ray stage: {manifest['counts']['actors_used']} actors used, busy fraction "
          f"{manifest['counts']['busy_fraction']}")
    assert list(ray_ids) == ids, "Ray output is not in input order"

    rate = {"sentence-transformers encode": n / st_s, "raymine Encoder (1 process)": n / enc_s,
            f"Ray stage ({args.num_actors} actors)": n / ray_s}
    print(f"\n{'':32s} {'seconds':>8s} {'docs/s':>8s}")
    for (name, r), s in zip(rate.items(), (st_s, enc_s, ray_s), strict=False):
        print(f"{name:32s} {s:8.1f} {r:8.1f}")
    print(f"(ray.init {init_s:.1f} s not counted; Ray stage includes actor start-up + model load; "
          f"{manifest['counts']['truncated']} docs truncated at {args.max_length} tokens)")
    print(f"ratio Ray stage / sentence-transformers: {rate[f'Ray stage ({args.num_actors} actors)'] / rate['sentence-transformers encode']:.2f}")
    print(f"ratio raymine Encoder / sentence-transformers: {rate['raymine Encoder (1 process)'] / rate['sentence-transformers encode']:.2f}")
    print(f"max |Ray - sentence-transformers| = {np.abs(ray_emb - st_emb).max():.2e}; "
          f"max |Encoder - sentence-transformers| = {np.abs(enc_emb - st_emb).max():.2e}")


if __name__ == "__main__":
    main()
