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
    """The student as an encoder config (for evaluation): pooling and prompts as in training; lengths from
    ``evaluate.*_max_length`` (0 = the training lengths)."""
    t, e = cfg.train, cfg.evaluate
    return TeacherConfig(
        model=model or t.model, pooling=t.pooling, normalize=t.normalize, query_prompt=t.query_prompt,
        passage_prompt=t.passage_prompt, query_max_length=e.query_max_length or t.query_max_length,
        passage_max_length=e.passage_max_length or t.passage_max_length, batch_size=e.batch_size,
    )


def run_pipeline(cfg: Config, stages: Sequence[str] = STAGES) -> dict[str, Any]:
    """Run the stages up to the last one selected; each stage skips itself when already done.

    Returns the report (also written to ``OUTPUT/report.json`` and ``report.md``).
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise PipelineError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    upto = max(STAGES.index(s) for s in stages)
    t0 = time.time()
    storage.makedirs(cfg.output)
    run = _Run(cfg, _Chain(cfg.output))
    steps = (run.embed, run.search, run.mine, run.train, run.evaluate)
    run.ingest()
    for step in steps[: upto + 1]:
        step()
    return _finish(run.report, cfg.output, t0)


class _Run:
    """One pipeline run: the stage steps in order, sharing paths and chained keys."""

    def __init__(self, cfg: Config, chain: _Chain):
        self.cfg, self.chain, self.out = cfg, chain, cfg.output
        self.report: dict[str, Any] = {"config": to_dict(cfg), "config_hash": config_hash(cfg), "stages": {}}
        self.keys: dict[str, str] = {}
        d = lambda *p: storage.join(self.out, *p)  # noqa: E731
        self.ingest_dir, self.mine_dir, self.mined_uri = d("ingest"), d("mine"), d("mined")
        self.export_dir, self.model_dir, self.eval_dir = d("exports"), d("model"), d("evaluate")
        self.corpus_uri = d("ingest", "corpus.parquet")
        self.queries_uri = d("ingest", "train_queries.parquet")
        self.st_uri = d("exports", "sentence_transformers.parquet")

    def _emb(self, teacher: str, side: str) -> str:
        return storage.join(self.out, "embed", teacher, side)

    # ---- ingest -------------------------------------------------------------------------------
    def ingest(self) -> None:
        from raymine.ingest import ingest_stage

        self.keys["ingest"] = self.chain.enter("ingest", self.ingest_dir, self.cfg.ingest)
        self.report["stages"]["ingest"] = ingest_stage(self.cfg.ingest, self.ingest_dir)

    # ---- embed: dense teachers, corpus and queries --------------------------------------------
    def embed(self) -> None:
        import ray.data

        from raymine.embed import embed_stage

        for name in self.cfg.teachers:
            t = self.cfg.teacher(name)
            if t.kind != "dense":
                continue
            key = self.chain.enter(f"embed:{name}", storage.join(self.out, "embed", name), t, self.cfg.embed,
                                   self.keys["ingest"])
            self.keys[f"embed:{name}"] = key
            corpus = ray.data.read_parquet(self.corpus_uri).map_batches(_passage_batch, batch_format="pyarrow")
            queries = ray.data.read_parquet(self.queries_uri).select_columns([C.QUERY_ID, C.TEXT])
            self.report["stages"][f"embed:{name}"] = {
                "corpus": embed_stage(corpus, C.DOC_ID, C.TEXT, t, self.cfg.embed, "passage",
                                      self._emb(name, "corpus"), input_key=key),
                "queries": embed_stage(queries, C.QUERY_ID, C.TEXT, t, self.cfg.embed, "query",
                                       self._emb(name, "queries"), input_key=key),
            }

    # ---- search: every teacher, with the mining method's per-query ceiling --------------------
    def search(self) -> None:
        from raymine.filters import required_depth, score_ceiling
        from raymine.index import ShardedIndex
        from raymine.search import bm25_search_stage, search_stage

        cfg = self.cfg

        def depth_fn(num_excluded: int) -> int:
            return cfg.search.depth or required_depth(cfg.mine, num_excluded) + cfg.search.depth_slack

        def ceiling_fn(pos_scores):
            return score_ceiling(cfg.mine, pos_scores)

        ceiling = ceiling_fn if cfg.search.use_ceiling else None
        positives = self._positives_for_search()
        for name in cfg.teachers:
            t = cfg.teacher(name)
            sdir = storage.join(self.out, "search", name)
            key = self.chain.enter(f"search:{name}", sdir, cfg.search, cfg.mine, t,
                                   self.keys.get(f"embed:{name}", self.keys["ingest"]))
            self.keys[f"search:{name}"] = key
            if t.kind == "dense":
                with ShardedIndex.from_parquet(self._emb(name, "corpus"), cfg.search) as index:
                    m = search_stage(self._emb(name, "queries"), positives, index, depth_fn, ceiling, cfg.search,
                                     sdir, name, key_extra=key)
            else:
                corpus = _with_passage_text(_read_table(self.corpus_uri))
                m = bm25_search_stage(positives.select([C.QUERY_ID, C.TEXT]), corpus, positives, t, depth_fn,
                                      ceiling, cfg.search, sdir, name, key_extra=key)
            self.report["stages"][f"search:{name}"] = m

    def _positives_for_search(self):
        """The training queries' positives; in analysis mode with a share of them hidden from the teachers."""
        table = _read_table(self.queries_uri)
        frac = self.cfg.mine.hide_positive_fraction
        if frac > 0:
            table, n_hidden = _hide_positives(table, frac, self.cfg.mine.seed)
            self.report["analysis"] = {"hidden_positives": n_hidden, "hide_positive_fraction": frac}
        return table

    # ---- mine + exports -------------------------------------------------------------------------
    def mine(self) -> None:
        from raymine.mine import export_flagembedding, export_sentence_transformers, mine_stage

        cfg = self.cfg
        self.chain.enter("mine", self.mine_dir, cfg.mine, cfg.teachers, [self.keys[f"search:{n}"] for n in cfg.teachers])
        full = _positive_lists(_read_table(self.queries_uri)) if cfg.mine.hide_positive_fraction > 0 else None
        candidates = {n: storage.join(self.out, "search", n) for n in cfg.teachers}
        mined = mine_stage(candidates, self.queries_uri, cfg.mine, self.mine_dir, mined_uri=self.mined_uri,
                           full_positives=full)
        self.report["stages"]["mine"] = mined
        # exports follow the mining run they were made from
        self.keys["export"] = key = storage.stage_key("export", mined["key"], mined["finished_at"])
        done = storage.completed(self.export_dir, key)
        if done is None:
            storage.delete_dir(self.export_dir)
            run = storage.StageRun(self.export_dir, "export", key)
            run.counts = {
                "sentence_transformers": export_sentence_transformers(self.mined_uri, self.corpus_uri, self.st_uri,
                                                                      cfg.mine.num_negatives),
                "flagembedding": export_flagembedding(self.mined_uri, self.corpus_uri,
                                                      storage.join(self.export_dir, "flagembedding.jsonl")),
            }
            done = run.finish()
        self.report["stages"]["export"] = done

    # ---- train ----------------------------------------------------------------------------------
    def train(self) -> None:
        from raymine.train import train_stage

        cfg = self.cfg
        self.keys["train"] = key = self.chain.enter("train", self.model_dir, cfg.train, self.keys["export"])
        done = storage.completed(self.model_dir, key)
        if done is None:
            run = storage.StageRun(self.model_dir, "train", key, config=to_dict(cfg.train))
            # the run name carries the key: a re-run of the same config resumes from its checkpoint
            result = train_stage(self.st_uri, cfg.train, self.model_dir, run_name=f"train-{key}",
                                 storage_path=_abs(storage.join(self.out, "train_checkpoints")))
            run.counts = {k: v for k, v in result.items() if k != "losses"}
            done = run.finish(losses=result.get("losses"))
        self.report["stages"]["train"] = done

    # ---- evaluate -------------------------------------------------------------------------------
    def evaluate(self) -> None:
        from raymine.evaluate import evaluate_models

        cfg = self.cfg
        key = self.chain.enter("evaluate", self.eval_dir, cfg.evaluate, cfg.ingest.data, self.keys["train"])
        done = storage.completed(self.eval_dir, key)
        if done is None:
            run = storage.StageRun(self.eval_dir, "evaluate", key, config=to_dict(cfg.evaluate))
            models = {"before": student_encoder(cfg), "after": student_encoder(cfg, model=_abs(self.model_dir))}
            cache = self._teacher_passages(models["before"])
            results = evaluate_models(models, cfg.evaluate, cfg.ingest.data, self.eval_dir,
                                      passage_cache={"before": cache} if cache else None)
            done = run.finish(results=results)
        self.report["stages"]["evaluate"] = done
        self.report["evaluate"] = _flatten_eval(done["results"])

    def _teacher_passages(self, student: TeacherConfig) -> dict[str, Any] | None:
        """{passage text: embedding} from a dense teacher whose passage encoding equals the untrained
        student's (the default run: MiniLM is teacher and student), so "before" needs no corpus pass."""
        from raymine.embed import read_embeddings
        from raymine.encoders import resolve_model_path

        same = ("pooling", "normalize", "passage_prompt", "passage_max_length", "dtype", "trust_remote_code")
        for name in self.cfg.teachers:
            t = self.cfg.teacher(name)
            if (t.kind == "dense" and t.storage_dtype == "float32"
                    and resolve_model_path(t.model) == resolve_model_path(student.model)
                    and all(getattr(t, f) == getattr(student, f) for f in same)
                    and storage.exists(storage.join(self._emb(name, "corpus"), storage.MANIFEST))):
                ids, emb = read_embeddings(self._emb(name, "corpus"), C.DOC_ID)  # [n], [n, dim]
                texts = dict(zip(*(_with_passage_text(_read_table(self.corpus_uri)).column(c).to_pylist()
                                   for c in (C.DOC_ID, C.TEXT)), strict=True))
                log.info("evaluate: the untrained student's passages come from teacher %r's embeddings", name)
                return {texts[i]: e for i, e in zip(ids, emb, strict=True)}
        return None


