"""Evaluate stage: retrieval quality of any list of models, scored by mteb, written as JSON, Markdown and a plot.

No hand-written metrics: every number comes from mteb's retrieval scoring (pytrec_eval + its MRR).

The pipeline's own test split (``evaluate.tasks`` entry ``local``) is a distributed job, like mining
(:func:`evaluate_split`): the test queries and qrels written at ingest, queries and corpus encoded by the embed
actor pool, each query's exact top-k from the sharded index, the metrics from those lists with mteb's scoring
functions (:func:`mteb_scores`). The driver holds the test split's queries, qrels and top-k lists only.

Through ``mteb.evaluate`` in this process (:func:`evaluate_models`), two kinds of task:

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
import pyarrow.compute as pc

from raymine import storage
from raymine.columns import (
    CANDIDATE_IDS,
    CANDIDATE_SCORES,
    DOC_ID,
    EMBEDDING,
    PASSAGE,
    QUERY_ID,
    SCORE,
    TEXT,
    TITLE,
)
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


class PoolEncoder:
    """``Encoder.encode``'s interface (``dim``, ``encode(texts, side, batch_size)``) over the embed actor pool:
    each call writes its texts as a small table under ``work_uri`` and runs :func:`raymine.embed.embed_tables` on
    it (the actors load the model and write vector parts; a repeated call with the same texts is found done),
    then reads the vectors back in the texts' order. mteb's named tasks encode through it, so their corpora are
    embedded by the cluster's actors (on its GPUs) instead of the driver process."""

    def __init__(self, teacher: TeacherConfig, embed_cfg: Any, work_uri: str) -> None:
        self.teacher, self.embed_cfg, self.work_uri = teacher, embed_cfg, work_uri
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode(["dimension probe"], "query").shape[1])
        return self._dim

    def encode(self, texts: Sequence[str], side: str, batch_size: int | None = None) -> np.ndarray:
        import hashlib
        from dataclasses import replace

        import pyarrow.parquet as pq

        from raymine.embed import EmbedInput, embed_tables, read_embeddings

        h = hashlib.sha256(side.encode())
        for t in texts:
            h.update(t.encode("utf-8", "surrogatepass") + b"\0")
        root = storage.join(self.work_uri, f"{side}-{h.hexdigest()[:16]}")  # the stage folder (cleared on a new key)
        src, out = storage.join(self.work_uri, f"texts-{side}-{h.hexdigest()[:16]}"), storage.join(root, "vectors")
        ids = [f"{i:012d}" for i in range(len(texts))]
        if not storage.exists(storage.join(src, "part-0.parquet")):
            storage.makedirs(src)
            fs, path = storage.resolve(storage.join(src, "part-0.parquet"))
            pq.write_table(pa.table({"id": ids, "text": pa.array(list(texts), pa.string())}), path, filesystem=fs)
        teacher = self.teacher if batch_size is None else replace(self.teacher, batch_size=batch_size)
        embed_tables(teacher, self.embed_cfg, [EmbedInput(side, src, "id", "text", out)], root, "mteb-task-texts")
        got_ids, vectors = read_embeddings(out, "id")
        order = np.argsort(got_ids.astype(str), kind="stable")  # ids are zero-padded row numbers
        if len(got_ids) != len(texts):
            raise RuntimeError(f"{out}: {len(got_ids)} vectors for {len(texts)} texts")
        return vectors[order]


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


