"""BM25 as a sparse teacher: one bm25s index in one process (:class:`BM25Teacher`), or sharded over Ray
actors with corpus-wide statistics (:class:`ShardedBM25`), both giving what the dense teachers give the
mining stage: per-query candidates (doc ids, scores, best first) optionally below a per-query score
ceiling, and the score of any listed doc (positives).

The ceiling search is exact: it masks the full score vector of each query before the top-k.
Only documents that share at least one term with the query (score > 0) are candidates: lucene
BM25 scores are never negative, a zero means no term overlap, and bm25s orders those arbitrarily.
Ties are broken by doc id (smaller id string first), so no result depends on row order or sharding.

Sharded BM25 (scores equal to one bm25s index over the whole corpus, bit for bit; the driver
receives scalars only, never a vocabulary-sized object):
1. count: one Ray task per shard reads its rows, tokenises them with bm25s's tokenizer and counts
   (:func:`count_terms`: number of docs, total length, and the document frequency of each term, split
   into P tables by a stable hash of the term, :func:`term_partition`);
2. reduce: one Ray task per term partition sums the shards' counts of its terms (the global df) and joins
   them back to each shard's own terms (:func:`reduce_partition`); the driver sums only the scalars
   (N, total length → avgdl, vocabulary size), the tables go from task to task through the object store;
3. every shard actor gathers the global df of ITS terms (one table per partition, :func:`shard_stats`),
   builds its term-doc score matrix (:func:`build_shard_matrix`, the same float32/float64 arithmetic as
   bm25s), and scores a query from the posting lists of its tokens only (:func:`sparse_scores`: the rows
   that share a term, accumulated in query-token order as bm25s does; every other row scores a constant);
4. the top-k runs over the touched rows plus at most k untouched ones (:func:`sparse_top_k`), so a
   query costs what its posting lists cost, not the shard size; the ceiling is applied inside each shard;
   the per-shard lists merge exactly (:func:`raymine.topk.merge_topk_by_id`).
BM25L/BM25+ add, to every row, the non-occurrence scores of the query's terms over the GLOBAL vocabulary:
a term a shard lacks still counts there, so the client first asks the shards for those per-token values
(any shard holding a term knows its global df) and sends each query's float32 sum with the search.
bm25s has no public way to take external statistics, hence steps 1–3 here (tested against bm25s).
The maths is pure functions; only :class:`ShardedBM25` (the driver handle) imports Ray.
"""
from __future__ import annotations

import logging
import math
import os
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymine import storage
from raymine.columns import DOC_ID, PASSAGE, TEXT, TITLE
from raymine.config import SearchConfig, TeacherConfig, to_dict
from raymine.index import ShardActors, merge_lookups
from raymine.topk import merge_topk_by_id

log = logging.getLogger(__name__)


def top_k_rows(scores: np.ndarray, k: int, ceiling: float = np.inf) -> np.ndarray:
    """Rows of the ``k`` best scores with 0 < score < ceiling, best first, ties by lower row. scores [n]."""
    valid = scores > 0
    if np.isfinite(ceiling) or np.isnan(ceiling):
        if np.isnan(ceiling):
            raise ValueError("ceiling is NaN; use +inf for 'no ceiling'")
        valid &= scores < ceiling
    cand = np.flatnonzero(valid)  # [m]
    if k <= 0 or cand.size == 0:
        return cand[:0]
    if cand.size > k:  # keep everything tied with the k-th best, then order exactly
        kth = np.partition(scores[cand], cand.size - k)[cand.size - k]
        cand = cand[scores[cand] >= kth]
    order = np.lexsort((cand, -scores[cand]))[:k]  # primary: score desc; secondary: row asc
    return cand[order]


