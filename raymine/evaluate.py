"""Evaluate stage: retrieval quality of any list of models through mteb, written as JSON, Markdown and a plot.

No hand-written metrics: every number comes from ``mteb.evaluate``. Two kinds of task:

* local BEIR folders or Parquet tables (offline) wrapped as an mteb ``AbsTaskRetrieval``
  (``cfg.tasks == ("local",)`` means the ``data`` folder's ``cfg.split``; any other entry that is a
  folder is read the same way);
* standard MTEB task names (``NQ``, ``HotpotQA``, ``FiQA2018``...) from ``mteb.get_tasks`` — these
  need the Hugging Face hub; when it is unreachable the stage fails naming the task, it never skips.

Documents are read by mteb as ``title + " " + text`` (its own convention for BEIR corpora), so local
folders and the published MTEB numbers are computed the same way.
"""
from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from raymine import storage
from raymine.columns import DOC_ID, QUERY_ID, SCORE, TEXT, TITLE
from raymine.config import EvaluateConfig, TeacherConfig, to_dict

log = logging.getLogger(__name__)

LOCAL = "local"
METRIC_LABELS = {"ndcg_at_10": "nDCG@10", "recall_at_100": "Recall@100", "mrr_at_10": "MRR@10"}


class EvaluationError(RuntimeError):
    """A task could not be loaded or evaluated; the message names the task."""


# ------------------------------------------------------------------------------------------------
# Local data (BEIR folder or Parquet tables)
# ------------------------------------------------------------------------------------------------
@dataclass
class LocalData:
    """One split of a local retrieval data set as Arrow tables (ingest's column names)."""

    corpus: pa.Table  # DOC_ID, TITLE, TEXT
    queries: pa.Table  # QUERY_ID, TEXT
    qrels: pa.Table  # QUERY_ID, DOC_ID, SCORE (int)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count


def _load_local(path: str, split: str) -> LocalData:
    """One split of a BEIR folder or Parquet folder, read and validated by :func:`raymine.ingest.read_beir`
    (its errors name file, line and rule; its skips are counted). Only queries judged in ``split`` are
    kept (BEIR convention); see :func:`_clean` for the evaluation's own counted skips."""
    from raymine.ingest import read_beir

    data = read_beir(path, split)
    skipped = {k.removeprefix("skipped_"): v for k, v in data.report.counts.items() if k.startswith("skipped_")}
    return _clean(LocalData(corpus=data.corpus, queries=data.queries, qrels=data.qrels, skipped=skipped))


def _clean(data: LocalData) -> LocalData:
    """Keep what mteb can score, counting every drop: queries not judged in the split, and queries whose
    judgements are all 0 (no relevant document: nDCG is undefined for them; BEIR/pytrec_eval would count
    them as 0). Empty texts, duplicate ids and qrels naming unknown ids were already handled by
    :func:`raymine.ingest.read_beir`."""
    skipped: dict[str, int] = dict(data.skipped)
    corpus, queries, qrels = data.corpus, data.queries, data.qrels
    query_ids = queries.column(QUERY_ID).to_pylist()
    qset = set(query_ids)
    scores = qrels.column(SCORE).to_numpy()
    positive_q = set(np.asarray(qrels.column(QUERY_ID).to_pylist(), dtype=object)[scores > 0].tolist())
    judged_q = set(qrels.column(QUERY_ID).to_pylist())
    no_pos = judged_q - positive_q
    if no_pos:
        skipped["queries_without_positive"] = len(no_pos)
        qrels = qrels.filter(pa.array([qi in positive_q for qi in qrels.column(QUERY_ID).to_pylist()]))
    unjudged = qset - judged_q
    if unjudged:
        skipped["queries_not_in_split"] = len(unjudged)
    queries = queries.filter(pa.array([qi in positive_q for qi in query_ids]))
    return LocalData(corpus=corpus, queries=queries, qrels=qrels, skipped=skipped)


def subsample_queries(data: LocalData, max_queries: int, seed: int) -> LocalData:
    """A seeded subset of ``max_queries`` queries (and their qrels); the corpus stays whole."""
    if max_queries <= 0 or data.queries.num_rows <= max_queries:
        return data
    ids = np.array(sorted(data.queries.column(QUERY_ID).to_pylist()), dtype=object)
    chosen = set(np.random.default_rng(seed).choice(ids, size=max_queries, replace=False).tolist())
    queries = data.queries.filter(pa.array([qi in chosen for qi in data.queries.column(QUERY_ID).to_pylist()]))
    qrels = data.qrels.filter(pa.array([qi in chosen for qi in data.qrels.column(QUERY_ID).to_pylist()]))
    return LocalData(corpus=data.corpus, queries=queries, qrels=qrels, skipped=dict(data.skipped))


