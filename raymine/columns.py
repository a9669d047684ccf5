"""Column names of every table that crosses a stage boundary — defined once, used everywhere.

All stages read and write Parquet with these names. IDs are the user's string ids end to end.
"""
from __future__ import annotations

# --- ingest: corpus, queries, qrels -------------------------------------------------------------
DOC_ID = "doc_id"
TITLE = "title"
TEXT = "text"
PASSAGE = "passage"  # the text teachers and students see: title + " " + text (written once, at ingest)
QUERY_ID = "query_id"
SCORE = "score"  # qrels relevance grade: > 0 is positive, 0 is not

CORPUS_COLUMNS = (DOC_ID, TITLE, TEXT)
QUERY_COLUMNS = (QUERY_ID, TEXT)
QRELS_COLUMNS = (QUERY_ID, DOC_ID, SCORE)

# --- embed: one row per text, L2-normalised fixed-size list -------------------------------------
EMBEDDING = "embedding"  # fixed_size_list<float16|float32>[dim]
# corpus embeddings: (doc_id, embedding); query embeddings: (query_id, embedding)

# --- search: one row per query and teacher -----------------------------------------------------
CANDIDATE_IDS = "candidate_ids"  # list<string>, best first
CANDIDATE_SCORES = "candidate_scores"  # list<float32>, descending
CEILING = "ceiling"  # float32: the per-query score ceiling applied in the search (+inf = none)
ABOVE_CEILING = "above_ceiling"  # int64: corpus docs scoring >= the query's ceiling, positives included
# (what the ceiling removed inside the search; exact for Flat/BM25, a lower bound for IVF/PQ)

# --- mine: one row per query (and teacher, before ensembling) ------------------------------------
QUERY = "query"  # the query text
POSITIVE_IDS = "positive_ids"  # list<string>
POSITIVE_SCORES = "positive_scores"  # list<float32>, teacher score of each positive
NEGATIVE_IDS = "negative_ids"  # list<string>
NEGATIVE_SCORES = "negative_scores"  # list<float32>
TEACHER = "teacher"  # string; several teachers joined with "+" after ensembling
METHOD = "method"  # string, e.g. "percpos(0.95)"
NUM_SHORT = "num_short"  # int32: negatives requested but not delivered

MINED_COLUMNS = (
    QUERY_ID, QUERY, POSITIVE_IDS, POSITIVE_SCORES, NEGATIVE_IDS, NEGATIVE_SCORES, TEACHER, METHOD,
)

# --- dropped queries: every input query is either mined or listed here with its reason ---------
REASON = "reason"
DROPPED_COLUMNS = (QUERY_ID, REASON)

# --- training export (sentence-transformers layout): one row per (query, positive) -------------
ANCHOR = "anchor"
POSITIVE = "positive"
NEGATIVE_PREFIX = "negative_"  # negative_1 .. negative_n


def negative_column(i: int) -> str:
    """Name of the i-th (1-based) negative column of the sentence-transformers export."""
    return f"{NEGATIVE_PREFIX}{i}"

# --- ids that are not labelled positives but must never be negatives (identical text to a positive)
EXCLUDED_IDS = "excluded_ids"  # list<string>
# --- text hash used to find identical texts (normalised: casefolded, whitespace collapsed)
TEXT_HASH = "text_hash"  # int64

# --- train rows (internal, built by the train stage from the mined table + corpus): one row per
# (query, positive); QUERY_ID, QUERY, POSITIVE_IDS (all of the query's), NEGATIVE_IDS as above
POSITIVE_ID = "positive_id"  # string: this row's positive (its text in POSITIVE)
NEGATIVES = "negatives"  # list<string>: texts of NEGATIVE_IDS, same order (variable length)
TRAIN_ROW_COLUMNS = (QUERY_ID, QUERY, POSITIVE_ID, POSITIVE, POSITIVE_IDS, NEGATIVE_IDS, NEGATIVES)
