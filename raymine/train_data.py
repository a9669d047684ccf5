"""Training rows for the train stage: the mined table (ids) joined to passage texts with Ray Data.

Input: the mined table (``QUERY_ID, QUERY, POSITIVE_IDS, NEGATIVE_IDS``; ids only) and the corpus
(``DOC_ID`` + ``PASSAGE``, or ``TITLE``/``TEXT`` from which the passage is derived by
:func:`raymine.ingest.passage_text`), a Parquet file or folder.

Output (``TRAIN_ROW_COLUMNS``): one row per (query, positive): the query text, that positive's id and
text, *all* positive ids of the query (so training can mask the query's other positives wherever they
sit in the global batch), and *every* mined negative of the query in mined order (ids + texts, variable
length). Rows whose positive has no text are counted and left out; rows with fewer negatives than the
training uses per row (``num_hard_negatives``) are kept and counted (they train with what they have).

Which negatives a row trains on in an epoch: :func:`draw_negatives`, a function of (seed, epoch, ids).

How: the mined rows explode into one row per (query, positive, slot) — slot 0 the positive, 1..n the
negatives — which a left outer hash join (``Dataset.join``) matches to the corpus by id; a groupby on
(query, positive) assembles each row back in slot order. The driver only sums counts.

Order: rows are written in no particular order; :func:`write_epoch` writes each epoch's order, a
function of (seed, epoch, query id, positive id) alone (:func:`order_keys`) — a seeded global shuffle that
does not depend on how a distributed read or a shuffle split the data — with a range-partitioned sort in
plain Ray tasks (no driver-side shuffle).
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raymine import columns as C
from raymine import parts, storage

log = logging.getLogger(__name__)

SLOT = "_slot"  # int32: 0 = the positive, k = the k-th negative
ORDER = "_order"  # int64: this epoch's shuffle key
STATUS = "_status"  # "ok" | "positive_missing"
MISSING = "_negatives_missing"  # int64: negatives of the row with no text in the corpus
ROWS_MANIFEST = "_rows.json"

_NEEDS_SCHEMA = pa.schema([
    (C.QUERY_ID, pa.string()), (C.QUERY, pa.string()), (C.POSITIVE_ID, pa.string()),
    (C.POSITIVE_IDS, pa.list_(pa.string())), (SLOT, pa.int32()), (C.DOC_ID, pa.string()),
])
_ROW_SCHEMA = pa.schema([
    (C.QUERY_ID, pa.string()), (C.QUERY, pa.string()), (C.POSITIVE_ID, pa.string()), (C.POSITIVE, pa.string()),
    (C.POSITIVE_IDS, pa.list_(pa.string())), (C.NEGATIVE_IDS, pa.list_(pa.string())),
    (C.NEGATIVES, pa.list_(pa.string())), (STATUS, pa.string()), (MISSING, pa.int64()),
])


# ------------------------------------------------------------------------------------------------
# Pure batch steps (pyarrow in, pyarrow out)
# ------------------------------------------------------------------------------------------------
def explode_needs(batch: pa.Table) -> pa.Table:
    """Mined rows → one row per (query, distinct positive, slot): slot 0 the positive, k the k-th negative."""
    qids, queries = batch.column(C.QUERY_ID).to_pylist(), batch.column(C.QUERY).to_pylist()
    pos_lists, neg_lists = batch.column(C.POSITIVE_IDS).to_pylist(), batch.column(C.NEGATIVE_IDS).to_pylist()
    out: dict[str, list] = {f.name: [] for f in _NEEDS_SCHEMA}
    for qid, query, pos, neg in zip(qids, queries, pos_lists, neg_lists, strict=True):
        pos = list(dict.fromkeys(p for p in (pos or []) if p is not None))  # distinct, first-seen order
        neg = [n for n in (neg or []) if n is not None]
        for p in pos:
            for slot, doc in enumerate([p, *neg]):
                out[C.QUERY_ID].append(qid)
                out[C.QUERY].append(query)
                out[C.POSITIVE_ID].append(p)
                out[C.POSITIVE_IDS].append(pos)
                out[SLOT].append(slot)
                out[C.DOC_ID].append(doc)
    return pa.table(out, schema=_NEEDS_SCHEMA)


def assemble_row(group: pa.Table) -> pa.Table:
    """One (query, positive) group of joined slots → one training row (``_ROW_SCHEMA``), with its status."""
    group = group.sort_by([(SLOT, "ascending")])
    slots = group.column(SLOT).to_pylist()
    ids, texts = group.column(C.DOC_ID).to_pylist(), group.column(C.PASSAGE).to_pylist()
    first = {c: group.column(c)[0].as_py() for c in (C.QUERY_ID, C.QUERY, C.POSITIVE_ID, C.POSITIVE_IDS)}
    pos_text = next((t for s, t in zip(slots, texts, strict=True) if s == 0), None)
    negs = [(i, t) for s, i, t in zip(slots, ids, texts, strict=True) if s > 0 and t is not None]
    missing = sum(1 for s, t in zip(slots, texts, strict=True) if s > 0 and t is None)
    status = "positive_missing" if pos_text is None else "ok"
    row = {**first, C.POSITIVE: pos_text, C.NEGATIVE_IDS: [i for i, _ in negs],
           C.NEGATIVES: [t for _, t in negs], STATUS: status, MISSING: missing}
    return pa.Table.from_pylist([row], schema=_ROW_SCHEMA)


def corpus_passages(batch: pa.Table) -> pa.Table:
    """Corpus batch → (DOC_ID, PASSAGE): the PASSAGE column when present, else passage_text(title, text)."""
    if C.PASSAGE in batch.column_names:
        return batch.select([C.DOC_ID, C.PASSAGE])
    from raymine.ingest import passage_text

    titles = batch.column(C.TITLE).to_pylist() if C.TITLE in batch.column_names else [None] * batch.num_rows
    texts = batch.column(C.TEXT).to_pylist()
    passages = [passage_text(t, x) if x is not None else None for t, x in zip(titles, texts, strict=True)]
    return pa.table({C.DOC_ID: batch.column(C.DOC_ID), C.PASSAGE: pa.array(passages, pa.string())})


def draw_negatives(seed: int, epoch: int, query_id: str, positive_id: str, negative_ids: list[str], h: int) -> list[int]:
    """Indices (into ``negative_ids``) of the ``min(h, n)`` negatives a row trains on in ``epoch``.

    The row's n negatives are put in a seeded order — sorted by a hash of (seed, query id, positive id,
    negative id, occurrence), so the order depends on the ids, not on where mining put them — and epoch e
    takes the window of h positions starting at ``(e * h) mod n``, cyclically. Every mined negative is
    drawn within ceil(n / h) epochs, and no negative twice in one row unless it was mined twice: a document
    repeated in a row (intra-sample ensembling with ``no-dedup``) is kept as mined — the paper's best
    setting weights a negative several teachers agree on twice; ``mine.ensemble_dedup`` removes repeats
    at mining time. Returned in ascending index order (the mined order among the drawn ones).
    """
    n = len(negative_ids)
    if n == 0 or h <= 0:
        return []
    if h >= n:
        return list(range(n))
    prefix = f"{seed}\x1f{query_id}\x1f{positive_id}\x1f".encode()
    seen: dict[str, int] = {}
    keys = []
    for i, d in enumerate(negative_ids):
        k = seen.get(d, 0)
        seen[d] = k + 1
        h8 = hashlib.blake2b(prefix + f"{d}\x1f{k}".encode(), digest_size=8).digest()
        keys.append((h8, i))
    order = [i for _, i in sorted(keys)]  # the row's seeded permutation of its negatives
    start = (epoch * h) % n
    return sorted(order[(start + j) % n] for j in range(h))


def order_keys(seed: int, epoch: int, query_ids: list[str], positive_ids: list[str]) -> np.ndarray:
    """int64 shuffle key per row: a hash of (seed, epoch, query id, positive id) — independent of row order."""
    out = np.empty(len(query_ids), dtype=np.int64)
    prefix = f"{seed}\x1f{epoch}\x1f".encode()
    for i, (q, p) in enumerate(zip(query_ids, positive_ids, strict=True)):
        h = hashlib.blake2b(prefix + f"{q}\x1f{p}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little", signed=True)
    return out  # [N]


# ------------------------------------------------------------------------------------------------
# Ray Data
# ------------------------------------------------------------------------------------------------
def _partitions(n: int) -> int:
    """Hash partitions for the join and the groupby: about 50k slots each, 1..64."""
    return max(1, min(64, n // 50_000 + 1))


def build_rows(mined_uri: str, corpus_uri: str, out_uri: str, num_hard_negatives: int) -> dict[str, Any]:
    """Write the training rows of ``mined_uri`` × ``corpus_uri`` to ``out_uri`` (Parquet folder); return counts.

    A finished folder (its ``_rows.json`` written last, same inputs and ``num_hard_negatives``) is reused; the
    inputs are named by path and by :func:`storage.fingerprint` (file names, sizes, modification times), so
    a mined table rewritten at the same path (another mining config in the same output folder) is rebuilt.
    Counts: ``queries`` (mined), ``rows`` (kept), ``rows_short`` (kept rows with fewer negatives than
    ``num_hard_negatives``: they train with what they have), ``rows_without_negatives`` (of those, none: in-batch
    negatives only), ``negatives`` (all negatives of the kept rows), ``rows_positive_missing`` (left out),
    ``negatives_missing_text``.
    """
    from ray.data.expressions import col

    key = {"mined": mined_uri, "mined_files": storage.fingerprint(mined_uri), "corpus": corpus_uri,
           "corpus_files": storage.fingerprint(corpus_uri), "num_hard_negatives": num_hard_negatives}
    manifest_uri = storage.join(out_uri, ROWS_MANIFEST)
    if storage.exists(manifest_uri):
        done = storage.read_json(manifest_uri)
        if done.get("key") == key:
            log.info("train rows: reusing %s (%d rows)", out_uri, done["counts"]["rows"])
            return done["counts"]
    storage.delete_dir(out_uri)
    t0 = time.perf_counter()
    mined = parts.read_dataset(mined_uri, [C.QUERY_ID, C.QUERY, C.POSITIVE_IDS, C.NEGATIVE_IDS])
    n_queries = parts.num_rows(mined_uri)  # footers only: no Ray job for a count
    names = set(parts.schema(corpus_uri).names)
    if C.DOC_ID not in names or not ({C.PASSAGE} <= names or {C.TEXT} <= names):
        raise ValueError(f"corpus {corpus_uri}: needs {C.DOC_ID} and {C.PASSAGE} (or {C.TEXT}); has {sorted(names)}")
    wanted = [c for c in (C.DOC_ID, C.PASSAGE) if c in names] if C.PASSAGE in names else [
        c for c in (C.DOC_ID, C.TITLE, C.TEXT) if c in names]
    corpus = parts.read_dataset(corpus_uri, wanted).map_batches(corpus_passages, batch_format="pyarrow")
    needs = mined.map_batches(explode_needs, batch_format="pyarrow")
    nparts = _partitions(n_queries * 8)
    joined = needs.join(corpus, join_type="left_outer", num_partitions=nparts, on=(C.DOC_ID,))
    rows = (joined.groupby([C.QUERY_ID, C.POSITIVE_ID], num_partitions=nparts)
            .map_groups(assemble_row, batch_format="pyarrow")
            .materialize())
    by_status = {r[STATUS]: int(r["count()"]) for r in rows.groupby(STATUS).count().take_all()}
    n_missing = int(rows.sum(MISSING) or 0) if rows.count() else 0
    kept = rows.filter(expr=col(STATUS) == "ok")
    per_row = kept.map_batches(_negative_counts, batch_format="pyarrow", fn_kwargs={"h": num_hard_negatives})
    sums = {k: int(per_row.sum(k) or 0) for k in ("negatives", "short", "empty")} if by_status.get("ok") else {}
    kept.select_columns(list(C.TRAIN_ROW_COLUMNS)).write_parquet(out_uri)
    counts = {
        "queries": int(n_queries),
        "rows": by_status.get("ok", 0),
        "rows_short": sums.get("short", 0),
        "rows_without_negatives": sums.get("empty", 0),
        "negatives": sums.get("negatives", 0),
        "rows_positive_missing": by_status.get("positive_missing", 0),
        "negatives_missing_text": n_missing,
        "build_s": round(time.perf_counter() - t0, 3),
    }
    storage.write_json(manifest_uri, {"key": key, "counts": counts})
    log.info("train rows: %d queries → %d rows with %d negatives (%d rows with < %d negatives train with what they "
             "have, %d with none; %d positives without text, %d negatives without text) in %.1f s",
             counts["queries"], counts["rows"], counts["negatives"], counts["rows_short"], num_hard_negatives,
             counts["rows_without_negatives"], counts["rows_positive_missing"], counts["negatives_missing_text"],
             counts["build_s"])
    return counts


def _negative_counts(batch: pa.Table, h: int) -> pa.Table:
    """Per training row: its number of negatives, whether it is short of ``h``, whether it has none."""
    n = pc.list_value_length(batch.column(C.NEGATIVE_IDS)).fill_null(0)
    return pa.table({"negatives": n, "short": pc.cast(pc.less(n, h), pa.int64()),
                     "empty": pc.cast(pc.equal(n, 0), pa.int64())})


# ------------------------------------------------------------------------------------------------
# Each epoch's order: a range-partitioned sort in plain Ray tasks
# ------------------------------------------------------------------------------------------------
EPOCH_BUCKET_ROWS = 50_000  # rows per sort task of write_epoch (~300 MB of 1 KB passages, 4 negatives)


def epoch_buckets(keys: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of each order key: ``buckets`` equal ranges of the int64 keys, in key order (bucket b's keys all come
    before bucket b+1's). The keys are seeded hashes, uniform over int64, so the buckets are about equal in rows —
    a range partition with no sampling pass."""
    if buckets <= 1:
        return np.zeros(len(keys), np.int64)
    unsigned = keys.astype(np.int64).view(np.uint64) ^ np.uint64(1 << 63)  # order-preserving int64 → uint64
    return (unsigned // np.uint64(-(-(1 << 64) // buckets))).astype(np.int64)


def write_epoch(rows_uri: str, seed: int, epoch: int, out_uri: str, row_group_rows: int | None = None,
                bucket_rows: int = EPOCH_BUCKET_ROWS) -> str:
    """Write this epoch's ordered rows to ``out_uri`` (Parquet files whose name order is the row order): the
    training rows sorted by (seeded hash key, query id, positive id) — see :func:`order_keys`.

    Written once per epoch (reused when ``_epoch.json`` says so); every worker then streams the same
    files with :func:`iter_global_batches`, so the order does not depend on the number of workers,
    the read's splits or task timing. ``row_group_rows``: row groups of that many rows (the per-rank batch),
    so each rank reads its own slice of a global batch and at most one group on either side of it.

    How (a distributed sort in plain Ray tasks, the driver holding counts only): scatter tasks — at most
    :func:`parts.read_tasks`, each a run of the rows' files — add the key column and write each key range's rows
    (``bucket_rows`` rows per range on average, :func:`epoch_buckets`) to a scratch folder; one task per range then
    sorts its rows and writes part ``b`` of the epoch. Every row is counted through both passes.
    """
    import ray

    key = {"rows": rows_uri, "rows_files": storage.fingerprint(storage.join(rows_uri, ROWS_MANIFEST)), "seed": seed,
           "epoch": epoch}
    marker = storage.join(out_uri, "_epoch.json")
    if storage.exists(marker) and storage.read_json(marker) == key:
        return out_uri
    storage.delete_dir(out_uri)
    files = parts.list_parquet(rows_uri)
    n_rows = parts.manifest_rows(rows_uri, storage.join(rows_uri, ROWS_MANIFEST), "rows")
    buckets = max(1, -(-n_rows // max(1, bucket_rows)))
    scratch = storage.join(out_uri, "_scatter")
    tasks = max(1, min(parts.read_tasks(), len(files)))
    scatter = ray.remote(num_cpus=1)(_scatter_epoch)
    scattered = sum(ray.get([
        scatter.remote(rows_uri, files[len(files) * t // tasks:len(files) * (t + 1) // tasks], seed, epoch, buckets,
                       scratch, t) for t in range(tasks)]))
    gather = ray.remote(num_cpus=1)(_sort_bucket)
    written = sum(ray.get([gather.remote(scratch, b, out_uri, row_group_rows) for b in range(buckets)]))
    if not n_rows == scattered == written:
        raise RuntimeError(f"{out_uri}: the epoch has {written} rows ({scattered} scattered), the rows table "
                           f"{rows_uri} has {n_rows}; delete both folders and rerun")
    storage.delete_dir(scratch)
    storage.write_json(marker, key)
    return out_uri


def _bucket_folder(scratch: str, b: int) -> str:
    return storage.join(scratch, f"bucket-{b:09d}")


def _read_tables(uri: str, paths: list[str], columns: list[str] | None = None) -> list[pa.Table]:
    """The Parquet files ``paths`` (inside ``uri``'s filesystem), whole, in order."""
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(uri)
    out = []
    for path in paths:
        with fs.open_input_file(path) as f:
            out.append(pq.read_table(f, columns=columns))
    return out


def _scatter_epoch(rows_uri: str, paths: list[str], seed: int, epoch: int, buckets: int, scratch: str,
                   task: int) -> int:
    """:func:`write_epoch`'s scatter task: these files' rows with their order key, written per key range as part
    ``task`` of each range's scratch folder; returns the rows read."""
    pieces = _read_tables(rows_uri, paths, list(C.TRAIN_ROW_COLUMNS))
    table = pa.concat_tables(pieces) if pieces else None
    if table is None or table.num_rows == 0:
        return 0
    keys = order_keys(seed, epoch, table.column(C.QUERY_ID).to_pylist(), table.column(C.POSITIVE_ID).to_pylist())
    table = table.append_column(ORDER, pa.array(keys, pa.int64()))
    bucket = epoch_buckets(keys, buckets)
    idx = np.argsort(bucket, kind="stable")
    table, bucket = table.take(pa.array(idx)), bucket[idx]
    bounds = np.searchsorted(bucket, np.arange(buckets + 1))
    for b in np.flatnonzero(np.diff(bounds)):
        parts.write_part(table.slice(int(bounds[b]), int(bounds[b + 1] - bounds[b])), _bucket_folder(scratch, int(b)),
                         task)
    return table.num_rows


def _sort_bucket(scratch: str, b: int, out_uri: str, row_group_rows: int | None) -> int:
    """:func:`write_epoch`'s sort task: key range ``b``'s rows sorted by (key, query id, positive id), written as
    part ``b`` of the epoch in row groups of ``row_group_rows``; returns its rows (0: an empty range, no part)."""
    folder = _bucket_folder(scratch, b)
    if not storage.exists(folder):
        return 0
    table = pa.concat_tables(_read_tables(folder, parts.list_parquet(folder))).sort_by([(ORDER, "ascending"), (C.QUERY_ID, "ascending"),
                                              (C.POSITIVE_ID, "ascending")])
    parts.write_part(table, out_uri, b, row_group_size=row_group_rows)
    return table.num_rows


def iter_global_batches(epoch_uri: str, batch_rows: int, skip_batches: int = 0,
                        rows: tuple[int, int] | None = None):
    """Yield pyarrow tables of the epoch's global batches of exactly ``batch_rows`` rows, in the epoch's order
    (the last partial one dropped); with ``rows=(offset, length)`` only those rows of each batch (a training
    rank's slice).

    Reads the files of :func:`write_epoch` in name order with pyarrow (no Ray) and only the row groups that hold
    the wanted rows (one footer pass first), so a rank reads about its own share of the epoch, not all of it,
    when the epoch was written in small row groups; checks that the order key never decreases over what it
    reads (a clear error if a writer did not keep the order); skips the first ``skip_batches`` batches without
    reading them (resume mid-epoch).
    """
    import pyarrow.parquet as pq

    offset, length = (0, batch_rows) if rows is None else rows
    if not (0 <= offset and 0 < length and offset + length <= batch_rows):
        raise ValueError(f"rows {rows} must lie inside a batch of {batch_rows} rows")
    fs, root = storage.resolve(epoch_uri)
    files = [storage.inside(epoch_uri, root, f) for f in sorted(storage.list_files(epoch_uri)) if f.endswith(".parquet")]
    groups: list[tuple[str, int, int, int]] = []  # (file, row group, first global row, rows)
    start = 0
    for path in files:  # footers read here: this runs in a training worker, which holds the CPUs tasks would need
        counts = storage.footer_rows(fs, path)
        if counts is None:
            raise RuntimeError(f"{epoch_uri}: {path} is not a readable Parquet file; delete the folder and rerun")
        for g, n in enumerate(counts):
            if n:
                groups.append((path, g, start, n))
                start += n
    total, cache = start, {}
    last = (-(2**63), "", "")
    g0 = 0  # first group that may still hold wanted rows
    for b in range(skip_batches, total // batch_rows):
        lo = b * batch_rows + offset
        hi = lo + length
        while groups[g0][2] + groups[g0][3] <= lo:
            cache.pop(g0, None)
            g0 += 1
        pieces, g = [], g0
        while g < len(groups) and groups[g][2] < hi:
            path, rg, first, n = groups[g]
            if g not in cache:
                with fs.open_input_file(path) as f:
                    cache[g] = pq.ParquetFile(f).read_row_group(rg)
            a, z = max(lo, first), min(hi, first + n)
            pieces.append(cache[g].slice(a - first, z - a))
            g += 1
        batch = pa.concat_tables(pieces)
        keys = list(zip(batch.column(ORDER).to_pylist(), batch.column(C.QUERY_ID).to_pylist(),
                        batch.column(C.POSITIVE_ID).to_pylist(), strict=True))
        if keys and (keys[0] < last or any(a > z for a, z in zip(keys, keys[1:], strict=False))):
            raise RuntimeError(f"{epoch_uri}: rows are not in epoch order (batch {b}); delete the folder and rerun")
        if keys:
            last = keys[-1]
        yield batch
