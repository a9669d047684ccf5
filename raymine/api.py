"""The Python API: sentence-transformers' ``mine_hard_negatives`` call, run on raymine's distributed stages.

    import raymine
    mined = raymine.mine_hard_negatives(dataset, model="sentence-transformers/all-MiniLM-L6-v2",
                                        relative_margin=0.05, num_negatives=4)
    train_dataset = mined.to_hf()          # datasets.Dataset, sentence-transformers columns

Every call builds a :class:`~raymine.config.Config` and runs :func:`raymine.pipeline.run_pipeline` (the stages
the CLI runs; nothing is computed here). Pairs input is converted by :mod:`raymine.pairs` and then ingested
with the BEIR rules. ``raymine.train`` / ``raymine.evaluate`` are the same with the later stages.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from raymine import storage
from raymine.config import Config, MineConfig, SearchConfig, TeacherConfig, config_hash, load_config, to_dict
from raymine.errors import UserError

log = logging.getLogger(__name__)

#: sentence-transformers' ``output_format`` → raymine's export layout.
OUTPUT_FORMATS = {"triplet": "st_triplet", "n-tuple": "st_ntuple", "labeled-pair": "st_labeled_pair",
                  "labeled-list": "st_labeled_list"}
_ST_MODULES = {"Transformer", "Pooling", "Normalize"}
_POOLING = {"mean": "mean", "cls": "cls", "lasttoken": "last_token"}
_POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                  "pooling_mode_lasttoken": "lasttoken"}  # sentence-transformers' 1_Pooling/config.json


class ApiError(UserError, ValueError):
    """An argument of the Python API that cannot be used; the message names it."""


# ------------------------------------------------------------------------------------------------
# The result
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MinedDataset:
    """The mined rows of one call, in sentence-transformers' ``output_format`` (files under ``path``).

    ``ray``: a Ray Dataset of those rows (streamed from Parquet); ``to_hf()`` / ``to_pandas()`` /
    ``to_arrow()`` load them in this process; ``mined``: raymine's own table (ids, all scores, teacher,
    method); ``exports``: every export layout written (format → folder); ``report``: counts and the reasons
    queries were dropped. Row order is not the input order (sentence-transformers trainers shuffle anyway).
    """

    path: str
    output_format: str
    report: dict[str, Any]
    exports: dict[str, str]
    rename: dict[str, str]
    schema: Any = None  # pyarrow schema of the layout (before renaming): the rows when none qualified

    @property
    def rows_path(self) -> str:
        return self.exports[OUTPUT_FORMATS[self.output_format]]

    @property
    def ray(self):
        from raymine import parts

        if storage.exists(self.rows_path) and parts.list_parquet(self.rows_path):
            names = parts.schema(self.rows_path).names
            return parts.read_dataset(self.rows_path).rename_columns(
                {c: self.rename[c] for c in names if c in self.rename})
        import ray.data

        return ray.data.from_arrow(self.to_arrow())

    @property
    def mined(self):
        from raymine import parts

        return parts.read_dataset(storage.join(self.path, "mined"))

    def to_arrow(self):
        import pyarrow.dataset as pads

        from raymine import parts

        if storage.exists(self.rows_path) and parts.list_parquet(self.rows_path):
            fs, path = storage.resolve(self.rows_path)
            table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
        else:  # no row qualified: an empty table of the layout
            table = self.schema.empty_table()
        return table.rename_columns([self.rename.get(c, c) for c in table.column_names])

    def to_pandas(self):
        return self.to_arrow().to_pandas()

    def to_hf(self):
        """A ``datasets.Dataset`` (in memory), as sentence-transformers' ``mine_hard_negatives`` returns."""
        import datasets

        return datasets.Dataset(self.to_arrow())

    def __len__(self) -> int:
        return self.to_arrow().num_rows