def _finish(report: dict[str, Any], out: str, t0: float) -> dict[str, Any]:
    report["wall_s"] = round(time.time() - t0, 1)
    storage.write_json(storage.join(out, "report.json"), report)
    storage.write_bytes(storage.join(out, "report.md"), render_report(report).encode())
    return report


# ------------------------------------------------------------------------------------------------
def _read_table(uri: str):
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs)


def _abs(uri: str) -> str:
    import os

    return uri if "://" in uri else os.path.abspath(uri)


def _passage_batch(batch):
    """Ray Data step: TEXT := passage text (title + text), the string teachers and students see."""
    return _with_passage_text(batch).select([C.DOC_ID, C.TEXT])


def _with_passage_text(table):
    import pyarrow as pa

    from raymine.ingest import passage_text

    texts = [passage_text(t, x) for t, x in zip(table.column(C.TITLE).to_pylist(), table.column(C.TEXT).to_pylist(), strict=True)]
    return table.set_column(table.schema.get_field_index(C.TEXT), C.TEXT, pa.array(texts, pa.string()))


def _positive_lists(table) -> dict[str, list[str]]:
    return dict(zip(table.column(C.QUERY_ID).to_pylist(), table.column(C.POSITIVE_IDS).to_pylist(), strict=True))


def _hide_positives(table, fraction: float, seed: int):
    """The positives table with ``fraction`` of multi-positive queries' positives hidden (mine.hide_positives)."""
    import pyarrow as pa

    from raymine.mine import hide_positives

    full = _positive_lists(table)
    flat = pa.table({C.QUERY_ID: [q for q, ps in full.items() for _ in ps],
                     C.DOC_ID: [d for ps in full.values() for d in ps]})
    visible, hidden = hide_positives(flat, fraction, seed)
    keep: dict[str, list[str]] = {}
    for q, d in zip(visible.column(C.QUERY_ID).to_pylist(), visible.column(C.DOC_ID).to_pylist(), strict=True):
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
    mine = (report["stages"].get("mine") or {}).get("report")
    if mine:
        lines += ["", f"## Mining: {mine.get('method')}, ensemble {mine.get('ensemble')}", "",
                  "| teacher | queries | candidates seen | dropped: positive | dropped: identical text | "
                  "dropped: method | above ceiling (in search) | requested | delivered | shortfall | known FN |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, t in mine.get("per_teacher", {}).items():
            lines.append(f"| {name} | {t.get('present')} | {t.get('seen')} | {t.get('drop_positive')} | "
                         f"{t.get('drop_excluded')} | {t.get('drop_method')} | {t.get('above_ceiling')} | "
                         f"{t.get('requested')} | {t.get('delivered')} | {100 * t.get('shortfall', 0):.2f}% | "
                         f"{t.get('known_fn')} |")
        tot = mine.get("totals", {})
        lines.append(f"| **after ensembling** | {tot.get('queries_out')} | | | | | | {tot.get('requested')} | "
                     f"{tot.get('delivered')} | {100 * tot.get('shortfall', 0):.2f}% | {tot.get('known_fn')} |")
    ev = report.get("evaluate")
    if ev:
        lines += ["", "## Evaluation", "", "| model | task | nDCG@10 | recall@100 | MRR@10 |", "|---|---|---:|---:|---:|"]
        for model, entry in sorted(ev.items(), key=lambda kv: kv[0] != "before"):
            for task, m in entry["tasks"].items():
                lines.append(f"| {model} | {task} | {m.get('ndcg_at_10', float('nan')):.4f} | "
                                 f"{m.get('recall_at_100', float('nan')):.4f} | {m.get('mrr_at_10', float('nan')):.4f} |")
    return "\n".join(lines) + "\n"
