"""The end-to-end run: ingest → embed → search → mine → export → train → evaluate.

Every stage writes under ``cfg.output`` with a manifest; a re-run with the same config skips finished
stages, a killed training resumes from its last checkpoint, and changing one stage's config re-runs
that stage and everything after it (each stage's key chains the keys of the stages it reads; when a
stage's chained key changes its folder is cleared before it runs).

Layout of ``OUTPUT``::

    ingest/            corpus.parquet, train_queries.parquet, train_dropped.parquet
    embed/<teacher>/   corpus/, queries/ (dense teachers only)
    search/<teacher>/  candidates Parquet (one row per query)
    mine/              mining manifest, report.json, scores.png, dropped.parquet
    mined/             mined negatives (Parquet)
    exports/           sentence_transformers.parquet, flagembedding.jsonl
    model/             the trained student (transformers + sentence-transformers folder)
    evaluate/          evaluation.json / .md / .png
    report.json, report.md
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from raymine import columns as C
from raymine import storage
from raymine.config import Config, TeacherConfig, config_hash, to_dict

log = logging.getLogger(__name__)

STAGES = ("embed", "search", "mine", "train", "evaluate")
PIPELINE_STATE = "_pipeline.json"


class PipelineError(RuntimeError):
    """A stage cannot run (e.g. its input from an earlier stage is missing)."""


class _Chain:
    """Chained stage keys, remembered in OUTPUT/_pipeline.json: a stage whose key changed is cleared."""

    def __init__(self, output: str):
        self.uri = storage.join(output, PIPELINE_STATE)
        self.state: dict[str, str] = storage.read_json(self.uri) if storage.exists(self.uri) else {}

    def enter(self, stage: str, stage_dir: str, *parts: Any) -> str:
        key = storage.stage_key(stage, *parts)
        if self.state.get(stage) not in (None, key):
            log.info("%s: config or input changed, re-running (clearing %s)", stage, stage_dir)
            storage.delete_dir(stage_dir)
        self.state[stage] = key
        storage.write_json(self.uri, self.state)
        return key


def student_encoder(cfg: Config, model: str | None = None) -> TeacherConfig:
    """The student as an encoder config (for evaluation): same pooling, prompts and lengths as training."""
    t = cfg.train
    return TeacherConfig(
        model=model or t.model, pooling=t.pooling, normalize=t.normalize, query_prompt=t.query_prompt,
        passage_prompt=t.passage_prompt, query_max_length=t.query_max_length,
        passage_max_length=t.passage_max_length, batch_size=cfg.evaluate.batch_size,
    )


def run_pipeline(cfg: Config, stages: Sequence[str] = STAGES) -> dict[str, Any]:
    """Run the selected stages (and every earlier stage whose output is missing). Returns the report."""
    import pyarrow.parquet as pq
    import ray.data

    from raymine.embed import embed_stage
    from raymine.filters import required_depth, score_ceiling
    from raymine.ingest import ingest_stage
    from raymine.search import ShardedIndex, bm25_search_stage, search_stage

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    t0 = time.time()
    out = cfg.output
    storage.makedirs(out)
    chain = _Chain(out)
    report: dict[str, Any] = {"config": to_dict(cfg), "config_hash": config_hash(cfg), "stages": {}}

    # ---- ingest (always; skipped when done) -------------------------------------------------------
    ingest_dir = storage.join(out, "ingest")
    k_ingest = chain.enter("ingest", ingest_dir, cfg.ingest)
    report["stages"]["ingest"] = ingest_stage(cfg.ingest, ingest_dir)
    corpus_uri = storage.join(ingest_dir, "corpus.parquet")
    queries_uri = storage.join(ingest_dir, "train_queries.parquet")

    # ---- embed (dense teachers) -----------------------------------------------------------------
    want = set(stages)
    emb: dict[str, dict[str, str]] = {}
    k_embed: dict[str, str] = {}
    for name in cfg.teachers:
        t = cfg.teacher(name)
        if t.kind != "dense":
            continue
        tdir = storage.join(out, "embed", name)
        k_embed[name] = chain.enter(f"embed:{name}", tdir, t, cfg.embed, k_ingest)
        emb[name] = {"corpus": storage.join(tdir, "corpus"), "queries": storage.join(tdir, "queries")}
        if "embed" in want or not (_done(emb[name]["corpus"]) and _done(emb[name]["queries"])):
            corpus_ds = ray.data.read_parquet(corpus_uri)
            corpus_ds = corpus_ds.map_batches(_passage_batch, batch_format="pyarrow")
            m1 = embed_stage(corpus_ds, C.DOC_ID, C.TEXT, t, cfg.embed, "passage", emb[name]["corpus"],
                             input_key=k_embed[name])
            q_ds = ray.data.read_parquet(queries_uri).select_columns([C.QUERY_ID, C.TEXT])
            m2 = embed_stage(q_ds, C.QUERY_ID, C.TEXT, t, cfg.embed, "query", emb[name]["queries"],
                             input_key=k_embed[name])
            report["stages"][f"embed:{name}"] = {"corpus": m1, "queries": m2}

    # ---- search (every teacher) -------------------------------------------------------------------
    cand: dict[str, str] = {}
    k_search: dict[str, str] = {}

    def depth_fn(num_excluded: int) -> int:
        return cfg.search.depth or required_depth(cfg.mine, num_excluded) + cfg.search.depth_slack

    def ceiling_fn(pos_scores):
        return score_ceiling(cfg.mine, pos_scores)

    use_ceiling = ceiling_fn if cfg.search.use_ceiling else None
    fs, path = storage.resolve(queries_uri)
    positives = full_positives = pq.read_table(path, filesystem=fs)
    if cfg.mine.hide_positive_fraction > 0:
        # analysis mode: teachers see only the visible positives; mining reports how many of its
        # negatives the full qrels call relevant (the known-false-negative rate)
        positives, n_hidden = _hide_positives(full_positives, cfg.mine.hide_positive_fraction, cfg.mine.seed)
        report["analysis"] = {"hidden_positives": n_hidden, "hide_positive_fraction": cfg.mine.hide_positive_fraction}
    for name in cfg.teachers:
        t = cfg.teacher(name)
        sdir = storage.join(out, "search", name)
        k_search[name] = chain.enter(f"search:{name}", sdir, cfg.search, cfg.mine, t, k_embed.get(name, k_ingest))
        cand[name] = sdir
        if "search" not in want and _done(sdir):
            continue
        if t.kind == "dense":
            index = ShardedIndex.from_parquet(emb[name]["corpus"], cfg.search)
            try:
                m = search_stage(emb[name]["queries"], positives, index, depth_fn, use_ceiling, cfg.search, sdir,
                                 name, key_extra=k_search[name])
            finally:
                index.close()
        else:
            corpus = pq.read_table(storage.resolve(corpus_uri)[1], filesystem=storage.resolve(corpus_uri)[0])
            corpus = _with_passage_text(corpus)
            m = bm25_search_stage(positives.select([C.QUERY_ID, C.TEXT]), corpus, positives, t, depth_fn,
                                  use_ceiling, cfg.search, sdir, name, key_extra=k_search[name])
        report["stages"][f"search:{name}"] = m

    # ---- mine + exports ---------------------------------------------------------------------------
    from raymine.mine import export_flagembedding, export_sentence_transformers, mine_stage

    mine_dir = storage.join(out, "mine")
    mined_uri = storage.join(out, "mined")
    chain.enter("mine", mine_dir, cfg.mine, cfg.teachers, [k_search[n] for n in cfg.teachers])
    export_dir = storage.join(out, "exports")
    st_uri = storage.join(export_dir, "sentence_transformers.parquet")
    if "mine" in want or not _done(mine_dir):
        report["stages"]["mine"] = mine_stage(
            {n: cand[n] for n in cfg.teachers}, queries_uri, cfg.mine, mine_dir, mined_uri=mined_uri,
            full_positives=_positive_lists(full_positives) if cfg.mine.hide_positive_fraction > 0 else None)
    mined_manifest = storage.read_json(storage.join(mine_dir, storage.MANIFEST))
    k_export = storage.stage_key("export", mined_manifest["key"], mined_manifest["finished_at"])
    done = storage.completed(export_dir, k_export)
    if done is None:
        storage.delete_dir(export_dir)
        run = storage.StageRun(export_dir, "export", k_export)
        run.counts = {
            "sentence_transformers": export_sentence_transformers(mined_uri, corpus_uri, st_uri,
                                                                  cfg.mine.num_negatives),
            "flagembedding": export_flagembedding(mined_uri, corpus_uri,
                                                  storage.join(export_dir, "flagembedding.jsonl")),
        }
        done = run.finish()
    report["stages"]["export"] = done

    # ---- train --------------------------------------------------------------------------------------
    model_dir = storage.join(out, "model")
    k_train = chain.enter("train", model_dir, cfg.train, k_export)
    if "train" in want or not _done(model_dir):
        from raymine.train import train_stage

        done = storage.completed(model_dir, k_train)
        if done is None:
            run = storage.StageRun(model_dir, "train", k_train, config=to_dict(cfg.train))
            result = train_stage(st_uri, cfg.train, model_dir, run_name=f"train-{k_train}",
                                 storage_path=_abs(storage.join(out, "train_checkpoints")))
            run.counts = {k: v for k, v in result.items() if k not in ("losses",)}
            done = run.finish(losses=result.get("losses"))
        report["stages"]["train"] = done

    # ---- evaluate -----------------------------------------------------------------------------------
    if "evaluate" in want:
        from raymine.evaluate import evaluate_models

        eval_dir = storage.join(out, "evaluate")
        k_eval = chain.enter("evaluate", eval_dir, cfg.evaluate, cfg.ingest.data, k_train)
        done = storage.completed(eval_dir, k_eval)
        if done is None:
            models = {"before": student_encoder(cfg)}
            if _done(model_dir):
                models["after"] = student_encoder(cfg, model=_abs(model_dir))
            run = storage.StageRun(eval_dir, "evaluate", k_eval, config=to_dict(cfg.evaluate))
            results = evaluate_models(models, cfg.evaluate, cfg.ingest.data, eval_dir)
            done = run.finish(results=results)
        report["stages"]["evaluate"] = done
        report["evaluate"] = _flatten_eval(done["results"])

    report["wall_s"] = round(time.time() - t0, 1)
    storage.write_json(storage.join(out, "report.json"), report)
    storage.write_bytes(storage.join(out, "report.md"), render_report(report).encode())
    return report


# ------------------------------------------------------------------------------------------------
def _done(stage_dir: str) -> bool:
    return storage.exists(storage.join(stage_dir, storage.MANIFEST))


def _abs(uri: str) -> str:
    import os

    return uri if "://" in uri else os.path.abspath(uri)


def _passage_batch(batch):
    """Ray Data step: TEXT := passage text (title + text), the string teachers and students see."""
    return _with_passage_text(batch).select([C.DOC_ID, C.TEXT])


def _with_passage_text(table):
    import pyarrow as pa

    from raymine.ingest import passage_text

    texts = [passage_text(t, x) for t, x in zip(table.column(C.TITLE).to_pylist(), table.column(C.TEXT).to_pylist())]
    return table.set_column(table.schema.get_field_index(C.TEXT), C.TEXT, pa.array(texts, pa.string()))


def _positive_lists(table) -> dict[str, list[str]]:
    return dict(zip(table.column(C.QUERY_ID).to_pylist(), table.column(C.POSITIVE_IDS).to_pylist()))


def _hide_positives(table, fraction: float, seed: int):
    """The positives table with ``fraction`` of multi-positive queries' positives hidden (mine.hide_positives)."""
    import pyarrow as pa

    from raymine.mine import hide_positives

    full = _positive_lists(table)
    flat = pa.table({C.QUERY_ID: [q for q, ps in full.items() for _ in ps],
                     C.DOC_ID: [d for ps in full.values() for d in ps]})
    visible, hidden = hide_positives(flat, fraction, seed)
    keep: dict[str, list[str]] = {}
    for q, d in zip(visible.column(C.QUERY_ID).to_pylist(), visible.column(C.DOC_ID).to_pylist()):
        keep.setdefault(q, []).append(d)
    col = pa.array([keep.get(q, []) for q in table.column(C.QUERY_ID).to_pylist()], pa.list_(pa.string()))
    return table.set_column(table.schema.get_field_index(C.POSITIVE_IDS), C.POSITIVE_IDS, col), hidden.num_rows