def _mteb_results(models: Mapping[str, TeacherConfig], cfg: EvaluateConfig, data: str, out_dir: str,
                  embed_cfg: Any = None) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, Any],
                                                  dict[str, float], str]:
    """(results, task infos, seconds per model, mteb version) of every model on every task of ``cfg.tasks``
    through ``mteb.evaluate``: each model encodes through the embed actor pool (:class:`PoolEncoder`) when
    ``embed_cfg`` is given (the pipeline), else in this process."""
    if "://" not in out_dir:
        os.makedirs(out_dir, exist_ok=True)
    mteb = _import_mteb(os.path.join(os.path.abspath(out_dir), "mteb_cache") if "://" not in out_dir else None)
    tasks = _resolve_tasks(cfg, data)
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name, _, _ in tasks}
    timings: dict[str, float] = {}
    for label, teacher in models.items():
        tm = time.perf_counter()
        pool = None if embed_cfg is None else PoolEncoder(teacher, embed_cfg, storage.join(out_dir, "mteb_embed", label))
        model = make_mteb_model(label, teacher, cfg.batch_size, encoder=pool)
        for name, task, info in tasks:
            ts = time.perf_counter()
            res = mteb.evaluate(model, tasks=[task], cache=None, overwrite_strategy="always",
                                encode_kwargs={"batch_size": cfg.batch_size}, show_progress_bar=False)
            results[name][label] = _pick(_scores_of(res, task.metadata.name, info["split"]), cfg.metrics, name)
            log.info("%s on %s: %s (%.1f s)", label, name, _fmt(results[name][label]), time.perf_counter() - ts)
        timings[label] = round(time.perf_counter() - tm, 2)
        del model
    return results, {name: info for name, _, info in tasks}, timings, getattr(mteb, "__version__", "unknown")


def _pick(scores: Mapping[str, Any], metrics: Sequence[str], task: str) -> dict[str, float]:
    missing = [m for m in metrics if m not in scores]
    if missing:
        raise EvaluationError(f"task {task!r}: mteb scores lack {missing}")
    return {m: float(scores[m]) for m in metrics}


def _fmt(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{m}={v:.4f}" for m, v in scores.items())


def write_report(out_dir: str, results: Mapping[str, Any], tasks: Mapping[str, Any],
                 models: Mapping[str, TeacherConfig], cfg: EvaluateConfig, timings: Mapping[str, float],
                 seconds: float, mteb_version: str) -> dict[str, Any]:
    """``evaluation.json``, ``evaluation.md`` and ``evaluation.png`` under ``out_dir``; returns the report."""
    report = {
        "results": dict(results),
        "tasks": dict(tasks),
        "models": {label: to_dict(t) for label, t in models.items()},
        "config": to_dict(cfg),
        "baseline": next(iter(models)),
        "seconds_per_model": dict(timings),
        "seconds": round(seconds, 2),
        "mteb_version": mteb_version,
    }
    storage.write_json(storage.join(out_dir, "evaluation.json"), report)
    storage.write_bytes(storage.join(out_dir, "evaluation.md"), render_markdown(report).encode("utf-8"))
    storage.write_bytes(storage.join(out_dir, "evaluation.png"), render_plot(results, cfg.metrics))
    return report


def evaluate_models(models: Mapping[str, TeacherConfig], cfg: EvaluateConfig, data: str, out_dir: str) -> dict:
    """Evaluate every model on every task with mteb in this process (BEIR/Parquet folders read by
    :func:`raymine.ingest.read_beir`, or MTEB task names); write ``evaluation.json``, ``.md`` and ``.png``
    under ``out_dir``. Returns ``{task: {model: {metric: value}}}`` (values in [0, 1]). A run's own test split
    goes through :func:`evaluate_run` instead (distributed; same figures).

    The first model is the baseline: the Markdown table shows each other model's delta against it.
    """
    if not models:
        raise EvaluationError("no models to evaluate")
    t0 = time.perf_counter()
    results, tasks, timings, version = _mteb_results(models, cfg, data, out_dir)
    write_report(out_dir, results, tasks, models, cfg, timings, time.perf_counter() - t0, version)
    log.info("evaluated %d model(s) on %d task(s) in %.1f s → %s", len(models), len(tasks),
             time.perf_counter() - t0, out_dir)
    return results


# ------------------------------------------------------------------------------------------------
# The run's own test split, distributed: embed actor pool → sharded exact search → mteb's scoring
# ------------------------------------------------------------------------------------------------
TOPK_SCHEMA = pa.schema([(QUERY_ID, pa.string()), (CANDIDATE_IDS, pa.list_(pa.string())),
                         (CANDIDATE_SCORES, pa.list_(pa.float32()))])


def metric_ks(metrics: Sequence[str]) -> list[int]:
    """The cut-offs the metrics name (``ndcg_at_10`` → 10), with 1 (mteb's score dict reads Recall@1)."""
    ks = {1}
    for m in metrics:
        head, sep, k = m.rpartition("_at_")
        if not sep or not k.isdigit() or int(k) < 1:
            raise EvaluationError(f"evaluate.metrics: {m!r} is not '<metric>_at_<k>' (e.g. ndcg_at_10)")
        ks.add(int(k))
    return sorted(ks)


def mteb_scores(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]],
                k_values: Sequence[int]) -> dict[str, float]:
    """mteb's retrieval score dict (``ndcg_at_10``, ``recall_at_100``, ``mrr_at_10``...) of a run
    ``{query: {doc: score}}`` against ``{query: {doc: grade}}``: mteb's own scoring functions
    (pytrec_eval + its MRR), as its retrieval evaluator calls them, so figures equal ``mteb.evaluate``'s."""
    _import_mteb()
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores, make_score_dict

    r = calculate_retrieval_scores(run, qrels, list(k_values))
    scores = make_score_dict(ndcg=r.ndcg, _map=r.map, recall=r.recall, precision=r.precision, mrr=r.mrr,
                             naucs=r.naucs, naucs_mrr=r.naucs_mrr, hit_rate=r.hit_rate, task_scores={})
    return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}