class BM25Teacher:
    """A bm25s index over a corpus: ``index`` once, then ``search`` / ``score`` query batches."""

    def __init__(self, cfg: TeacherConfig) -> None:
        if cfg.kind != "bm25":
            raise ValueError(f"BM25Teacher needs a teacher of kind 'bm25', got {cfg.kind!r}")
        self.cfg = cfg
        self._retriever = None
        self.doc_ids = np.zeros(0, dtype=object)
        self._row: dict[str, int] = {}

    # -- tokenisation ---------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        """bm25s's tokeniser (lowercase, \\w\\w+ tokens, stopwords from config)."""
        import bm25s

        stop = self.cfg.bm25_stopwords or None
        return bm25s.tokenize(list(texts), stopwords=stop, return_ids=False, show_progress=False)

    # -- index ----------------------------------------------------------------------------------
    def index(self, doc_ids: Sequence[str], texts: Sequence[str]) -> None:
        """Build the index. Ids must be unique strings; texts non-empty (ingest drops empty ones).
        Rows are kept in doc-id order, so ties (lower row first) break by id, not by input order."""
        import bm25s

        if len(doc_ids) != len(texts):
            raise ValueError(f"{len(doc_ids)} doc ids but {len(texts)} texts")
        if len(doc_ids) == 0:
            raise ValueError("cannot index an empty corpus")
        ids = np.asarray([str(d) for d in doc_ids], dtype=object)
        order = np.argsort(ids.astype(str), kind="stable")  # rows in doc-id order: ties break by id
        ids = ids[order]
        texts = [texts[i] for i in order]
        row = {d: i for i, d in enumerate(ids)}
        if len(row) != len(ids):
            seen: set[str] = set()
            dup = next(d for d in ids if d in seen or seen.add(d))
            raise ValueError(f"duplicate doc id {dup!r} in the BM25 corpus")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"document {ids[i]!r} has an empty text; ingest should have dropped it")
        tokens = self.tokenize(texts)
        retriever = bm25s.BM25(k1=self.cfg.bm25_k1, b=self.cfg.bm25_b, method=self.cfg.bm25_method)
        retriever.index(tokens, show_progress=False)
        self._retriever = retriever
        self.doc_ids = ids
        self._row = row
        n_empty = sum(1 for t in tokens if not t)
        log.info("BM25 index: %d docs, %d terms, %d docs with no token after stopwords",
                 len(ids), len(retriever.vocab_dict), n_empty)

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

    def _require_index(self):
        if self._retriever is None:
            raise RuntimeError("BM25Teacher.index(...) must be called before search/score")
        return self._retriever

    def full_scores(self, query_tokens: list[str]) -> np.ndarray:
        """BM25 score of every corpus row for one tokenised query → float32 [num_docs]."""
        r = self._require_index()
        ids = r.get_tokens_ids(query_tokens)
        if not ids:
            return np.zeros(self.num_docs, dtype=np.float32)
        return np.asarray(r.get_scores_from_ids(ids), dtype=np.float32)

    # -- queries --------------------------------------------------------------------------------
    def search(
        self, query_texts: Sequence[str], k: int, ceilings: np.ndarray | None = None,
        return_above: bool = False,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-``k`` docs per query (only score < ceiling[i] when given; +inf = no ceiling).

        Returns doc ids object [nq, k] ("" where fewer than k docs qualify) and scores float32 [nq, k]
        (-inf there), best first; with ``return_above`` also ``above [nq] int64``: corpus docs scoring
        ``>= ceiling[i]`` (what the ceiling removed, positives included; 0 without a ceiling).
        """
        nq = len(query_texts)
        if ceilings is not None:
            ceilings = np.asarray(ceilings, dtype=np.float64).reshape(-1)
            if ceilings.shape[0] != nq:
                raise ValueError(f"{ceilings.shape[0]} ceilings for {nq} queries")
        out_ids = np.full((nq, k), "", dtype=object)
        out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
        above = np.zeros(nq, dtype=np.int64)
        for i, toks in enumerate(self.tokenize(query_texts)):
            s = self.full_scores(toks)  # [num_docs]
            c = np.inf if ceilings is None else float(ceilings[i])
            rows = top_k_rows(s, k, c)
            out_ids[i, : rows.size] = self.doc_ids[rows]
            out_scores[i, : rows.size] = s[rows]
            if return_above and not np.isposinf(c):
                above[i] = int((s >= c).sum())  # NaN ceilings were rejected by top_k_rows
        return (out_ids, out_scores, above) if return_above else (out_ids, out_scores)

    def score(self, query_texts: Sequence[str], doc_ids: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """BM25 score of each listed doc for each query → one float32 array per query (e.g. positives)."""
        if len(query_texts) != len(doc_ids):
            raise ValueError(f"{len(query_texts)} queries but {len(doc_ids)} doc-id lists")
        out = []
        for i, toks in enumerate(self.tokenize(query_texts)):
            try:
                rows = np.asarray([self._row[str(d)] for d in doc_ids[i]], dtype=np.int64)
            except KeyError as e:
                raise KeyError(f"query {i}: doc id {e.args[0]!r} is not in the BM25 index") from None
            out.append(self.full_scores(toks)[rows] if rows.size else np.zeros(0, dtype=np.float32))
        return out


# ================================================================================================
# Sharded BM25 with corpus-wide statistics — the maths (pure functions, no Ray)
# ================================================================================================
BM25S_DELTA = 0.5  # bm25s's default delta (BM25L / BM25+), what BM25Teacher's bm25s.BM25() uses
METHODS = ("robertson", "lucene", "atire", "bm25l", "bm25+")
_NONOCCURRENCE = ("bm25l", "bm25+")  # variants where a doc without the term still scores


def tokenize(texts: Sequence[str], stopwords: str = "en") -> list[list[str]]:
    """bm25s's tokenizer (lowercase, ``\\w\\w+`` tokens, stopword list name or '' for none)."""
    import bm25s

    return bm25s.tokenize(list(texts), stopwords=stopwords or None, return_ids=False, show_progress=False)


TERM, DF = "term", "df"  # columns of the count / df tables (never leave the workers)
_DF_SCHEMA = pa.schema([(TERM, pa.string()), (DF, pa.int64())])


@dataclass(frozen=True)
class TermCounts:
    """Term statistics of one set of rows (one shard): scalars, and the (term, df) table of each of the
    ``P`` term partitions (``parts[p]``: this shard's terms hashing to p, with their df in these rows)."""

    num_docs: int
    total_len: int  # sum of the rows' lengths in tokens
    parts: list[pa.Table]  # [P] tables (TERM, DF)


@dataclass(frozen=True)
class CorpusStats:
    """Corpus-wide BM25 statistics as one shard sees them: number of docs, total length, and the GLOBAL
    document frequency of the terms this shard needs (its own terms; not the whole vocabulary)."""

    num_docs: int
    total_len: int
    df: dict[str, int]

    @property
    def avgdl(self) -> float:
        # = np.mean(lengths) exactly as bm25s computes it (an integer sum < 2**53 is exact in float64)
        return float(np.float64(self.total_len) / np.float64(self.num_docs)) if self.num_docs else 0.0


def term_partition(terms: Sequence[str], num_parts: int) -> np.ndarray:
    """Partition of each term: crc32 of its UTF-8 bytes mod ``num_parts`` (stable across processes,
    unlike ``hash``). int64 [len(terms)]."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    return np.fromiter((zlib.crc32(t.encode()) for t in terms), np.int64, len(terms)) % num_parts


def count_terms(token_lists: Sequence[Sequence[str]], num_parts: int = 1) -> TermCounts:
    """Document frequencies and lengths of tokenised rows, the df split into ``num_parts`` term partitions."""
    df: dict[str, int] = {}
    total = 0
    for toks in token_lists:
        total += len(toks)
        for t in set(toks):
            df[t] = df.get(t, 0) + 1
    terms = pa.array(list(df), pa.string())
    counts = np.fromiter(df.values(), np.int64, len(df))  # [v]
    part = term_partition(list(df), num_parts)  # [v]
    parts = [pa.table([terms.filter(pa.array(part == p)), pa.array(counts[part == p])], schema=_DF_SCHEMA)
             for p in range(num_parts)]
    return TermCounts(len(token_lists), total, parts)


def reduce_partition(parts: Sequence[pa.Table]) -> tuple[int, list[pa.Table]]:
    """One term partition: the shards' (term, df) tables of it → (number of distinct terms, each shard's
    own terms with their GLOBAL df). A reduce by term, then a join back to the shards; no Python loop."""
    import pyarrow.compute as pc

    parts = [t.cast(_DF_SCHEMA) for t in parts]
    total = pa.concat_tables(parts).group_by(TERM).aggregate([(DF, "sum")])  # [v_p] TERM, DF_sum
    glob = total.column(f"{DF}_sum").combine_chunks()
    out = [pa.table([t.column(TERM), glob.take(pc.index_in(t.column(TERM), value_set=total.column(TERM)))],
                    schema=_DF_SCHEMA) for t in parts]
    return total.num_rows, out


def shard_stats(num_docs: int, total_len: int, df_parts: Iterable[pa.Table]) -> CorpusStats:
    """A shard's statistics: the global scalars and the global df of its terms (its tables from every
    partition's :func:`reduce_partition`)."""
    df: dict[str, int] = {}
    for t in df_parts:
        df.update(zip(t.column(TERM).to_pylist(), t.column(DF).to_pylist(), strict=True))
    return CorpusStats(num_docs, total_len, df)


