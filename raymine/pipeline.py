"""The end-to-end run: ingest → embed → search → mine → export → train → evaluate.

The orchestrator wires stages; it does not compute. Every stage reads its inputs from the run's
:class:`~raymine.layout.Layout`, writes under it, and returns its manifest; its key chains its own config
with the keys of the stages it reads, and ``storage.begin`` applies the one skip / clear / resume rule
(same key and intact parts → skipped; same key, unfinished → resumed per part where the stage can;
another key → cleared and re-run). The driver holds counts and manifests only, never a per-passage or
per-query object. One live run owns the output folder (``storage.RunLock``).

Layout of ``OUTPUT``: see :mod:`raymine.layout`.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from raymine import columns as C
from raymine import storage
from raymine.config import Config, TeacherConfig, config_hash, to_dict
from raymine.errors import UserError, in_stage
from raymine.layout import Layout

log = logging.getLogger(__name__)

STAGES = ("embed", "search", "mine", "train", "evaluate")


class PipelineError(UserError):
    """A stage cannot run (e.g. its input from an earlier stage is missing or empty)."""


def student_encoder(cfg: Config, model: str | None = None) -> TeacherConfig:
    """The student as an encoder config (for evaluation): pooling, prompts and attention as in training;
    lengths from ``evaluate.*_max_length`` (0 = the training lengths)."""
    t, e = cfg.train, cfg.evaluate
    return TeacherConfig(
        model=model or t.model, pooling=t.pooling, normalize=t.normalize, query_prompt=t.query_prompt,
        passage_prompt=t.passage_prompt, mask_leading_special=t.mask_leading_special,
        query_max_length=e.query_max_length or t.query_max_length,
        passage_max_length=e.passage_max_length or t.passage_max_length, batch_size=e.batch_size,
        **({"bidirectional": t.bidirectional} if "bidirectional" in TeacherConfig.__dataclass_fields__ else {}),
    )


def run_pipeline(cfg: Config, stages: Sequence[str] = STAGES) -> dict[str, Any]:
    """Run the stages up to the last one selected; each stage skips itself when already done.

    Returns the report (also written to ``OUTPUT/report.json`` and ``report.md``).
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise PipelineError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    upto = max(STAGES.index(s) for s in stages)
    cfg = absolute_paths(cfg)
    t0 = time.time()
    from raymine.served import probe_teachers

    with in_stage("embed"):
        probe_teachers(cfg, Layout(cfg.output))  # a served teacher that does not answer ends the run before any work
    storage.makedirs(cfg.output)
    with storage.RunLock(cfg.output):
        run = _Run(cfg, Layout(cfg.output))
        steps = (("ingest", run.ingest), ("embed", run.embed), ("search", run.search), ("mine", run.mine),
                 ("train", run.train), ("evaluate", run.evaluate))
        for name, step in steps[: upto + 2]:
            with in_stage(name):
                step()
        return _finish(run.report, cfg.output, t0)