# ------------------------------------------------------------------------------------------------
# mine_hard_negatives
# ------------------------------------------------------------------------------------------------
def mine_hard_negatives(
    dataset: Any,
    corpus: Any = None,
    *,
    model: Any = None,
    anchor_column_name: str | None = None,
    positive_column_name: str | None = None,
    num_negatives: int = 3,
    range_min: int = 0,
    range_max: int | None = None,
    max_score: float | None = None,
    relative_margin: float | None = None,
    absolute_margin: float | None = None,
    sampling_strategy: Literal["top", "random"] = "top",
    output_format: Literal["triplet", "n-tuple", "labeled-pair", "labeled-list"] = "triplet",
    output_scores: bool = False,
    query_prompt: str | None = None,
    corpus_prompt: str | None = None,
    id_column_name: str | None = None,
    method: str | None = None,
    teachers: Sequence[str] | Mapping[str, TeacherConfig] | None = None,
    config: Config | str | Path | None = None,
    exports: Sequence[str] = (),
    work_dir: str | None = None,
    ray_address: str | None = None,
) -> MinedDataset:
    """Add hard negatives to (anchor, positive) pairs, as ``sentence_transformers.util.mine_hard_negatives``
    does, on raymine's distributed stages (ingest → embed → sharded exact search → mine → export).

    ``dataset``: a ``datasets.Dataset``, a pandas DataFrame, a Ray Dataset, or a path / URI of jsonl or
    Parquet pairs, of an HF dataset folder (``save_to_disk``), ``hf://NAME[:SPLIT]``, or of a BEIR folder
    (corpus / queries / qrels; then the column arguments do not apply). ``corpus``: extra candidate passages
    (a list of texts, or a table with ``text`` [+ ``title``]); the positives are always candidates too.

    Arguments with sentence-transformers' names mean what they mean there:

    - ``anchor_column_name`` / ``positive_column_name``: default the first / second column (an
      ``id_column_name``, raymine's, is left out of that choice). A name that is not a column is an error
      (sentence-transformers silently falls back to the first / second column).
    - Several positives of one anchor: rows with the same anchor text are one query; every positive is
      excluded from its negatives, and the margins compare against the **minimum** positive score of the
      query (both libraries). Identical positive texts are one passage.
    - ``relative_margin`` r: keep a candidate when ``score <= pos - |pos| * r`` (raymine's ``percpos`` with
      perc = 1 - r, whose sign-safe ceiling is the same formula; it keeps ``score < ceiling``, so a score
      exactly on the ceiling — a float tie — is dropped here and kept there). ``absolute_margin`` m: keep
      ``score <= pos - m`` (``marginpos``). ``max_score``: keep ``score <= max_score`` (``abs``). raymine
      applies one rule per run: set at most one of the three, and none together with ``range_min``.
    - ``range_min``: skip the first ``range_min`` candidates left after removing the positives (``shifted``).
    - ``range_max``: the candidates are the ``range_max + P`` best-scored passages (P = the most positives
      of one query), as there. ``None`` (default): **no fixed window** — exact search applies the margin
      inside the search, so a query whose allowed negatives lie deeper than sentence-transformers' derived
      window still gets them; where that window holds ``num_negatives`` of them they are the same ones.
    - ``sampling_strategy``: "top" = the best ``num_negatives``; "random" = ``num_negatives`` drawn
      uniformly from the first ``range_max - range_min`` kept candidates (``range_max`` derived as there
      when None), seeded by ``mine.seed`` and the query id, returned best first.
    - ``output_format`` / ``output_scores``: the same columns — the anchor and positive columns keep the
      input's names; "negative", "negative_1".., "label"/"score", "labels"/"scores". A query left without
      any negative gives no rows in any format (there, "labeled-pair" still lists its positives).
    - ``query_prompt`` / ``corpus_prompt``: text prepended when encoding queries / passages.

    ``model``: a model name or folder (encoded like sentence-transformers: its pooling, max length and prompts
    read from the folder), a ``SentenceTransformer`` (the same, from the instance; its weights are read from
    the folder it was loaded from, so save a model you changed in memory first), ``"bm25"``, or a
    :class:`~raymine.config.TeacherConfig`. Default: all-MiniLM-L6-v2. Embeddings are L2-normalised (cosine).
    raymine's own options keep their names: ``method`` (naive / shifted / abs / marginpos / percpos, with
    the parameters in ``config.mine``; instead of the sentence-transformers filter arguments), ``teachers``
    (names in ``config.teacher_defs``, or a name → TeacherConfig mapping; an ensemble, instead of ``model``),
    ``config`` (a Config or YAML path: every other knob — actors, shards, index, ensembling, seed). The
    arguments above always win over ``config``; with no filter argument and no ``method``, the method is
    naive top-k (sentence-transformers' default) or ``config.mine.method`` when a config is given.
    Unlike sentence-transformers, raymine also drops candidates whose normalised text equals a positive's
    (``mine.exclude_identical_text``), and every query is mined (no validation hold-out).
    ``exports``: more raymine layouts to write (``"flagembedding"``, ``"nemo"``, ``"st_ntuple"``...).

    Work folder: ``work_dir``, else ``$RAYMINE_CACHE/<key>`` (default ``~/.cache/raymine/<key>``), the key a
    hash of the inputs' fingerprint and the config, so a repeated call finds its stages done and resumes an
    interrupted one. Ray: a Ray the caller initialised (e.g. in a notebook) is used and left running;
    otherwise ``raycluster.init_ray(ray_address)`` attaches or starts one and leaves it running for the next
    call (``ray.shutdown()`` ends it). Errors in the input raise :class:`~raymine.errors.UserError`.
    """
    fmt = _choice("output_format", output_format, tuple(OUTPUT_FORMATS))
    _choice("sampling_strategy", sampling_strategy, ("top", "random"))
    unknown = [e for e in exports if e not in _export_formats()]
    if unknown:
        raise ApiError(f"exports: {unknown} are not raymine export formats; choose from {list(_export_formats())}")
    base = _base_config(config)
    names, defs = _teachers(model, teachers, base, query_prompt, corpus_prompt, config is not None)
    mine, search = st_mine_settings(
        base.mine, base.search, num_negatives=num_negatives, range_min=range_min, range_max=range_max,
        max_score=max_score, relative_margin=relative_margin, absolute_margin=absolute_margin,
        sampling_strategy=sampling_strategy, method=method, keep_method=config is not None)
    export = replace(base.export, formats=tuple(dict.fromkeys((OUTPUT_FORMATS[fmt], *exports))),
                     st_scores=output_scores, num_negatives=0, score_teacher="")
    cfg = replace(base, teachers=names, teacher_defs=defs, mine=mine, search=search, export=export,
                  validation=replace(base.validation, split="none"))
    _ensure_ray(ray_address)
    data = _Data.of(dataset, corpus, anchor_column_name, positive_column_name, id_column_name)
    work = work_dir or _cache_dir(data, cfg, range_max)
    cfg = data.into(cfg, work)
    if range_max is not None or sampling_strategy == "random":  # the window counts the most positives of a query
        _run(cfg, ("embed",))
        mine, search = st_mine_settings(
            base.mine, base.search, num_negatives=num_negatives, range_min=range_min, range_max=range_max,
            max_score=max_score, relative_margin=relative_margin, absolute_margin=absolute_margin,
            sampling_strategy=sampling_strategy, method=method, keep_method=config is not None,
            max_positives=_max_positives(cfg))
        cfg = replace(cfg, mine=mine, search=search)
    report = _run(cfg, ("mine",))
    return _result(cfg, report, fmt, data.rename(fmt))