def idf(df: int, n: int, method: str) -> float:
    """Inverse document frequency of bm25s's variants (Kamphuis et al., ECIR 2020), in float64."""
    if method == "robertson":
        return math.log(max((n - df + 0.5) / (df + 0.5), 1.0))  # bm25s clamps the inner ratio at 1
    if method == "lucene":
        return math.log(1 + (n - df + 0.5) / (df + 0.5))
    if method == "atire":
        return math.log(n / df)
    if method == "bm25l":
        return math.log((n + 1) / (df + 0.5))
    if method == "bm25+":
        return math.log((n + 1) / df)
    raise ValueError(f"bm25_method must be one of {METHODS}, got {method!r}")


def tf_component(tf: Any, l_d: Any, l_avg: float, k1: float, b: float, method: str, delta: float = BM25S_DELTA):
    """Term-frequency component of bm25s's variants, with bm25s's operation order and dtypes (tf float32,
    lengths int, ``l_avg`` numpy float64: mostly float64, ``tf * (k1 + 1)`` float32)."""
    if method in ("robertson", "lucene"):
        return tf / (k1 * ((1 - b) + b * l_d / l_avg) + tf)
    if method == "atire":
        return (tf * (k1 + 1)) / (tf + k1 * (1 - b + b * l_d / l_avg))
    if method == "bm25l":
        c = tf / (1 - b + b * l_d / l_avg)
        return ((k1 + 1) * (c + delta)) / (k1 + c + delta)
    if method == "bm25+":
        return ((k1 + 1) * tf) / (k1 * (1 - b + b * l_d / l_avg) + tf) + delta
    raise ValueError(f"bm25_method must be one of {METHODS}, got {method!r}")