class _Run:
    """One pipeline run: the stage steps in order, sharing the layout and the chained keys."""

    def __init__(self, cfg: Config, layout: Layout):
        self.cfg, self.layout = cfg, layout
        self.report: dict[str, Any] = {"config": to_dict(cfg), "config_hash": config_hash(cfg), "stages": {}}
        self.keys: dict[str, str] = {}

    def _done(self, name: str, manifest: dict[str, Any]) -> dict[str, Any]:
        self.keys[name] = manifest["key"]
        self.report["stages"][name] = manifest
        return manifest

    # ---- ingest -------------------------------------------------------------------------------
    def ingest(self) -> None:
        from raymine.ingest import ingest_stage

        self._done("ingest", ingest_stage(self.cfg.ingest, self.layout))

    # ---- embed: one actor pool per dense teacher, passages and queries in one pass ----------------
    def embed(self) -> None:
        from raymine.embed import EmbedInput, embed_tables

        L = self.layout
        for name in self.cfg.teachers:
            t = self.cfg.teacher(name)
            if t.kind == "bm25":  # dense and served (openai) teachers are embedded here
                continue
            inputs = [EmbedInput("passage", L.corpus, C.DOC_ID, C.PASSAGE, L.embed(name, "corpus")),
                      EmbedInput("query", L.train_queries, C.QUERY_ID, C.TEXT, L.embed(name, "queries"))]
            self._done(f"embed:{name}", embed_tables(t, self.cfg.embed, inputs, L.embed(name), self.keys["ingest"]))

    # ---- search: every teacher, with the mining method's per-query ceiling --------------------
    def search(self) -> None:
        from raymine.search import SearchSpec, open_index, search_teacher, stage_key

        cfg, L = self.cfg, self.layout
        for name in cfg.teachers:
            t = cfg.teacher(name)
            dense = t.kind != "bm25"  # vectors from the embed stage (in-process or served)
            spec = SearchSpec(teacher=name, queries_uri=L.train_queries,
                              query_emb_uri=L.embed(name, "queries") if dense else None, out_uri=L.search(name),
                              mine=cfg.mine, search=cfg.search, rows_per_piece=cfg.embed.rows_per_block)
            upstream = [to_dict(t), self.keys.get(f"embed:{name}", self.keys["ingest"])]
            done = storage.completed(L.search(name), stage_key(spec, upstream))
            if done is None:  # only a stage with work to do starts the shard actors
                with open_index(t, cfg.search, L.corpus, L.embed(name, "corpus") if dense else None) as index:
                    done = search_teacher(index, spec, upstream, dense)
            self._done(f"search:{name}", done)
        if cfg.mine.hide_positive_fraction > 0:
            first = self.report["stages"][f"search:{cfg.teachers[0]}"]["counts"]
            self.report["analysis"] = {"hidden_positives": first.get("hidden_positives", 0),
                                       "hide_positive_fraction": cfg.mine.hide_positive_fraction}

    # ---- mine + exports -------------------------------------------------------------------------
    def mine(self) -> None:
        from raymine.export import export_stage
        from raymine.mine import mine_stage
        from raymine.validation import validation_stage

        cfg, L = self.cfg, self.layout
        candidates = {n: L.search(n) for n in cfg.teachers}
        full = L.train_queries if cfg.mine.hide_positive_fraction > 0 else None
        upstream = [self.keys[f"search:{n}"] for n in cfg.teachers]
        # the validation split first: a slice of the training queries is held out of mining by id
        val = self._done("validation", validation_stage(cfg, L, [self.keys["ingest"], *upstream]))
        holdout = (cfg.validation.seed, float(val["share"])) if val.get("mode") == "train_slice" else None
        mined = mine_stage(candidates, L.train_queries, cfg.mine, L.mine, mined_uri=L.mined, full_positives=full,
                           upstream=upstream, holdout=holdout)
        self._done("mine", mined)
        if not mined["counts"].get("mined"):
            reasons = (mined.get("report") or {}).get("dropped_reasons")
            log.warning("mine: every query was dropped (%s); the exports are empty and there is nothing to train on",
                        reasons)
        self._done("export", export_stage(cfg, L))

    # ---- train ----------------------------------------------------------------------------------
    def train(self) -> None:
        from raymine.train import train_stage

        cfg, L = self.cfg, self.layout
        mined = self.report["stages"]["mine"]
        if not mined["counts"].get("mined"):
            reasons = (mined.get("report") or {}).get("dropped_reasons") or {}
            raise PipelineError(
                f"train: no training rows — every one of the {sum(reasons.values())} queries was dropped in mining "
                f"({', '.join(f'{k}: {v}' for k, v in reasons.items()) or 'no reasons recorded'}); see "
                f"{mined.get('dropped') or L.mine} and loosen mine.* (method, thresholds) or check the teachers")
        val = self.report["stages"]["validation"]
        vkeys = ("every", "patience", "batch_size")
        key = storage.stage_key("train", to_dict(cfg.train), self.keys["mine"], self.keys["validation"],
                                {k: getattr(cfg.validation, k) for k in vkeys})
        done, run = storage.begin(L.model, "train", key, config=to_dict(cfg.train), resume=True)
        if run is None:
            self._done("train", done)
            return
        # the run name carries the key: a re-run of the same config resumes from its checkpoint
        tcfg = cfg.train
        if "://" not in tcfg.model and os.path.exists(tcfg.model):  # a local student (stage 2): absolute for workers
            tcfg = replace(tcfg, model=os.path.abspath(tcfg.model))
        validation = None
        if val.get("mode") in ("dev", "train_slice") and val["counts"].get("queries"):
            enc = student_encoder(cfg)
            validation = {"folder": _abs(val["folder"]), "base_score": val.get("base_score"),
                          "max_lengths": {"query": enc.query_max_length, "passage": enc.passage_max_length},
                          **{k: getattr(cfg.validation, k) for k in vkeys}}
        result = train_stage(L.mined, L.corpus, tcfg, L.model, run_name=f"train-{key}",
                             storage_path=_abs(L.train_checkpoints), mine_cfg=cfg.mine, validation=validation)
        run.counts = {k: v for k, v in result.items()
                      if k not in ("losses", "lrs", "validation", "val_steps", "val_scores")}
        self._done("train", run.finish(losses=result.get("losses"), lrs=result.get("lrs"),
                                       validation=result.get("validation")))

    # ---- evaluate: the ingested test split, distributed (embed pool, sharded exact search, mteb scoring) --
    def evaluate(self) -> None:
        from raymine.evaluate import SplitModel, evaluate_run

        cfg, L = self.cfg, self.layout
        missing = _missing_test_split(cfg)
        if missing:  # pairs input has no test split: nothing to evaluate on
            log.warning("evaluate: skipped, %s", missing)
            self.report["stages"]["evaluate"] = {"stage": "evaluate", "skipped": missing}
            self.report["evaluate_skipped"] = missing
            return
        encoders = {"before": student_encoder(cfg), "after": student_encoder(cfg, model=_abs(L.model))}
        train_key = {"before": None, "after": self.keys["train"]}  # "after" is the model the train stage wrote
        models = {label: SplitModel(enc, self._corpus_source(label, enc), [self.keys["ingest"], train_key[label]])
                  for label, enc in encoders.items()}
        key = storage.stage_key("evaluate", to_dict(cfg.evaluate), [to_dict(m) for m in encoders.values()],
                                cfg.ingest.data, cfg.ingest.test_split, self.keys["ingest"], self.keys["train"])
        done, run = storage.begin(L.evaluate, "evaluate", key, config=to_dict(cfg.evaluate))
        if run is None:
            self._done("evaluate", done)
        else:
            counts = self.report["stages"]["ingest"].get("counts", {})
            skipped = {k: counts.get(f"test_{k}", 0) for k in ("queries_without_positive", "queries_not_in_split")}
            results = evaluate_run(cfg, L, models, skipped)
            self._done("evaluate", run.finish(results=results))
        self.report["evaluate"] = _flatten_eval(self.report["stages"]["evaluate"]["results"])

    def _corpus_source(self, label: str, enc: TeacherConfig) -> str | None:
        """A dense teacher's corpus embeddings when they are the model's own passage vectors as the evaluation
        encodes them (same model and passage encoding, float32 storage): reused as they are, no corpus pass.
        None: the embed actor pool encodes the corpus for this model."""
        from raymine.encoders import resolve_model_path
        from raymine.evaluate import LOCAL, evaluation_encoder

        if LOCAL not in self.cfg.evaluate.tasks:
            return None
        enc = evaluation_encoder(enc, self.cfg.evaluate)
        same = ("pooling", "normalize", "passage_prompt", "passage_max_length", "dtype", "quantize",
                "trust_remote_code", "mask_leading_special")
        for name in self.cfg.teachers:
            t = self.cfg.teacher(name)
            if (t.kind == "dense" and t.storage_dtype == "float32" and f"embed:{name}" in self.keys
                    and resolve_model_path(t.model) == resolve_model_path(enc.model)
                    and all(getattr(t, f) == getattr(enc, f) for f in same)):
                log.info("evaluate: %s passages come from teacher %r's embeddings", label, name)
                return self.layout.embed(name, "corpus")
        return None


