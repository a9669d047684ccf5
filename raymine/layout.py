"""Where every stage reads and writes: one small dataclass of paths under the run's output root.

Every stage module exposes ``run(cfg, layout) -> manifest``; stages find their inputs here, never through
arguments wired by the orchestrator. Tables are folders of Parquet parts (``part-*.parquet``), so
workers write their own parts and a reader takes the folder whatever the number of parts.

    OUTPUT/
      ingest/corpus/          DOC_ID, TITLE, TEXT, PASSAGE (the text models see), TEXT_HASH
      ingest/train_queries/   QUERY_ID, TEXT, POSITIVE_IDS, EXCLUDED_IDS
      ingest/train_dropped/   QUERY_ID, REASON
      ingest/qrels/           QUERY_ID, DOC_ID, SCORE (the train split, kept rows)
      ingest/test_queries/    QUERY_ID, TEXT (the evaluated split's queries with a relevant document)
      ingest/test_qrels/      QUERY_ID, DOC_ID, SCORE (their judgements, zeros included)
      embed/<teacher>/corpus/, embed/<teacher>/queries/    id + EMBEDDING
      search/<teacher>/       SEARCH_SCHEMA, one row per query
      mine/                   report.json, scores.png, dropped/ (QUERY_ID, REASON)
      mined/                  MINED_COLUMNS
      exports/                trainer formats (sentence-transformers, FlagEmbedding, NeMo)
      model/                  the trained student;  train_checkpoints/: Ray Train's storage
      evaluate_embed/<model>/ queries/, corpus/: the evaluated model's vectors (id + EMBEDDING)
      evaluate/               evaluation.json / .md / .png;  topk/<model>/: QUERY_ID, CANDIDATE_IDS, CANDIDATE_SCORES
      report.json, report.md
"""
from __future__ import annotations

from dataclasses import dataclass

from raymine import storage


@dataclass(frozen=True)
class Layout:
    """Paths of one run (local folder or any pyarrow/fsspec URI)."""

    root: str

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # ---- ingest ----------------------------------------------------------------------------------
    @property
    def ingest(self) -> str:
        return self.path("ingest")

    @property
    def corpus(self) -> str:
        return self.path("ingest", "corpus")

    @property
    def train_queries(self) -> str:
        return self.path("ingest", "train_queries")

    @property
    def train_dropped(self) -> str:
        return self.path("ingest", "train_dropped")

    @property
    def qrels(self) -> str:
        return self.path("ingest", "qrels")

    @property
    def test_queries(self) -> str:
        """The evaluated split's queries (``evaluate.split``), written at ingest."""
        return self.path("ingest", "test_queries")

    @property
    def test_qrels(self) -> str:
        return self.path("ingest", "test_qrels")

    # ---- embed / search --------------------------------------------------------------------------
    def embed(self, teacher: str, side: str | None = None) -> str:
        """``embed/<teacher>`` or its ``corpus`` / ``queries`` table."""
        if side is None:
            return self.path("embed", teacher)
        if side not in ("corpus", "queries"):
            raise ValueError(f"side must be 'corpus' or 'queries', got {side!r}")
        return self.path("embed", teacher, side)

    def search(self, teacher: str) -> str:
        return self.path("search", teacher)

    # ---- mine and after --------------------------------------------------------------------------
    @property
    def mine(self) -> str:
        return self.path("mine")

    @property
    def mined(self) -> str:
        return self.path("mined")

    @property
    def exports(self) -> str:
        return self.path("exports")

    @property
    def model(self) -> str:
        return self.path("model")

    @property
    def train_checkpoints(self) -> str:
        return self.path("train_checkpoints")

    @property
    def evaluate(self) -> str:
        return self.path("evaluate")

    def evaluate_embed(self, model: str, side: str | None = None) -> str:
        """``evaluate_embed/<model>`` (an embed stage folder) or its ``corpus`` / ``queries`` table."""
        if side is None:
            return self.path("evaluate_embed", model)
        if side not in ("corpus", "queries"):
            raise ValueError(f"side must be 'corpus' or 'queries', got {side!r}")
        return self.path("evaluate_embed", model, side)

    def evaluate_topk(self, model: str) -> str:
        """The evaluated model's exact top-k list per test query (written by Ray tasks)."""
        return self.path("evaluate", "topk", model)