def nonoccurrence(df: int, stats: CorpusStats, k1: float, b: float, method: str,
                  delta: float = BM25S_DELTA) -> np.float32:
    """BM25L/BM25+: the score a doc gets for a query term it lacks (bm25s's non-occurrence array)."""
    l_avg = np.float64(stats.avgdl)
    return np.float32(idf(df, stats.num_docs, method) * tf_component(0, l_avg, l_avg, k1, b, method, delta))


@dataclass
class ShardMatrix:
    """One shard's precomputed BM25 scores as a term-major sparse matrix (CSC over docs × terms):
    column ``vocab[t]`` holds the (row, score) pairs of the rows containing term t, rows ascending."""

    vocab: dict[str, int]  # term -> column
    indptr: np.ndarray  # int64 [v + 1]
    rows: np.ndarray  # int32 [nnz]
    data: np.ndarray  # float32 [nnz]
    num_docs: int

    @property
    def nbytes(self) -> int:
        return self.indptr.nbytes + self.rows.nbytes + self.data.nbytes


def build_shard_matrix(token_lists: Sequence[Sequence[str]], stats: CorpusStats, k1: float, b: float,
                       method: str, delta: float = BM25S_DELTA) -> ShardMatrix:
    """Per (row, term) score ``idf(global df, global N) · tfc(tf, row length, global avgdl)``.

    The arithmetic copies bm25s's (float32 idf and tf, float64 tfc, float32 result; BM25L/BM25+
    subtract the non-occurrence score), so a shard's scores equal the single-index ones bit for bit."""
    if method not in METHODS:
        raise ValueError(f"bm25_method must be one of {METHODS}, got {method!r}")
    n = len(token_lists)
    vocab: dict[str, int] = {}
    cols: list[int] = []
    lens = np.fromiter((len(t) for t in token_lists), np.int64, n)  # [n]
    for toks in token_lists:
        for t in toks:
            c = vocab.get(t)
            if c is None:
                if t not in stats.df:
                    raise ValueError(f"term {t!r} is missing from the corpus statistics (stats of another corpus?)")
                c = vocab[t] = len(vocab)
            cols.append(c)
    v = len(vocab)
    doc = np.repeat(np.arange(n, dtype=np.int64), lens)  # [total tokens]
    key = doc * max(v, 1) + np.asarray(cols, np.int64)
    uniq, tf = np.unique(key, return_counts=True)  # sorted by (row, term): one entry per pair
    row = uniq // max(v, 1)
    col = uniq % max(v, 1)
    terms = list(vocab)
    idf32 = np.array([idf(stats.df[t], stats.num_docs, method) for t in terms], np.float32)  # [v]
    l_avg = np.float64(stats.avgdl)
    # tf stays float32 as in bm25s: numpy's promotion then decides, as there, which steps run in float32
    tfc = tf_component(tf.astype(np.float32), lens[row], l_avg, k1, b, method, delta)
    score = idf32[col].astype(np.float64) * tfc  # float64, as bm25s
    if method in _NONOCCURRENCE:
        nonocc = np.array([nonoccurrence(stats.df[t], stats, k1, b, method, delta) for t in terms], np.float32)
        score = score - nonocc[col].astype(np.float64)
    order = np.argsort(col, kind="stable")  # term-major, rows ascending within a term
    indptr = np.zeros(v + 1, np.int64)
    np.cumsum(np.bincount(col, minlength=v), out=indptr[1:])
    return ShardMatrix(vocab, indptr, row[order].astype(np.int32), score[order].astype(np.float32), n)


DENSE_FRACTION = 0.125  # postings >= this × shard rows: a dense accumulator beats sorting them (SciFact: ~0.5)


def sparse_scores(m: ShardMatrix, tokens: Sequence[str], extra: np.float32 | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """BM25 scores of one tokenised query from its posting lists only: ``(rows int64 [t] ascending,
    scores float32 [t], rest)`` where ``rows`` are shard rows sharing a term with the query (all of them
    whose term sum is not 0) and every other row scores ``rest``. Cost: the query's posting lists (plus
    their sort), not the shard size.

    Each row's terms are added in query-token order (repeated tokens count again), in float32, then
    ``extra`` (BM25L/BM25+: the float32 sum of the query's non-occurrence scores over the GLOBAL
    vocabulary) — the same operations, in the same order, as bm25s's dense accumulator, so equal bit for bit.
    A query whose posting lists reach ``DENSE_FRACTION`` of the shard (small shards, common terms) uses
    a dense float32 buffer, cheaper there than sorting the postings; the result is the same."""
    spans = [(m.indptr[c], m.indptr[c + 1]) for t in tokens if (c := m.vocab.get(t)) is not None]
    rest = np.float32(0) if extra is None else np.float32(0) + np.float32(extra)
    if not spans:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), rest
    if len(spans) == 1:  # one posting list: rows already unique and ascending
        rows, acc = m.rows[spans[0][0]:spans[0][1]].astype(np.int64), m.data[spans[0][0]:spans[0][1]].copy()
    elif sum(hi - lo for lo, hi in spans) >= DENSE_FRACTION * m.num_docs:
        dense = np.zeros(m.num_docs, np.float32)  # [n]
        for lo, hi in spans:
            dense[m.rows[lo:hi]] += m.data[lo:hi]  # rows unique within a column: = np.add.at
        rows = np.flatnonzero(dense)  # [t] a row summing to 0 scores 0 + extra = rest: the same as untouched
        acc = dense[rows]
    else:
        cat = np.concatenate([m.rows[lo:hi] for lo, hi in spans])  # [P] rows, query-token order
        rows, inv = np.unique(cat, return_inverse=True)  # [t], [P]
        rows = rows.astype(np.int64)
        acc = np.zeros(rows.size, np.float32)
        np.add.at(acc, inv, np.concatenate([m.data[lo:hi] for lo, hi in spans]))  # in order: = dense +=
    if extra is not None:
        acc += np.float32(extra)
    return rows, acc, rest