# ------------------------------------------------------------------------------------------------
# mteb glue (mteb is imported lazily: 4.5 s cold, and it creates its result cache at import)
# ------------------------------------------------------------------------------------------------
def _import_mteb(cache_dir: str | None = None) -> Any:
    """Import mteb with its result cache kept out of the home folder (``MTEB_CACHE``)."""
    if "MTEB_CACHE" not in os.environ:
        import tempfile

        os.environ["MTEB_CACHE"] = cache_dir or os.path.join(tempfile.gettempdir(), "raymine-mteb-cache")
    import mteb

    return mteb


def make_local_task(name: str, data: LocalData, split: str) -> Any:
    """An mteb retrieval task (main score nDCG@10) over one split of local data."""
    _import_mteb()
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    metadata = TaskMetadata(
        name=name,
        description=f"Local retrieval data set {name} (split {split}), evaluated offline by raymine.",
        reference=None,
        dataset={"path": "local", "revision": "local"},
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=[split],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        sample_creation=None,
        bibtex_citation="",
    )
    corpus = Dataset.from_dict({
        "id": data.corpus.column(DOC_ID).to_pylist(),
        "title": [t or "" for t in data.corpus.column(TITLE).to_pylist()],
        "text": [t or "" for t in data.corpus.column(TEXT).to_pylist()],
    })
    queries = Dataset.from_dict({
        "id": data.queries.column(QUERY_ID).to_pylist(),
        "text": data.queries.column(TEXT).to_pylist(),
    })
    relevant: dict[str, dict[str, int]] = {}
    for qi, di, s in zip(data.qrels.column(QUERY_ID).to_pylist(), data.qrels.column(DOC_ID).to_pylist(),
                         data.qrels.column(SCORE).to_pylist(), strict=True):
        relevant.setdefault(qi, {})[di] = int(s)

    class LocalRetrievalTask(AbsTaskRetrieval):
        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            self.dataset = {"default": {split: {"corpus": corpus, "queries": queries,
                                                "relevant_docs": relevant, "top_ranked": None}}}
            self.data_loaded = True

    LocalRetrievalTask.metadata = metadata
    LocalRetrievalTask.__name__ = f"Local_{name}"
    return LocalRetrievalTask()


def _model_name(label: str) -> str:
    """mteb wants 'organization/model_name'."""
    return label if "/" in label else f"raymine/{label}"


def make_mteb_model(label: str, teacher: TeacherConfig, batch_size: int | None = None, encoder: Any = None) -> Any:
    """An mteb encoder (``AbsEncoder``, cosine similarity) around a raymine :class:`~raymine.encoders.Encoder`.

    Queries get the teacher's ``query_prompt``, documents its ``passage_prompt``; pooling, max lengths,
    dtype and device come from the TeacherConfig too. ``encoder`` lets a caller pass one already loaded.
    """
    _import_mteb()
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType

    if teacher.kind != "dense":
        raise EvaluationError(f"model {label!r}: kind={teacher.kind!r}; only dense models are evaluated through mteb")

    class RaymineMtebEncoder(AbsEncoder):
        def __init__(self) -> None:
            if encoder is None:
                from raymine.encoders import Encoder

                self.model = Encoder(teacher)
            else:
                self.model = encoder
            self.mteb_model_meta = ModelMeta(
                loader=None, name=_model_name(label), revision=None, release_date=None, languages=None,
                n_parameters=None, memory_usage_mb=None, max_tokens=float(teacher.passage_max_length),
                embed_dim=int(self.model.dim), license=None, open_weights=True, public_training_code=None,
                public_training_data=None, framework=["PyTorch"], similarity_fn_name=ScoringFunction.COSINE,
                use_instructions=bool(teacher.query_prompt or teacher.passage_prompt), training_datasets=None,
            )

        def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
                   prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
            texts: list[str] = []
            for batch in inputs:
                texts.extend(batch["text"])
            side = "query" if prompt_type == PromptType.query else "passage"
            return self.model.encode(texts, side, batch_size=batch_size)  # [n, dim] float32

    return RaymineMtebEncoder()