def topk_part(index: Any, emb_path: str, emb_uri: str, out_uri: str, i: int, k: int) -> int:
    """Exact top-k of the queries of one query-embedding part → part ``i`` of ``out_uri`` (TOPK_SCHEMA)."""
    import pyarrow.parquet as pq

    from raymine import parts
    from raymine.embed import arrow_to_embeddings

    t = pq.read_table(emb_path, filesystem=storage.resolve(emb_uri)[0], columns=[QUERY_ID, EMBEDDING])
    q = arrow_to_embeddings(t.column(EMBEDDING))  # [nq, d]
    scores, ids, _, _ = index.search_batch(q, k)  # [nq, k] each; exact, ties by doc id
    offsets = pa.array(np.arange(0, ids.size + 1, max(1, ids.shape[1]), dtype=np.int32)[: t.num_rows + 1])
    out = pa.table({QUERY_ID: t.column(QUERY_ID),
                    CANDIDATE_IDS: pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1), pa.string())),
                    CANDIDATE_SCORES: pa.ListArray.from_arrays(offsets, pa.array(scores.reshape(-1), pa.float32()))},
                   schema=TOPK_SCHEMA)
    parts.write_part(out, out_uri, i)
    return t.num_rows


def _topk_batch(batch: dict[str, np.ndarray], index: Any, emb_uri: str, out_uri: str, k: int) -> dict[str, np.ndarray]:
    """``map_batches`` body (a Ray task; the index client travels in ``fn_kwargs``): one part per row."""
    rows = [topk_part(index, str(p), emb_uri, out_uri, int(i), k) for p, i in zip(batch["path"], batch["part"],
                                                                                  strict=True)]
    return {"rows": np.asarray(rows, np.int64)}


def search_topk(index: Any, emb_uri: str, out_uri: str, k: int, tasks: int = 2, num_cpus: float = 0.25) -> int:
    """Top-k of every query of an embedding table, written by Ray tasks (a part per query part); rows written."""
    import ray

    from raymine import parts

    files = parts.list_parquet(emb_uri)
    storage.delete_dir(out_uri)
    items = [{"path": f, "part": i} for i, f in enumerate(files)]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _topk_batch, fn_kwargs={"index": index, "emb_uri": emb_uri, "out_uri": out_uri, "k": k}, batch_size=1,
        batch_format="numpy", num_cpus=num_cpus, concurrency=max(1, min(tasks, len(items))))
    return sum(int(np.asarray(b["rows"]).sum()) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))


def read_run(topk_uri: str) -> dict[str, dict[str, float]]:
    """``{query: {doc: score}}`` from the top-k parts (test-split-sized: queries × k)."""
    t = _read_folder(topk_uri)
    run: dict[str, dict[str, float]] = {}
    for q, ids, sc in zip(t.column(QUERY_ID).to_pylist(), t.column(CANDIDATE_IDS).to_pylist(),
                          t.column(CANDIDATE_SCORES).to_pylist(), strict=True):
        run[q] = {d: float(x) for d, x in zip(ids, sc, strict=True) if d}
    return run