def sparse_top_k(rows: np.ndarray, scores: np.ndarray, rest: float, num_docs: int, k: int,
                 ceiling: float = np.inf) -> tuple[np.ndarray, np.ndarray, int]:
    """The top-k of a sparse score vector (``rows`` ascending with ``scores``; every other row of
    ``num_docs`` scores ``rest``) with 0 < score < ceiling, best first, ties by lower row — exactly
    :func:`top_k_rows` of the dense vector. Returns ``(rows int64 [<=k], scores float32, above)``,
    ``above`` = rows scoring ``>= ceiling`` (0 with no ceiling). Untouched rows tie at ``rest``, so only
    the first k of them (lowest rows) can be chosen: cost O(touched + k)."""
    if np.isnan(ceiling):
        raise ValueError("ceiling is NaN; use +inf for 'no ceiling'")
    n_rest = num_docs - rows.size
    above = 0 if np.isposinf(ceiling) else int((scores >= ceiling).sum()) + (n_rest if rest >= ceiling else 0)
    if k > 0 and n_rest > 0 and 0 < rest < ceiling:  # untouched rows are candidates: the k lowest
        lim = min(num_docs, k + rows.size)
        free = np.ones(lim, bool)
        free[rows[rows < lim]] = False
        extra_rows = np.flatnonzero(free)[:k]  # [<=k]
        cand = np.concatenate([rows, extra_rows])
        cs = np.concatenate([scores, np.full(extra_rows.size, rest, np.float32)])
        order = np.argsort(cand, kind="stable")  # rows ascending: top_k_rows's "lower position" = lower row
        cand, cs = cand[order], cs[order]
    else:
        cand, cs = rows, scores
    pos = top_k_rows(cs, k, ceiling)
    return cand[pos], cs[pos], above


# ================================================================================================
# Parquet corpus and the shard actor body
# ================================================================================================
def corpus_layout(uri: str) -> tuple[list[str], list[tuple[str, int, int]]]:
    """(columns to read, [(path, row_group, num_rows)...]) of a corpus table, from metadata only (footers
    read by Ray tasks past a few files: ``storage.map_files``).

    Reads ``DOC_ID`` + ``PASSAGE`` when every file has it, else ``DOC_ID`` + ``TEXT`` (+ ``TITLE``)."""
    from raymine.index import list_parquet

    files = list_parquet(uri)
    schemas, groups = [], []
    for path, (rows, names) in zip(files, storage.map_files(uri, files, _corpus_footer), strict=True):
        schemas.append((path, names))
        groups.extend((path, g, n) for g, n in enumerate(rows))
    if all(PASSAGE in names for _, names in schemas):
        cols = [DOC_ID, PASSAGE]
    else:
        cols = [DOC_ID, TEXT] + ([TITLE] if all(TITLE in names for _, names in schemas) else [])
    for path, names in schemas:
        if missing := [c for c in cols if c not in names]:
            raise ValueError(f"{path}: corpus column(s) {missing} missing (has {sorted(names)})")
    return cols, groups