def _resolve_tasks(cfg: EvaluateConfig, data: str) -> list[tuple[str, Any, dict[str, Any]]]:
    """(task name, mteb task, info) for every entry of ``cfg.tasks``; fails naming the task."""
    out = []
    for entry in cfg.tasks:
        if entry == LOCAL or storage.exists(entry):
            path = data if entry == LOCAL else entry
            if not storage.exists(path):
                raise EvaluationError(f"task {entry!r}: local data folder {path!r} does not exist")
            local = _load_local(path, cfg.split)
            full = local.queries.num_rows
            local = subsample_queries(local, cfg.max_queries, cfg.seed)
            name = os.path.basename(os.path.normpath(path.split("://", 1)[-1])) or "local"
            info = {"source": path, "split": cfg.split, "documents": local.corpus.num_rows,
                    "queries": local.queries.num_rows, "queries_available": full,
                    "qrels": local.qrels.num_rows, "skipped": local.skipped,
                    "subset": local.queries.num_rows < full, "seed": cfg.seed}
            if local.skipped:
                log.warning("task %s: skipped %s", name, local.skipped)
            if local.queries.num_rows == 0:
                raise EvaluationError(f"task {entry!r}: no query with a relevant document in split {cfg.split!r}")
            out.append((name, make_local_task(name, local, cfg.split), info))
            continue
        mteb = _import_mteb()
        try:
            task = mteb.get_tasks(tasks=[entry], eval_splits=[cfg.split])[0]
        except (KeyError, IndexError, ValueError) as e:
            raise EvaluationError(f"task {entry!r}: not a local folder and not an MTEB task name ({e})") from e
        try:
            task.load_data()
        except Exception as e:  # noqa: BLE001 -- any hub/network failure must name the task
            raise EvaluationError(
                f"MTEB task {entry!r} could not be loaded (it downloads from the Hugging Face hub, "
                f"which may be unreachable; use a local BEIR/Parquet folder offline): {type(e).__name__}: {e}"
            ) from e
        if cfg.max_queries > 0:
            log.warning("task %s: max_queries applies to local tasks only; evaluating all queries", entry)
        out.append((entry, task, {"source": f"mteb:{entry}", "split": cfg.split, "subset": False}))
    return out


def _scores_of(result: Any, task_name: str, split: str) -> dict[str, Any]:
    """The score dict of one task/split from an mteb ModelResult (averaged over hf subsets)."""
    for tr in result.task_results:
        if tr.task_name == task_name:
            rows = tr.scores.get(split) or []
            if not rows:
                raise EvaluationError(f"task {task_name!r}: mteb returned no scores for split {split!r}")
            if len(rows) == 1:
                return dict(rows[0])
            keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))]
            return {k: float(np.mean([r[k] for r in rows])) for k in keys}
    raise EvaluationError(f"task {task_name!r}: missing from mteb's results")


class PassageCache:
    """Encoder wrapper: passages that the same encoder config already embedded (e.g. the embed stage's
    teacher output, when the student's base model is that teacher) come from a table, by exact text;
    the rest, and every query, go through the encoder. Saves re-encoding a corpus to evaluate a base model."""

    def __init__(self, encoder: Any, vectors: Mapping[str, np.ndarray]):
        self.encoder, self.vectors = encoder, vectors
        self.hits = self.misses = 0

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    def encode(self, texts: Sequence[str], side: str, batch_size: int | None = None) -> np.ndarray:
        if side != "passage":
            return self.encoder.encode(texts, side, batch_size=batch_size)
        found = [self.vectors.get(t) for t in texts]
        miss = [i for i, v in enumerate(found) if v is None]
        out = np.empty((len(texts), self.dim), np.float32)  # [n, dim]
        if miss:
            out[miss] = self.encoder.encode([texts[i] for i in miss], side, batch_size=batch_size)
        for i, v in enumerate(found):
            if v is not None:
                out[i] = v
        self.hits += len(texts) - len(miss)
        self.misses += len(miss)
        return out