def st_mine_settings(mine: MineConfig, search: SearchConfig, *, num_negatives: int, range_min: int = 0,
                     range_max: int | None = None, max_score: float | None = None,
                     relative_margin: float | None = None, absolute_margin: float | None = None,
                     sampling_strategy: str = "top", method: str | None = None, keep_method: bool = False,
                     max_positives: int | None = None) -> tuple[MineConfig, SearchConfig]:
    """sentence-transformers' mining arguments as raymine's mine and search configs (see
    :func:`mine_hard_negatives`). ``max_positives`` (the most positives of one query) is needed for
    ``range_max`` and for "random" sampling; without it those parts are left at a placeholder."""
    if not isinstance(num_negatives, int) or num_negatives < 1:
        raise ApiError(f"num_negatives must be at least 1, got {num_negatives!r}")
    if range_min < 0:
        raise ApiError(f"range_min must be non-negative, got range_min={range_min}")
    filters = {k: v for k, v in (("relative_margin", relative_margin), ("absolute_margin", absolute_margin),
                                 ("max_score", max_score)) if v is not None}
    m = replace(mine, num_negatives=num_negatives)
    if method is not None:
        if filters or range_min:
            raise ApiError(f"method={method!r} is raymine's own filter; leave {sorted(filters) or ['range_min']} "
                           f"unset (or use them instead of method)")
        m = replace(m, method=_choice("method", method, ("naive", "shifted", "abs", "marginpos", "percpos")))
    elif len(filters) > 1 or (filters and range_min):
        given = sorted(filters) + (["range_min"] if range_min else [])
        raise ApiError(f"{' and '.join(given)}: raymine applies one filter rule per run; set only one of them")
    elif "relative_margin" in filters:
        if not 0 <= relative_margin < 1:
            raise ApiError(f"relative_margin must be in [0, 1), got {relative_margin}")
        m = replace(m, method="percpos", perc=1.0 - relative_margin, pos_reduce="min")
    elif "absolute_margin" in filters:
        if absolute_margin < 0:
            raise ApiError(f"absolute_margin must be >= 0, got {absolute_margin}")
        m = replace(m, method="marginpos", margin=float(absolute_margin), pos_reduce="min")
    elif "max_score" in filters:
        m = replace(m, method="abs", abs_threshold=float(max_score))
    elif range_min:
        m = replace(m, method="shifted", shift=range_min)
    elif not keep_method:
        m = replace(m, method="naive")
    p = max_positives if max_positives is not None else 1
    window = range_max
    if window is None:  # sentence-transformers' derived range_max
        window = range_min + (10 * num_negatives if filters else num_negatives) + p
    if range_min >= window:
        raise ApiError(f"range_min must be smaller than range_max, got range_min={range_min}, range_max={window}")
    if num_negatives > window - range_min:
        raise ApiError(f"cannot mine {num_negatives} negatives per query: only {window - range_min} candidates "
                       f"remain after skipping range_min={range_min} of range_max={window}")
    m = replace(m, sampling="top") if sampling_strategy == "top" else replace(
        m, sampling="sampled", sample_top_k=window - range_min, sample_weighting="uniform")
    s = search
    if range_max is not None:  # the window of raw ranks, positives included, as there
        s = replace(search, use_ceiling=False, depth=range_max + p)
    return m, s