def _corpus_footer(fs: Any, path: str) -> tuple[list[int], frozenset[str]]:
    """(rows per row group, the corpus columns present) of one corpus file, from its footer."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        names = frozenset(pf.schema_arrow.names) & {DOC_ID, PASSAGE, TEXT, TITLE}
        return [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)], names


def read_passages(uri: str, pieces: Sequence[Any], cols: Sequence[str]) -> tuple[pa.Array, list[str]]:
    """(doc ids string array, passage texts) of the rows in ``pieces`` (``raymine.index.Piece``)."""
    from raymine.ingest import passage_text

    fs, _ = storage.resolve(uri)
    ids: list[pa.Array] = []
    texts: list[str] = []
    for p in pieces:
        with fs.open_input_file(p.path) as f:
            t = pq.ParquetFile(f).read_row_group(p.row_group, columns=list(cols)).slice(p.lo, p.hi - p.lo)
        if t.column(DOC_ID).null_count:
            raise ValueError(f"{p.path} row group {p.row_group}: null {DOC_ID}")
        ids.append(t.column(DOC_ID).combine_chunks().cast(pa.string()))
        if PASSAGE in cols:
            part = t.column(PASSAGE).to_pylist()
        else:
            titles = t.column(TITLE).to_pylist() if TITLE in cols else [None] * t.num_rows
            part = [passage_text(ti, tx) if tx is not None else None
                    for ti, tx in zip(titles, t.column(TEXT).to_pylist(), strict=True)]
        bad = [j for j, x in enumerate(part) if not isinstance(x, str) or not x.strip()]
        if bad:
            raise ValueError(f"{p.path} row group {p.row_group}: {len(bad)} empty/null texts (first doc "
                             f"{ids[-1][bad[0]].as_py()!r}); ingest drops them")
        texts.extend(part)
    return (pa.concat_arrays(ids) if ids else pa.array([], pa.string())), texts


def count_shard(uri: str, pieces: Sequence[Any], cols: Sequence[str], stopwords: str, num_parts: int
                ) -> tuple[Any, ...]:
    """Step 1 for one shard (a Ray task body, ``num_returns = 1 + num_parts``): read, tokenise, count.
    Returns ``(num_docs, total_len)`` then this shard's (term, df) table of each term partition."""
    _, texts = read_passages(uri, pieces, cols)
    c = count_terms(tokenize(texts, stopwords), num_parts)
    return ((c.num_docs, c.total_len), *c.parts)


def reduce_task(*parts: pa.Table) -> tuple[Any, ...]:
    """Step 2 for one term partition (a Ray task body, ``num_returns = 1 + num_shards``): the partition's
    vocabulary size, then each shard's terms of this partition with their global df."""
    v, out = reduce_partition(parts)
    return (v, *out)


class BM25Shard:
    """One shard: its rows (kept in doc-id order) scored with the corpus-wide statistics. Holds its own
    terms only (matrix, global df → non-occurrence scores), never the corpus vocabulary."""

    def __init__(self, uri: str, pieces: list[Any], cols: list[str], teacher_cfg: dict[str, Any],
                 num_docs: int, total_len: int, *df_parts: pa.Table) -> None:
        import pyarrow.compute as pc

        t0 = time.time()
        cfg = TeacherConfig(**teacher_cfg)
        ids, texts = read_passages(uri, pieces, cols)
        order = pc.sort_indices(ids).to_numpy()  # UTF-8 byte order = code-point order
        self.doc_ids = ids.take(pa.array(order))  # [n] sorted
        names = self.doc_ids.to_numpy(zero_copy_only=False).astype(str)
        if names.size > 1 and (dup := names[1:] == names[:-1]).any():
            raise ValueError(f"duplicate doc id {str(names[1:][dup][0])!r} in the BM25 corpus ({uri})")
        self._sorted = names  # [n] fixed-width unicode, for searchsorted lookups
        tokens = tokenize([texts[i] for i in order], cfg.bm25_stopwords)
        del texts
        stats = shard_stats(num_docs, total_len, df_parts)  # the global df of this shard's terms
        self.matrix = build_shard_matrix(tokens, stats, cfg.bm25_k1, cfg.bm25_b, cfg.bm25_method)
        del tokens
        self.nonocc = ({t: nonoccurrence(d, stats, cfg.bm25_k1, cfg.bm25_b, cfg.bm25_method) for t, d in stats.df.items()}
                       if cfg.bm25_method in _NONOCCURRENCE else None)  # this shard's terms, BM25L/BM25+ only
        self.num_docs = len(names)
        self.build_s = time.time() - t0

    def info(self) -> dict[str, Any]:
        import resource

        return {"num_docs": self.num_docs, "terms": len(self.matrix.vocab), "matrix_mb": round(self.matrix.nbytes / 2**20, 2),
                "build_s": round(self.build_s, 3), "pid": os.getpid(),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}

    def nonocc_values(self, token_lists: list[list[str]]) -> np.ndarray:
        """BM25L/BM25+: the non-occurrence score of every query token (flattened, float32 [sum of lengths]),
        NaN for a term this shard lacks (another shard holding it knows its global df)."""
        out = np.full(sum(map(len, token_lists)), np.nan, np.float32)
        if self.nonocc is not None:
            for j, t in enumerate(t for toks in token_lists for t in toks):
                if (v := self.nonocc.get(t)) is not None:
                    out[j] = v
        return out

    def _scores(self, toks: list[str], extra: np.ndarray | None, q: int):
        return sparse_scores(self.matrix, toks, None if extra is None else extra[q])

    def search(self, token_lists: list[list[str]], k: int, ceilings: np.ndarray | None,
               extra: np.ndarray | None = None):
        """Shard top-k: ``(scores f32 [nq,k'], doc ids object [nq,k'], above int64 [nq])``, k' = min(k, n).
        ``extra`` (BM25L/BM25+): float32 [nq] non-occurrence sums over the global vocabulary."""
        nq = len(token_lists)
        kk = max(0, min(k, self.num_docs))
        out_s = np.full((nq, kk), -np.inf, np.float32)
        out_i = np.full((nq, kk), "", object)
        above = np.zeros(nq, np.int64)
        if self.num_docs == 0:
            return out_s, out_i, above
        for q, toks in enumerate(token_lists):
            rows, s, rest = self._scores(toks, extra, q)  # touched rows only
            c = np.inf if ceilings is None else float(ceilings[q])
            top, ts, above[q] = sparse_top_k(rows, s, rest, self.num_docs, kk, c)
            out_s[q, : top.size] = ts
            out_i[q, : top.size] = self._sorted[top]
        return out_s, out_i, above

    def lookup(self, token_lists: list[list[str]], qidx: np.ndarray, doc_ids: list[str],
               extra: np.ndarray | None = None) -> np.ndarray:
        """Score of doc ``doc_ids[j]`` for query ``qidx[j]``; NaN for ids not in this shard. [m]"""
        out = np.full(len(doc_ids), np.nan, np.float32)
        if self.num_docs == 0 or not doc_ids:
            return out
        want = np.asarray(doc_ids, dtype=str)
        rows = np.minimum(np.searchsorted(self._sorted, want), self.num_docs - 1)  # [m]
        hit = self._sorted[rows] == want
        for q in np.unique(qidx[hit]):
            sel = hit & (qidx == q)
            touched, s, rest = self._scores(token_lists[q], extra, q)
            at = np.minimum(np.searchsorted(touched, rows[sel]), max(touched.size - 1, 0))  # [m_q]
            found = touched[at] == rows[sel] if touched.size else np.zeros(at.size, bool)
            out[sel] = np.where(found, s[at] if touched.size else rest, rest)
        return out