def evaluate_models(models: Mapping[str, TeacherConfig], cfg: EvaluateConfig, data: str, out_dir: str,
                    passage_cache: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> dict:
    """Evaluate every model on every task with mteb; write ``evaluation.json``, ``evaluation.md`` and
    ``evaluation.png`` under ``out_dir``. Returns ``{task: {model: {metric: value}}}`` (values in [0, 1]).

    The first model is the baseline: the Markdown table shows each other model's delta against it.
    ``passage_cache``: model label → {passage text: embedding} already computed with that model's exact
    encoder config (see :class:`PassageCache`).
    """
    if not models:
        raise EvaluationError("no models to evaluate")
    t0 = time.perf_counter()
    if "://" not in out_dir:
        os.makedirs(out_dir, exist_ok=True)
    mteb = _import_mteb(os.path.join(os.path.abspath(out_dir), "mteb_cache") if "://" not in out_dir else None)
    tasks = _resolve_tasks(cfg, data)
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name, _, _ in tasks}
    timings: dict[str, float] = {}
    for label, teacher in models.items():
        tm = time.perf_counter()
        encoder = None
        if passage_cache and label in passage_cache:
            from raymine.encoders import Encoder

            encoder = PassageCache(Encoder(teacher), passage_cache[label])
        model = make_mteb_model(label, teacher, cfg.batch_size, encoder=encoder)
        for name, task, info in tasks:
            ts = time.perf_counter()
            res = mteb.evaluate(model, tasks=[task], cache=None, overwrite_strategy="always",
                                encode_kwargs={"batch_size": cfg.batch_size}, show_progress_bar=False)
            scores = _scores_of(res, task.metadata.name, info["split"])
            missing = [m for m in cfg.metrics if m not in scores]
            if missing:
                raise EvaluationError(f"task {name!r}: mteb scores lack {missing}")
            results[name][label] = {m: float(scores[m]) for m in cfg.metrics}
            log.info("%s on %s: %s (%.1f s)", label, name,
                     ", ".join(f"{m}={scores[m]:.4f}" for m in cfg.metrics), time.perf_counter() - ts)
        timings[label] = round(time.perf_counter() - tm, 2)
        if encoder is not None:
            log.info("%s: %d passages from the cache, %d encoded", label, encoder.hits, encoder.misses)
        del model
    report = {
        "results": results,
        "tasks": {name: info for name, _, info in tasks},
        "models": {label: to_dict(t) for label, t in models.items()},
        "config": to_dict(cfg),
        "baseline": next(iter(models)),
        "seconds_per_model": timings,
        "seconds": round(time.perf_counter() - t0, 2),
        "mteb_version": getattr(mteb, "__version__", "unknown"),
    }
    storage.write_json(storage.join(out_dir, "evaluation.json"), report)
    storage.write_bytes(storage.join(out_dir, "evaluation.md"), render_markdown(report).encode("utf-8"))
    storage.write_bytes(storage.join(out_dir, "evaluation.png"), render_plot(results, cfg.metrics))
    log.info("evaluated %d model(s) on %d task(s) in %.1f s → %s", len(models), len(tasks),
             time.perf_counter() - t0, out_dir)
    return results


# ------------------------------------------------------------------------------------------------
# Report rendering
# ------------------------------------------------------------------------------------------------
def render_markdown(report: Mapping[str, Any]) -> str:
    """Before/after table: one row per task and metric, one column per model (×100, two decimals),
    plus one Δ column per non-baseline model against the first model."""
    results = report["results"]
    metrics = report["config"]["metrics"]
    labels = list(report["models"])
    base = labels[0]
    head = ["task", "metric", *labels, *[f"Δ {m} vs {base}" for m in labels[1:]]]
    lines = ["# Retrieval evaluation (mteb)", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for task, per_model in results.items():
        for metric in metrics:
            vals = [per_model[m][metric] * 100 for m in labels]
            deltas = [f"{v - vals[0]:+.2f}" for v in vals[1:]]
            cells = [task, METRIC_LABELS.get(metric, metric), *[f"{v:.2f}" for v in vals], *deltas]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for task, info in report["tasks"].items():
        what = f"- **{task}**: {info['source']}, split `{info['split']}`"
        if "queries" in info:
            what += f", {info['documents']} documents, {info['queries']} queries"
        if info.get("subset"):
            what += (f" — **seeded subset** of {info['queries']} of {info['queries_available']} queries "
                     f"(seed {info['seed']}); not comparable with full-split scores")
        if info.get("skipped"):
            what += f"; skipped: {info['skipped']}"
        lines.append(what)
    lines.append("")
    lines.append("Scores ×100 from mteb " + str(report.get("mteb_version", "")) +
                 "; documents read as `title + ' ' + text` (mteb's convention).")
    return "\n".join(lines) + "\n"


def render_plot(results: Mapping[str, Mapping[str, Mapping[str, float]]], metrics: Sequence[str]) -> bytes:
    """Grouped bar chart (PNG bytes): one panel per metric, tasks on the x axis, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    labels = list(next(iter(results.values())).keys()) if tasks else []
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(tasks))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for i, label in enumerate(labels):
            vals = [results[t][label][metric] * 100 for t in tasks]
            bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, vals, width, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(x, tasks, rotation=20)
        ax.set_title(METRIC_LABELS.get(metric, metric))
        ax.set_ylim(0, 105)
    axes[0][0].set_ylabel("score ×100")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