def _read_folder(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """A small folder table (test-split-sized) read whole."""
    import pyarrow.parquet as pq

    from raymine import parts

    fs, _ = storage.resolve(uri)
    tables = [pq.read_table(p, filesystem=fs, columns=list(columns) if columns else None)
              for p in parts.list_parquet(uri)]
    return pa.concat_tables(tables)


def subsample_ids(ids: Sequence[str], max_queries: int, seed: int) -> list[str]:
    """A seeded subset of ``max_queries`` ids (all of them when 0 or fewer): the rule of :func:`subsample_queries`."""
    if max_queries <= 0 or len(ids) <= max_queries:
        return list(ids)
    pool = np.array(sorted(ids), dtype=object)
    return sorted(np.random.default_rng(seed).choice(pool, size=max_queries, replace=False).tolist())


def evaluation_encoder(enc: TeacherConfig, cfg: EvaluateConfig) -> TeacherConfig:
    """The encoder as the evaluation runs it: L2-normalised (cosine, mteb's similarity for these models) in
    ``evaluate.dtype`` ('auto': bf16 where the device has it, fp32 on CPU)."""
    from dataclasses import replace

    return replace(enc, normalize=True, dtype=cfg.dtype)


@dataclass(frozen=True)
class SplitModel:
    """One model to evaluate on the run's split: its encoder, where its corpus vectors come from (a teacher's
    embed folder whose passage encoding is the model's own, or None: the pool encodes the corpus), and
    what its vectors depend on besides the config (e.g. the train stage's key)."""

    encoder: TeacherConfig
    corpus_from: str | None = None
    upstream: Any = None


def evaluate_split(cfg: Any, layout: Any, models: Mapping[str, SplitModel]) -> tuple[dict[str, dict[str, float]],
                                                                                      dict[str, Any]]:
    """``{model: {metric: value}}`` on the ingested test split (``layout.test_queries`` / ``test_qrels``) and
    the split's info. Per model: the test queries (and the corpus, unless a teacher's vectors are reused) are
    encoded by the embed actor pool (``raymine.embed.embed_tables``; resumable, ``evaluate.dtype``), the
    sharded exact index (``raymine.index.ShardedIndex``, Flat: the mining search's code and merge) writes each
    query's top-k (k = the deepest metric cut-off) as parts, and the metrics come from mteb's scoring of those
    lists against the qrels. The driver holds the split's queries, qrels and top-k lists only."""
    from dataclasses import replace

    from raymine import parts
    from raymine.embed import EmbedInput, embed_tables
    from raymine.index import ShardedIndex

    e, L = cfg.evaluate, layout
    if not storage.exists(L.test_queries):
        raise EvaluationError(f"{cfg.ingest.data} has no {cfg.ingest.test_split} split (qrels/"
                              f"{cfg.ingest.test_split}) in the ingested tables; give a BEIR folder with one")
    queries = _read_folder(L.test_queries, [QUERY_ID])
    available = queries.column(QUERY_ID).to_pylist()
    chosen = subsample_ids(available, e.max_queries, e.seed)
    if not chosen:
        raise EvaluationError(f"{L.test_queries}: no query with a relevant document in split {cfg.ingest.test_split!r}")
    qtable = L.test_queries
    if len(chosen) < len(available):  # a seeded subset: its own (test-sized) table, encoded alone
        full = _read_folder(L.test_queries)
        qtable = L.path("evaluate_embed", "queries_subset")
        storage.delete_dir(qtable)
        parts.write_part(full.filter(pc.is_in(full[QUERY_ID], value_set=pa.array(chosen, pa.string()))),
                         qtable, 0)
    qrels_t = _read_folder(L.test_qrels)
    wanted = set(chosen)
    qrels: dict[str, dict[str, int]] = {}
    for q, d, g in zip(qrels_t.column(QUERY_ID).to_pylist(), qrels_t.column(DOC_ID).to_pylist(),
                       qrels_t.column(SCORE).to_pylist(), strict=True):
        if q in wanted:
            qrels.setdefault(q, {})[d] = int(g)
    ks = metric_ks(e.metrics)
    n_docs = parts.num_rows(L.corpus)
    search = replace(cfg.search, index_factory="Flat")
    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for label, m in models.items():
        t0 = time.perf_counter()
        enc = evaluation_encoder(m.encoder, e)
        q_uri = L.evaluate_embed(label, "queries")
        inputs = [EmbedInput("query", qtable, QUERY_ID, TEXT, q_uri)]
        corpus_uri = m.corpus_from
        if corpus_uri is None:
            corpus_uri = L.evaluate_embed(label, "corpus")
            inputs.append(EmbedInput("passage", L.corpus, DOC_ID, PASSAGE, corpus_uri))
        embed_tables(enc, cfg.embed, inputs, L.evaluate_embed(label), [m.upstream, e.max_queries, e.seed])
        k = min(max(ks), n_docs)
        with ShardedIndex.from_parquet(corpus_uri, search) as index:
            search_topk(index, q_uri, L.evaluate_topk(label), k, search.search_tasks, search.num_cpus_per_task)
        run = read_run(L.evaluate_topk(label))
        results[label] = _pick(mteb_scores(run, qrels, ks), e.metrics, label)
        seconds[label] = round(time.perf_counter() - t0, 2)
        log.info("%s on the %s split (%d queries, top-%d of %d docs%s): %s (%.1f s)", label, cfg.ingest.test_split,
                 len(run), k, n_docs, ", corpus vectors reused" if m.corpus_from else "", _fmt(results[label]),
                 time.perf_counter() - t0)
    info = {"source": cfg.ingest.data, "split": cfg.ingest.test_split, "documents": n_docs, "queries": len(chosen),
            "queries_available": len(available), "qrels": sum(len(v) for v in qrels.values()),
            "subset": len(chosen) < len(available), "seed": e.seed, "top_k": min(max(ks), n_docs),
            "path": "embed actor pool, sharded exact search, mteb scoring", "seconds_per_model": seconds}
    return results, info


def evaluate_run(cfg: Any, layout: Any, models: Mapping[str, SplitModel], skipped: Mapping[str, int] | None = None
                 ) -> dict[str, dict[str, dict[str, float]]]:
    """The pipeline's evaluate stage: ``evaluate.tasks`` entry ``local`` = the run's ingested test split
    through :func:`evaluate_split`; any other entry (MTEB task name, folder) through mteb. Writes the report
    files under ``layout.evaluate``; returns ``{task: {model: {metric}}}``."""
    e = cfg.evaluate
    t0 = time.perf_counter()
    results: dict[str, dict[str, dict[str, float]]] = {}
    tasks: dict[str, Any] = {}
    timings: dict[str, float] = {}
    version = "unknown"
    if LOCAL in e.tasks:
        name = os.path.basename(os.path.normpath(cfg.ingest.data.split("://", 1)[-1])) or LOCAL
        results[name], tasks[name] = evaluate_split(cfg, layout, models)
        tasks[name]["skipped"] = {k: v for k, v in (skipped or {}).items() if v}
        timings.update(tasks[name].pop("seconds_per_model"))
        version = getattr(_import_mteb(), "__version__", "unknown")
    others = tuple(t for t in e.tasks if t != LOCAL)
    if others:
        from dataclasses import replace

        more, infos, more_t, version = _mteb_results({k: m.encoder for k, m in models.items()},
                                                     replace(e, tasks=others), cfg.ingest.data, layout.evaluate,
                                                     embed_cfg=cfg.embed)  # encoded by the embed actor pool
        results.update(more)
        tasks.update(infos)
        timings = {k: round(timings.get(k, 0.0) + v, 2) for k, v in more_t.items()}
    write_report(layout.evaluate, results, tasks, {k: m.encoder for k, m in models.items()}, e, timings,
                 time.perf_counter() - t0, version)
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