def _flatten_eval(results: dict[str, Any]) -> dict[str, Any]:
    """{task: {model: {metric}}} → {model: {metric of the first task..., "tasks": {task: {metric}}}},
    so ``evaluate.before.ndcg_at_10`` reads directly and every task stays available."""
    flat: dict[str, Any] = {}
    for i, (task, per_model) in enumerate(results.items()):
        for model, metrics in per_model.items():
            entry = flat.setdefault(model, {"tasks": {}})
            entry["tasks"][task] = metrics
            if i == 0:
                entry.update(metrics)
    return flat


def render_report(report: dict[str, Any]) -> str:
    """report.md: stage wall times and counts, mining drops/shortfall, nDCG@10 before/after."""
    lines = ["# raymine run report", "", f"config hash `{report['config_hash']}`, wall {report.get('wall_s')} s", "",
             "| stage | wall s | counts |", "|---|---:|---|"]
    for name, m in report["stages"].items():
        items = m.values() if isinstance(m, dict) and "wall_s" not in m else [m]
        for sub in items:
            if isinstance(sub, dict) and "wall_s" in sub:
                counts = ", ".join(f"{k}={v}" for k, v in list((sub.get("counts") or {}).items())[:12])
                lines.append(f"| {sub.get('stage', name)} | {sub['wall_s']} | {counts} |")
    ev = report.get("evaluate")
    if ev:
        lines += ["", "## Evaluation", "", "| model | task | nDCG@10 | recall@100 | MRR@10 |", "|---|---|---:|---:|---:|"]
        for model, entry in sorted(ev.items(), key=lambda kv: kv[0] != "before"):
            for task, m in entry["tasks"].items():
                lines.append(f"| {model} | {task} | {m.get('ndcg_at_10', float('nan')):.4f} | "
                                 f"{m.get('recall_at_100', float('nan')):.4f} | {m.get('mrr_at_10', float('nan')):.4f} |")
    return "\n".join(lines) + "\n"