# ------------------------------------------------------------------------------------------------
# train / evaluate
# ------------------------------------------------------------------------------------------------
def train(config: Config | str | Path | None = None, data: Any = None, *, output: str | None = None,
          overrides: Sequence[str] = (), anchor_column_name: str | None = None,
          positive_column_name: str | None = None, id_column_name: str | None = None, corpus: Any = None,
          ray_address: str | None = None) -> dict[str, Any]:
    """Mine and fine-tune the student (stages up to ``train``), as ``raymine run --stages train``; returns the
    run report. ``data``: anything :func:`mine_hard_negatives` takes (default: ``config.ingest.data``);
    ``output``: the run folder (default ``config.output``); ``overrides``: ``key=value`` strings. The
    trained model is ``<output>/model``. Ray is used or started as in :func:`mine_hard_negatives`."""
    return _stages(("train",), config, data, output, overrides, anchor_column_name, positive_column_name,
                   id_column_name, corpus, ray_address)


def evaluate(config: Config | str | Path | None = None, data: Any = None, *, output: str | None = None,
             overrides: Sequence[str] = (), anchor_column_name: str | None = None,
             positive_column_name: str | None = None, id_column_name: str | None = None, corpus: Any = None,
             ray_address: str | None = None) -> dict[str, Any]:
    """All stages through ``evaluate`` (nDCG@10 before / after training, in ``report["evaluate"]``), as
    ``raymine run``. Data without a test split (pairs) skips evaluation: ``report["evaluate_skipped"]`` says
    why. Arguments as :func:`train`."""
    return _stages(("evaluate",), config, data, output, overrides, anchor_column_name, positive_column_name,
                   id_column_name, corpus, ray_address)


def _stages(stages: tuple[str, ...], config: Any, data: Any, output: str | None, overrides: Sequence[str],
            anchor: str | None, positive: str | None, id_column: str | None, corpus: Any,
            ray_address: str | None) -> dict[str, Any]:
    cfg = _base_config(config, overrides)
    if output:
        cfg = replace(cfg, output=str(output))
    _ensure_ray(ray_address)
    if data is not None:
        cfg = _Data.of(data, corpus, anchor, positive, id_column).into(cfg, cfg.output)
    return _run(cfg, stages)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ApiError(f"{name}: {value!r} is not one of {list(allowed)}")
    return value


def _export_formats() -> tuple[str, ...]:
    import typing

    from raymine.config import ExportFormat

    return typing.get_args(ExportFormat)


def _base_config(config: Any, overrides: Sequence[str] = ()) -> Config:
    if isinstance(config, Config):
        if not overrides:
            return config
        from raymine.config import apply_overrides, from_dict

        return from_dict(apply_overrides(to_dict(config), list(overrides)))
    if config is None or isinstance(config, (str, Path)):
        return load_config(config, list(overrides))
    raise ApiError(f"config: expected a raymine.Config or a YAML path, got {type(config).__name__}")


