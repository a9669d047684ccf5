"""Both 7B recipe files run end to end on the CPU with tiny random models of the same classes substituted
for the 7B ones: an e5-mistral-class teacher (MistralModel, SentencePiece-style tokenizer, last-token
pooling with EOS appended, its instruction prompt) mines with TopK-PercPos 0.95 / top-1 + sampled, and a
bidirectional Mistral student trains with FSDP + LoRA + gradient checkpointing on 2 CPU workers; stage 2
mines and trains 5 hard negatives, without in-batch negatives, starting from stage 1's output model. Every
stage of both runs. The fast tests check each shipped value against the sentence of the paper or model card
that states it (quoted with its source), not one recipe file against the other."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_BEIR, build_tiny_decoder, build_tiny_sp_mistral

from raymine.config import load_config
from raymine.pipeline import STAGES, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = ROOT / "configs" / "nv_retriever_v1_mistral7b.yaml"
STAGE2 = ROOT / "configs" / "nv_retriever_v1_mistral7b_stage2.yaml"


def _tiny(teacher: str, student: str, output: Path) -> list[str]:
    """Overrides that shrink a recipe to the CPU: tiny models, short lengths, 1 actor, 2 workers, 2 steps.
    The recipe's methods (teacher pooling/EOS/prompts, mining, LoRA, FSDP, bidirectional) stay as shipped."""
    return [
        f"output={output}", f"ingest.data={TINY_BEIR}", "ingest.train_split=test",
        f"teacher_defs.e5_mistral.model={teacher}", "teacher_defs.e5_mistral.dtype=float32",
        "teacher_defs.e5_mistral.query_max_length=32", "teacher_defs.e5_mistral.passage_max_length=48",
        "teacher_defs.e5_mistral.batch_size=8",
        "embed.num_actors=1", "embed.num_gpus_per_actor=0", "embed.num_cpus_per_actor=0.5",
        "search.num_shards=2", "search.num_gpus_per_shard=0", "search.num_cpus_per_shard=0.25",
        f"train.model={student}", "train.use_gpu=false", "train.num_workers=2", "train.cpus_per_worker=0.5",
        "train.dtype=float32", "train.batch_size=2", "train.grad_accum=1", "train.warmup_steps=0",
        "train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1",
        "train.query_max_length=32", "train.passage_max_length=48", "evaluate.batch_size=8",
    ]


# --- what the recipes must say, and where it is written -----------------------------------------------
# Each claim: (source, the sentence quoted verbatim, what it pins in both recipe files). Quotes were read in
# the sources named; where the NV-Retriever paper's own text of its NV-Retriever-v1 section could not be
# retrieved here, the value is listed under UNSOURCED with that said, not with an invented quote.
CARD = "NV-Retriever-v1 model card, 'How to use' (https://huggingface.co/nvidia/NV-Retriever-v1)"
NV_EMBED = "NV-Embed paper, arXiv 2405.17428v3"  # the two-stage recipe NV-Retriever-v1 follows
SUMMARY = ("third-party summary of arXiv 2407.15831, https://api.emergentmind.com/topics/nv-retriever-v1-model "
           "(secondary: the paper's own sentence was not retrievable here)")


def _both(check):
    return lambda s1, s2: all(check(c) for c in (s1, s2))