# ================================================================================================
# Driver-side handle (picklable: actor handles + metadata; every call is stateless)
# ================================================================================================
class ShardedBM25(ShardActors):
    """S BM25 shard actors over one corpus, scores equal to one bm25s index over the whole corpus.

    Same client interface as :class:`raymine.index.ShardedIndex` (``search_batch``, ``lookup_scores``,
    ``num_docs``, ``exact``, ``close``, context manager); the payload is query texts. Use
    :meth:`from_parquet`. The driver holds scalars (``stats``: docs, total length, vocabulary size) and
    object refs; the df tables travel from the count tasks to the reduce tasks to the actors in the
    object store. The client that built the index keeps the refs of the actors' df tables alive, so a
    shard that dies restarts and rebuilds the same rows with the same statistics (the price: each shard
    tokenises its rows twice, once to count and once to build); Ray stores objects under 100 KiB in their
    owner's memory, the driver's here, so small corpora's tables sit there (S × S of them, each < 100 KiB).
    Memory per shard: the term-doc score matrix (12 bytes per distinct (doc, term) pair, as bm25s), the
    sorted doc ids, the global df of its own terms and, for BM25L/BM25+, their non-occurrence scores.
    The client pickles as actor handles + metadata (Ray tasks can share it) and every call is stateless."""

    exact = True

    def __init__(self, actors: list, sizes: list[int], teacher_cfg: TeacherConfig, cfg: SearchConfig, uri: str,
                 infos: list[dict[str, Any]], stats: dict[str, int] | None = None, keep: Any = None) -> None:
        self.actors = actors
        self.sizes = sizes
        self.teacher_cfg = teacher_cfg
        self.cfg = cfg
        self.uri = uri
        self.infos = infos
        self.stats = dict(stats or {})  # scalars: num_docs, total_len, vocab_size
        self._keep = keep  # the actors' constructor arguments (restarts rebuild from them); not pickled

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_keep": None}  # tasks get handles + scalars, not the S×S refs

    @classmethod
    def from_parquet(cls, corpus_uri: str, teacher_cfg: TeacherConfig, cfg: SearchConfig,
                     shard_rows: Sequence[int] | None = None) -> ShardedBM25:
        """Count (one Ray task per shard), reduce by term (one task per term partition, P = S), start
        ``cfg.num_shards`` shard actors, each given the global df of its own terms. The driver sums scalars.

        ``corpus_uri``: a Parquet file or folder with ``DOC_ID`` and ``PASSAGE`` (else TITLE/TEXT).
        ``shard_rows`` overrides the balanced split (rows per shard, consecutive in file-name order)."""
        import ray

        from raymine.index import balanced_sizes, plan_shards

        if teacher_cfg.kind != "bm25":
            raise ValueError(f"ShardedBM25 needs a teacher of kind 'bm25', got {teacher_cfg.kind!r}")
        if teacher_cfg.bm25_method not in METHODS:
            raise ValueError(f"bm25_method must be one of {METHODS}, got {teacher_cfg.bm25_method!r}")
        t0 = time.time()
        cols, groups = corpus_layout(corpus_uri)
        total = sum(n for *_, n in groups)
        if total == 0:
            raise ValueError(f"{corpus_uri}: cannot index an empty corpus")
        sizes = list(shard_rows) if shard_rows is not None else balanced_sizes(total, cfg.num_shards)
        plans = plan_shards(groups, sizes)
        num_parts = len(plans)  # P term partitions = S shards
        opts = {"num_cpus": cfg.num_cpus_per_shard, "max_retries": 3}
        count = ray.remote(count_shard).options(num_returns=1 + num_parts, **opts)
        counts = [count.remote(corpus_uri, p, cols, teacher_cfg.bm25_stopwords, num_parts) for p in plans]  # [S][1+P]
        reduce = ray.remote(reduce_task).options(num_returns=1 + len(plans), **opts)
        reduced = [reduce.remote(*[c[1 + p] for c in counts]) for p in range(num_parts)]  # [P][1 + S]
        scalars = ray.get([c[0] for c in counts])  # [S] (num_docs, total_len): all the driver reads
        del counts  # the count tables are freed once the reduce tasks have read them
        n_docs, n_tokens = sum(d for d, _ in scalars), sum(t for _, t in scalars)
        t1 = time.time()
        # a shard that dies restarts and rebuilds the same rows from Parquet and the same df tables
        remote = ray.remote(BM25Shard).options(num_cpus=cfg.num_cpus_per_shard, max_restarts=-1, max_task_retries=-1)
        tcfg = to_dict(teacher_cfg)
        actors = [remote.remote(corpus_uri, plan, cols, tcfg, n_docs, n_tokens, *[r[1 + s] for r in reduced])
                  for s, plan in enumerate(plans)]
        vocab = sum(ray.get([r[0] for r in reduced]))
        infos = ray.get([a.info.remote() for a in actors])
        stats = {"num_docs": n_docs, "total_len": n_tokens, "vocab_size": int(vocab)}
        log.info("bm25: %d shards %s of %d docs, %d terms; counted in %.1f s, built in %.1f s", len(actors), sizes,
                 total, vocab, t1 - t0, time.time() - t1)
        return cls(actors, sizes, teacher_cfg, cfg, corpus_uri, infos, stats, [r[1:] for r in reduced])

    def tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        return tokenize(texts, self.teacher_cfg.bm25_stopwords)

    def _extra(self, toks: Any, token_lists: list[list[str]]) -> np.ndarray | None:
        """BM25L/BM25+: each query's float32 sum of the non-occurrence scores of its tokens in the GLOBAL
        vocabulary (query order, repeats counted, as bm25s); None for the other methods. [nq]"""
        import ray

        if self.teacher_cfg.bm25_method not in _NONOCCURRENCE:
            return None
        vals = np.fmax.reduce(ray.get([a.nonocc_values.remote(toks) for a in self.actors]), axis=0)  # [tokens]
        bounds = np.concatenate([[0], np.cumsum([len(t) for t in token_lists])])
        return np.array([(v := vals[lo:hi])[~np.isnan(v)].sum() for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)],
                        np.float32)

    def search_batch(self, texts: Sequence[str], k: int, ceilings: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Global top-``k`` of each query text below its ceiling (+inf = none): ``(scores f32 [nq,k],
        doc ids object [nq,k] ("" / -inf missing), above int64 [nq], short)``. ``above``: corpus docs
        scoring ``>= ceiling`` (exact); ``short`` is always 0 (the search is exact)."""
        import ray

        nq = len(texts)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        c = None
        if ceilings is not None:
            c = np.asarray(ceilings, np.float32).reshape(-1)
            if c.shape[0] != nq:
                raise ValueError(f"{c.shape[0]} ceilings for {nq} queries")
            if np.isnan(c).any():
                raise ValueError("ceilings contain NaN; use +inf for 'no ceiling'")
        token_lists = self.tokenize(texts)
        toks = ray.put(token_lists)
        extra = self._extra(toks, token_lists)
        parts = ray.get([a.search.remote(toks, k, c, extra) for a in self.actors])
        s, ids = merge_topk_by_id([p[0] for p in parts], [p[1] for p in parts], k)
        above = np.sum([p[2] for p in parts], axis=0).astype(np.int64)
        return s, ids, above, 0

    def lookup_scores(self, texts: Sequence[str], doc_ids: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """BM25 score of query i with each doc in ``doc_ids[i]`` → one float32 array per query; NaN for an
        id held by no shard (the caller counts it)."""
        import ray

        if len(doc_ids) != len(texts):
            raise ValueError(f"{len(doc_ids)} doc-id lists for {len(texts)} queries")
        lens = np.fromiter((len(d) for d in doc_ids), np.int64, len(doc_ids))
        flat = [str(d) for ds in doc_ids for d in ds]
        qidx = np.repeat(np.arange(len(texts)), lens)  # [m]
        token_lists = self.tokenize(texts)
        toks = ray.put(token_lists)
        extra = self._extra(toks, token_lists)
        return merge_lookups(ray.get([a.lookup.remote(toks, qidx, flat, extra) for a in self.actors]), flat, lens)