def _teachers(model: Any, teachers: Any, base: Config, query_prompt: str | None, corpus_prompt: str | None,
              config_given: bool) -> tuple[tuple[str, ...], dict[str, TeacherConfig]]:
    """(teacher names, definitions) from ``model`` (one teacher), ``teachers`` (raymine's ensemble), else the
    given config's teachers, else all-MiniLM-L6-v2."""
    if model is not None and teachers is not None:
        raise ApiError("give model (one teacher) or teachers (raymine's ensemble), not both")
    if teachers is not None:
        if isinstance(teachers, Mapping):
            return tuple(teachers), dict(teachers)
        names = tuple(teachers)
        missing = [n for n in names if n not in base.teacher_defs]
        if missing:
            raise ApiError(f"teachers: {missing} not in config.teacher_defs {sorted(base.teacher_defs)}")
        return names, dict(base.teacher_defs)
    if model is None and config_given:
        return base.teachers, dict(base.teacher_defs)
    t = teacher_from_model(model if model is not None else "sentence-transformers/all-MiniLM-L6-v2")
    if t.kind != "bm25":
        t = replace(t, normalize=True, **{k: v for k, v in (("query_prompt", query_prompt),
                                                              ("passage_prompt", corpus_prompt)) if v is not None})
    name = "bm25" if t.kind == "bm25" else "model"
    return (name,), {name: t}


def teacher_from_model(model: Any) -> TeacherConfig:
    """A TeacherConfig encoding like the sentence-transformers model ``model`` (name, folder or instance):
    its pooling, max sequence length and query / document prompts; ``"bm25"`` → the BM25 teacher."""
    if isinstance(model, TeacherConfig):
        return model
    if isinstance(model, str) and model.lower() == "bm25":
        return TeacherConfig(kind="bm25")
    if isinstance(model, (str, Path)):
        return _from_st_folder(str(model))
    if type(model).__name__ == "SentenceTransformer":
        return _from_st_instance(model)
    raise ApiError(f"model: expected a model name or folder, a SentenceTransformer, 'bm25' or a TeacherConfig, "
                   f"got {type(model).__name__}")


def _from_st_instance(model: Any) -> TeacherConfig:
    kinds = [type(m).__name__ for m in model]
    if set(kinds) - _ST_MODULES or kinds[:1] != ["Transformer"]:
        raise ApiError(f"model: modules {kinds}; raymine encodes Transformer + Pooling (+ Normalize) models only")
    path = model[0].auto_model.config._name_or_path
    pooling = getattr(model[1], "pooling_mode", "mean") if len(kinds) > 1 and kinds[1] == "Pooling" else "cls"
    if pooling not in _POOLING:
        raise ApiError(f"model: pooling {pooling!r}; raymine pools with {sorted(_POOLING)}")
    n = int(model.max_seq_length)
    prompts = dict(getattr(model, "prompts", {}) or {})
    return TeacherConfig(model=path, pooling=_POOLING[pooling], normalize=True, query_max_length=n,
                         passage_max_length=n, query_prompt=prompts.get("query", ""),
                         passage_prompt=next((prompts[k] for k in ("document", "passage", "corpus") if k in prompts), ""))


def _from_st_folder(name: str) -> TeacherConfig:
    """Pooling, max length and prompts from a sentence-transformers folder's files (TeacherConfig's defaults
    where the folder has none, e.g. a hub name or a plain transformers folder)."""
    from raymine.model import resolve_model_path

    folder = Path(resolve_model_path(name))
    kw: dict[str, Any] = {"model": name}
    if (folder / "sentence_bert_config.json").is_file():
        n = json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length")
        if n:
            kw.update(query_max_length=int(n), passage_max_length=int(n))
    pool = folder / "1_Pooling" / "config.json"
    if pool.is_file():
        p = json.loads(pool.read_text())
        mode = p.get("pooling_mode")
        if not mode:  # older files: one boolean flag per mode
            flags = [k for k, v in p.items() if k.startswith("pooling_mode_") and v is True]
            mode = _POOLING_FLAGS.get(flags[0], flags[0]) if flags else "mean"
        if mode not in _POOLING:
            raise ApiError(f"model {name}: pooling {mode!r}; raymine pools with {sorted(_POOLING)}")
        kw["pooling"] = _POOLING[mode]
    st = folder / "config_sentence_transformers.json"
    if st.is_file():
        prompts = json.loads(st.read_text()).get("prompts") or {}
        kw["query_prompt"] = prompts.get("query", "")
        kw["passage_prompt"] = next((prompts[k] for k in ("document", "passage", "corpus") if k in prompts), "")
    return TeacherConfig(**kw)


def _ensure_ray(address: str | None) -> None:
    """Use a Ray the caller initialised (left running); else attach / start one and leave it running."""
    import ray

    if ray.is_initialized():
        return
    from raymine.raycluster import init_ray

    init_ray(address)