CLAIMS = [
    (CARD, "It is required to set trust_remote_code=True when loading the model, as it contains a custom module "
           "for bidirectional attention and applying the masked mean_pooling.",
     _both(lambda c: c.train.bidirectional and c.train.pooling == "mean")),
    (CARD, "document_prefix = 'passage: ' ... documents = [f\"{document_prefix} {document}\" for document in documents]",
     # the f-string puts a second space after the prefix; raymine prepends the prompt as written
     _both(lambda c: c.train.passage_prompt == "passage: ")),
    (CARD, "query_prefix = 'Given a web search query, retrieve relevant passages that answer the query: '",
     # the form "{task definition}: {query}" with the recipe's own task definition, no "Instruct:" template
     _both(lambda c: c.train.query_prompt.startswith("Given ") and c.train.query_prompt.endswith(": ")
           and "Instruct" not in c.train.query_prompt)),
    (NV_EMBED + ", sec. 4", "Note, we mask out the instruction tokens in the output embeddings during both training "
                            "and evaluation, although they still impact the output due to self-attention.",
     # raymine masks every prompt (and the BOS before it) out of mean pooling (tests/test_model.py); with a
     # prompt on both sides the BOS is masked on both, so the two sides pool alike
     _both(lambda c: c.train.pooling == "mean" and c.train.query_prompt and c.train.passage_prompt)),
    (NV_EMBED + ", sec. 3.3", "we introduce a two-stage instruction tuning method which first conducts contrastive "
                              "training with instructions on a variety of retrieval datasets (details are in section "
                              "4.1), utilizing in-batch negatives and curated hard-negative examples.",
     lambda s1, s2: s1.train.in_batch_negatives and s1.train.num_hard_negatives >= 1),
    (NV_EMBED + ", sec. 3.3", "In the second stage, we perform contrastive instruction-tuning on a combination of "
                              "retrieval and non-retrieval datasets (details are in section 4.2) without applying "
                              "the trick of in-batch negatives.",
     lambda s1, s2: not s2.train.in_batch_negatives and s2.train.model == f"{s1.output}/model"
     and s2.output != s1.output),
    (NV_EMBED + ", sec. 1", "Since in-batch negative samples are misleading for non-retrieval tasks in some cases, we "
                            "disable in-batch negative training in stage two.",
     lambda s1, s2: not s2.train.in_batch_negatives),
    (NV_EMBED + ", sec. 4.1.1", "we use E5-mistral-7b-instruct [77] as a teacher retrieval model to identify the "
                                "optimal hardnegative passages relevant to the query.",
     _both(lambda c: c.teachers == ("e5_mistral",) and c.teacher("e5_mistral").model == "intfloat/e5-mistral-7b-instruct")),
    (NV_EMBED + ", sec. 4.1.1", "We set the maximum threshold for negative scores based on a percentage of the "
                                "positive score (TopKPercPos) with a 95% margin, described as follows: "
                                "max_negative_score_threshold = pos_score * percentage_margin.",
     _both(lambda c: (c.mine.method, c.mine.perc) == ("percpos", 0.95) and c.search.index_factory == "Flat")),
    (SUMMARY, "NV-Retriever-v1 adopts the “Mistral-7B” Transformer as its core backbone",
     lambda s1, s2: s1.train.model == "mistralai/Mistral-7B-v0.1"),
    (SUMMARY, "| Max Query Length | 192 tokens | ... | Max Passage Length | 512 tokens |",
     _both(lambda c: (c.train.query_max_length, c.train.passage_max_length) == (192, 512))),
    (SUMMARY, "Every attention matrix is augmented with LoRA adapters (rank r = 16, scaling factor α = 32)",
     _both(lambda c: c.train.lora and (c.train.lora_r, c.train.lora_alpha) == (16, 32))),
]