def _missing_test_split(cfg: Config) -> str | None:
    """Why the evaluate stage has nothing to run (its only task is the data's own test split and the data has
    none, e.g. pairs input), else None."""
    from raymine.ingest import table_files

    e = cfg.evaluate
    if "local" in e.tasks and e.split != cfg.ingest.test_split:
        raise PipelineError(f"evaluate.split={e.split!r} but ingest.test_split={cfg.ingest.test_split!r}: the "
                            f"'local' task evaluates the split written at ingest; set ingest.test_split={e.split}")
    if tuple(e.tasks) != ("local",):
        return None
    if table_files(cfg.ingest.data, "qrels", e.split):
        return None
    return (f"{cfg.ingest.data} has no {e.split} split (qrels/{e.split}); give a BEIR folder with one, or "
            f"evaluate.tasks=<MTEB task names>")


def _abs(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def absolute_paths(cfg: Config) -> Config:
    """The config with its local paths made absolute against the driver's working dir: the output, the data,
    a pairs corpus, and model folders that exist here. Ray workers do not share the driver's working dir when
    the job attaches to a running cluster (``ray start --head`` elsewhere): a relative ``runs/x`` would be
    written under each worker's own dir and never found by the driver."""
    def local_model(m: str) -> str:
        return os.path.abspath(m) if m and "://" not in m and os.path.exists(m) else m

    ingest = replace(cfg.ingest, data=_abs(cfg.ingest.data),
                     corpus=_abs(cfg.ingest.corpus) if cfg.ingest.corpus else cfg.ingest.corpus)
    teachers = {n: replace(t, model=local_model(t.model)) for n, t in cfg.teacher_defs.items()}
    return replace(cfg, output=_abs(cfg.output), ingest=ingest, teacher_defs=teachers,
                   train=replace(cfg.train, model=local_model(cfg.train.model)))


def _finish(report: dict[str, Any], out: str, t0: float) -> dict[str, Any]:
    report["wall_s"] = round(time.time() - t0, 1)
    storage.write_json(storage.join(out, "report.json"), report)
    storage.write_bytes(storage.join(out, "report.md"), render_report(report, out).encode())
    return report


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


def render_report(report: dict[str, Any], out: str | None = None) -> str:
    """report.md: stage wall times and counts, mining drops/shortfall, the figures inline (score histograms,
    loss curve, evaluation; only those present under ``out``), nDCG@10 before/after."""
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
    val = (report["stages"].get("train") or {}).get("validation")
    vstage = report["stages"].get("validation") or {}
    if val:
        c = vstage.get("counts") or {}
        lines += ["", f"## Validation ({vstage.get('mode')}: {c.get('queries')} queries, pool of {c.get('pool')} "
                      "passages; model selection, never the test split)", "",
                  "| step | " + " | ".join(str(s) for s in val["steps"]) + " |",
                  "|---|" + "---:|" * len(val["steps"]),
                  "| nDCG@10 | " + " | ".join(f"{100 * v:.2f}" for v in val["scores"]) + " |", "",
                  f"Kept step **{val['kept_step']}** (nDCG@10 {100 * val['kept_score']:.2f}); last step "
                  f"{val['last_step']}: {100 * val['last_score']:.2f}."
                  + (" **The base model scored best: the saved model is the base model.**" if val["base_kept"] else "")]
    recalls = [(n.split(":", 1)[1], m["index"]["factory"], m["recall"]) for n, m in report["stages"].items()
               if n.startswith("search:") and isinstance(m, dict) and m.get("recall")]
    if recalls:
        lines += ["", "## Approximate search recall against exact search", "", "| teacher | index | recall |",
                  "|---|---|---|"]
        lines += [f"| {t} | {f} | {', '.join(f'{k} {v:.3f}' for k, v in r.items())} |" for t, f, r in recalls]
    figures = [(title, rel) for title, rel in (
        ("Teacher scores of positives, kept and dropped candidates", "mine/scores.png"),
        ("Training loss and learning rate", "model/loss_curve.png"),
        ("Evaluation before / after training", "evaluate/evaluation.png"),
    ) if out is None or storage.exists(storage.join(out, rel))]
    if figures:
        lines += ["", "## Figures", ""]
        for title, rel in figures:
            lines += [f"**{title}**", "", f"![{title}]({rel})", ""]
    if report.get("evaluate_skipped"):
        lines += ["", f"Evaluation skipped: {report['evaluate_skipped']}."]
    ev = report.get("evaluate")
    if ev:
        lines += ["", "## Evaluation", "", "| model | task | nDCG@10 | recall@100 | MRR@10 |", "|---|---|---:|---:|---:|"]
        for model, entry in sorted(ev.items(), key=lambda kv: kv[0] != "before"):
            for task, m in entry["tasks"].items():
                lines.append(f"| {model} | {task} | {m.get('ndcg_at_10', float('nan')):.4f} | "
                                 f"{m.get('recall_at_100', float('nan')):.4f} | {m.get('mrr_at_10', float('nan')):.4f} |")
    return "\n".join(lines) + "\n"