@dataclass(frozen=True)
class _Data:
    """The data argument: a BEIR folder (read as is) or pairs (converted by raymine.pairs into the run)."""

    beir: str | None
    pairs: Any  # raymine.pairs.PairsInput
    corpus: Any
    key: str

    @classmethod
    def of(cls, data: Any, corpus: Any, anchor: str | None, positive: str | None, id_column: str | None) -> _Data:
        from raymine import pairs
        from raymine.ingest import table_files

        beir = pairs.is_path(data) and not str(data).startswith("hf://") and storage.exists(str(data))
        if beir and table_files(str(data), "corpus") and table_files(str(data), "queries"):
            if corpus is not None:
                raise ApiError("corpus: a BEIR folder brings its own corpus; leave corpus unset")
            return cls(str(data), None, None, storage.fingerprint(str(data)))
        p = pairs.PairsInput.of(data, anchor, positive, id_column)
        extra = None if corpus is None else pairs.fingerprint(corpus)
        return cls(None, p, corpus, storage.stage_key(dataclasses.asdict(p.columns), p.fingerprint, extra))

    def into(self, cfg: Config, work: str) -> Config:
        """``cfg`` reading this data; pairs are converted under ``work/pairs`` first (skipped when done)."""
        if self.beir is not None:
            return replace(cfg, output=work, ingest=replace(cfg.ingest, data=self.beir, format="beir"))
        from raymine.pairs import convert_pairs

        out = storage.join(work, "pairs")
        convert_pairs(self.pairs, out, self.corpus, cfg.ingest.train_split)
        return replace(cfg, output=work, ingest=replace(cfg.ingest, data=out, format="beir"))

    def rename(self, fmt: str) -> dict[str, str]:
        """raymine's sentence-transformers column names → the input's anchor / positive column names."""
        if self.pairs is None:
            return {}
        a, p = self.pairs.columns.anchor, self.pairs.columns.positive
        return {"anchor": a, "positive": p, "document": p, "documents": p}


def _cache_dir(data: _Data, cfg: Config, *extra: Any) -> str:
    root = os.environ.get("RAYMINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "raymine")
    key = storage.stage_key("api", data.key, config_hash(replace(cfg, output="")), *extra)
    return storage.join(root, key)


def _run(cfg: Config, stages: tuple[str, ...]) -> dict[str, Any]:
    """run_pipeline; a user error that Ray wrapped is raised as itself (one message, no Ray report)."""
    from raymine.cli import find_user_error
    from raymine.pipeline import run_pipeline

    try:
        return run_pipeline(cfg, stages)
    except Exception as exc:
        user = find_user_error(exc)
        if user is None or user is exc:
            raise
        raise user.with_traceback(None) from None


def _max_positives(cfg: Config) -> int:
    """The most positives of one ingested training query (one number per Parquet part comes back)."""
    import pyarrow.compute as pc

    from raymine import columns as C
    from raymine import parts
    from raymine.layout import Layout

    def most(batch):
        import pyarrow as pa

        n = pc.max(pc.list_value_length(batch[C.POSITIVE_IDS])).as_py() if batch.num_rows else 0
        return pa.table({"n": [n or 0]})

    rows = parts.read_dataset(Layout(cfg.output).train_queries, [C.POSITIVE_IDS]).map_batches(
        most, batch_format="pyarrow").take_all()
    return max([int(r["n"]) for r in rows] or [1])


def _result(cfg: Config, report: dict[str, Any], fmt: str, rename: dict[str, str]) -> MinedDataset:
    stages = report["stages"]
    mine = stages.get("mine") or {}
    export = stages.get("export") or {}
    ecounts = export.get("counts") or {}
    summary = {
        "counts": {"pairs": (stages.get("ingest") or {}).get("counts", {}), "mine": mine.get("counts", {}),
                   "export": {k: v for k, v in ecounts.items() if k != "formats"}},
        "dropped_reasons": (mine.get("report") or {}).get("dropped_reasons", {}),
        "formats": ecounts.get("formats", {}),
        "run": report,
    }
    from raymine.export import ExportPlan, format_schema

    exports = {f: storage.join(cfg.output, "exports", f) for f in cfg.export.formats}
    schema = format_schema(OUTPUT_FORMATS[fmt], ExportPlan.from_config(cfg))
    return MinedDataset(path=cfg.output, output_format=fmt, report=summary, exports=exports, rename=rename,
                        schema=schema)