# No sentence found here for these (the NV-Retriever paper's NV-Retriever-v1 section and its sampling ablation
# were not retrievable in this environment): the values are DESIGN.md's reading of arXiv 2407.15831. Replace
# the reason with the paper's sentence once it is checked.
UNSOURCED = [
    ("hard negatives: 1 in stage 1, 5 in stage 2",
     lambda s1, s2: (s1.train.num_hard_negatives, s2.train.num_hard_negatives) == (1, 5)),
    ("mining keeps at least as many negatives as training draws", lambda s1, s2: all(
        c.mine.num_negatives >= c.train.num_hard_negatives for c in (s1, s2))),
    ("4 mined negatives: top-1 + 3 sampled uniformly from the top 10 kept", lambda s1, s2: s1.mine.num_negatives == 4
     and all((c.mine.sampling, c.mine.sample_top_k, c.mine.sample_weighting, c.mine.pos_reduce)
             == ("top1_sampled", 10, "uniform", "min") for c in (s1, s2))),
    ("AdamW lr 1e-5, 100 warm-up steps, batch 32 x grad-accum 4", _both(
        lambda c: (c.train.lr, c.train.warmup_steps, c.train.batch_size, c.train.grad_accum) == (1e-5, 100, 32, 4))),
    ("e5-mistral-7b-instruct teacher as its card uses it: last token + EOS, instructed queries, bare passages",
     _both(lambda c: (lambda t: (t.pooling, t.append_eos, t.passage_prompt) == ("last_token", "always", "")
                     and t.query_prompt.startswith("Instruct: ") and t.query_prompt.endswith("\nQuery: "))(
         c.teacher("e5_mistral")))),
]


@pytest.fixture(scope="module")
def recipes():
    return load_config(STAGE1), load_config(STAGE2)


@pytest.mark.parametrize("source, quote, check", CLAIMS, ids=[f"{s.split(',')[0]}: {q[:50]}" for s, q, _ in CLAIMS])
def test_recipe_follows_the_quoted_source(recipes, source, quote, check):
    assert check(*recipes), f"{source}: {quote!r}"


@pytest.mark.parametrize("what, check", UNSOURCED, ids=[w for w, _ in UNSOURCED])
def test_recipe_values_without_a_retrievable_quote(recipes, what, check):
    assert check(*recipes), what


@pytest.mark.slow
@pytest.mark.timeout(3600)  # two full runs, ~15 min each on a busy 2-core machine (the suite's limit is 900 s)
def test_both_7b_recipe_files_run_end_to_end_with_tiny_models(ray_local, tmp_path):
    teacher = build_tiny_sp_mistral(tmp_path / "tiny_e5_mistral", seed=1)
    student = build_tiny_decoder(tmp_path / "tiny_mistral_student", "mistral", seed=2)

    cfg1 = load_config(STAGE1, _tiny(teacher, student, tmp_path / "stage1"))
    t, m, tr = cfg1.teacher("e5_mistral"), cfg1.mine, cfg1.train
    assert (t.pooling, t.append_eos, t.query_prompt.startswith("Instruct: "), t.passage_prompt) == (
        "last_token", "always", True, "")
    assert (m.method, m.perc, m.sampling, m.sample_top_k) == ("percpos", 0.95, "top1_sampled", 10)
    assert (tr.strategy, tr.lora, tr.bidirectional, tr.gradient_checkpointing, tr.num_hard_negatives) == (
        "fsdp", True, True, True, 1)
    rep1 = run_pipeline(cfg1, STAGES)
    model1 = Path(cfg1.output) / "model"
    assert (model1 / "config.json").is_file(), sorted(p.name for p in model1.iterdir())

    s2 = load_config(STAGE2)
    assert s2.train.model == "runs/nv_retriever_v1_mistral7b/model"  # the shipped stage-1 output folder
    assert s2.mine.num_negatives >= 5 and s2.train.num_hard_negatives == 5 and not s2.train.in_batch_negatives
    # 12 passages leave few queries with 5 negatives below the PercPos ceiling (2 of 7 with these seeds):
    # one row per worker fills a step there, and 2 steps run over 2 epochs
    cfg2 = load_config(STAGE2, [*_tiny(teacher, str(model1), tmp_path / "stage2"), "train.batch_size=1"])
    rep2 = run_pipeline(cfg2, STAGES)
    for rep in (rep1, rep2):
        assert set(rep["stages"]) == {"ingest", "embed:e5_mistral", "search:e5_mistral", "validation", "mine",
                                      "export", "train", "evaluate"}, list(rep["stages"])
    assert rep2["stages"]["train"]["counts"]["steps"] == 2, rep2["stages"]["train"]
