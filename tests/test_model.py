"""Bi-encoder: bidirectional switch, prompt-free pooling, LoRA, gradient checkpointing, saved folder."""
from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_decoder

from raymine.config import TrainConfig
from raymine.loss import info_nce
from raymine.model import BiEncoder, load_backbone, make_bidirectional


@pytest.fixture(scope="module")
def tiny_decoders(tmp_path_factory, tiny_mistral_path):
    out = {"mistral": tiny_mistral_path}
    for arch in ("llama", "qwen2"):
        out[arch] = build_tiny_decoder(tmp_path_factory.mktemp(f"tiny_{arch}"), arch)
    return out


def _first_tokens_change(model, pad_row: bool) -> float:
    """Max change of the states of tokens 0 and 1 when only the last real token changes."""
    a = torch.tensor([[101, 2023, 2003, 1037, 3231]])
    b = a.clone()
    b[0, -1] = 4937
    am = torch.ones_like(a)
    if pad_row:  # right padding + a batch row that is padded: the mask path is materialised
        a, b = (torch.cat([x, torch.zeros(1, 2, dtype=torch.long)], dim=1) for x in (a, b))
        am = torch.cat([am, torch.zeros(1, 2, dtype=torch.long)], dim=1)
        a, b = (torch.cat([x, x]) for x in (a, b))
        am = torch.cat([am, torch.ones_like(am)])
    with torch.no_grad():
        ha = model(input_ids=a, attention_mask=am).last_hidden_state
        hb = model(input_ids=b, attention_mask=am).last_hidden_state
    return (ha[0, :2] - hb[0, :2]).abs().max().item()


@pytest.mark.parametrize("arch", ["mistral", "llama", "qwen2"])
@pytest.mark.parametrize("pad_row", [False, True])
def test_bidirectional_switch(tiny_decoders, arch, pad_row):
    causal, _ = load_backbone(tiny_decoders[arch], bidirectional=False)
    bidi, _ = load_backbone(tiny_decoders[arch], bidirectional=True)
    causal.eval(), bidi.eval()
    assert _first_tokens_change(causal, pad_row) == 0.0
    assert _first_tokens_change(bidi, pad_row) > 1e-3


def test_bidirectional_refuses_encoder(minilm_path):
    enc, _ = load_backbone(minilm_path)
    with pytest.raises(ValueError, match="decoder"):
        make_bidirectional(enc)


def test_bert_loaded_without_pooler(minilm_path):
    enc, _ = load_backbone(minilm_path)
    assert getattr(enc, "pooler", None) is None


def test_prompt_tokens_excluded_from_mean(minilm_path):
    prompt = "Given a claim, find documents that support it: "
    cfg = TrainConfig(model=minilm_path, query_prompt=prompt, normalize=False)
    m = BiEncoder.from_config(cfg).eval()
    tok = m.tokenizer
    bare = tok(prompt, add_special_tokens=False)["input_ids"]
    n_prompt = 1 + len(bare)  # [CLS] + prompt (WordPiece: the prompt tokenises the same alone and in context)
    texts = ["aspirin lowers fever", "a much longer query about protein folding in yeast cells"]
    f = m.tokenize(texts, "query")
    assert f["input_ids"][0, 1 : 1 + len(bare)].tolist() == bare
    with torch.no_grad():
        hidden = m.backbone(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).last_hidden_state
        got = m(**f)
    for i in range(2):
        n_real = int(f["attention_mask"][i].sum())
        want = hidden[i, n_prompt:n_real].mean(dim=0)  # denominator = text tokens only (+ [SEP])
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
    # without the pool mask the prompt would be averaged in: a different vector
    assert not torch.allclose(got[0], hidden[0, : int(f["attention_mask"][0].sum())].mean(dim=0), atol=1e-3)


# --- prompt span by character offsets ------------------------------------------------------------
PROMPTS = ("query: ", "Given a question, retrieve passages that answer the question: ",
           "Instruct: Given a question, retrieve passages that answer the question\nQuery: ")
SPAN_TEXTS = ["what is protein folding", "which planets have moons", "how long should i cook spaghetti tonight"]


@pytest.fixture(scope="module")
def span_models(minilm_path, tiny_sp_mistral_path):
    """BiEncoders over a WordPiece (MiniLM) and a SentencePiece/Metaspace tokenizer, keyed by prompt."""
    def build(path, prompt):
        return BiEncoder.from_config(TrainConfig(model=path, query_prompt=prompt, passage_prompt=prompt,
                                                 query_max_length=64, passage_max_length=64)).eval()
    return {(kind, p): build(path, p) for kind, path in (("wordpiece", minilm_path), ("sentencepiece", tiny_sp_mistral_path))
            for p in PROMPTS}


@pytest.mark.parametrize("kind", ["wordpiece", "sentencepiece"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_pool_mask_covers_exactly_the_text(span_models, kind, side, prompt):
    """Pooled tokens decode to the text itself (no prompt piece, no text word lost) under either padding;
    the sequence's trailing special ([SEP]) stays pooled, leading ones (CLS/BOS) do not. Tokenising the
    prompt alone (the old rule) loses the first text word under SentencePiece: its lone trailing "▁"."""
    m = span_models[(kind, prompt)]
    tok = m.tokenizer
    tok.padding_side = side
    try:
        f = m.tokenize(SPAN_TEXTS, "query")
    finally:
        tok.padding_side = "right"
    special = set(tok.all_special_ids)
    for i, text in enumerate(SPAN_TEXTS):
        ids = f["input_ids"][i][f["attention_mask"][i] == 1].tolist()
        pooled = f["input_ids"][i][f["pool_mask"][i] == 1].tolist()
        assert tok.decode(pooled, skip_special_tokens=True).strip() == text
        own = tok(text, add_special_tokens=False)["input_ids"]  # the text's tokens are the tail of the sequence
        trailing = [ids[-1]] if ids[-1] in special else []  # [SEP] (WordPiece); none for SentencePiece
        assert pooled == own + trailing
        assert f["pool_mask"][i].sum() < f["attention_mask"][i].sum()


def test_old_prompt_length_rule_is_off_by_one_for_sentencepiece(tiny_sp_mistral_path):
    """The case the offsets fix: the prompt alone ends with a lone '▁' token that is not there in context."""
    from conftest import build_sp_tokenizer

    tok = build_sp_tokenizer()
    prompt = "Query: "
    alone = tok(prompt)["input_ids"]
    together = tok(prompt + "what is protein folding")["input_ids"]
    assert tok.convert_ids_to_tokens(alone)[-1] == "▁" and together[: len(alone)] != alone
    m = BiEncoder.from_config(TrainConfig(model=tiny_sp_mistral_path, query_prompt=prompt)).eval()
    f = m.tokenize(["what is protein folding"], "query")
    first_pooled = int(f["pool_mask"][0].nonzero()[0])
    assert first_pooled == len(alone) - 1  # '▁what' sits where the prompt's lone '▁' was


def test_prefix_fallback_agrees_with_offsets(tiny_sp_mistral_path, minilm_path):
    from conftest import build_sp_tokenizer
    from transformers import AutoTokenizer

    from raymine.model import _prompt_counts_by_prefix, prompt_token_counts

    for tok in (build_sp_tokenizer(), AutoTokenizer.from_pretrained(minilm_path)):
        for prompt in PROMPTS:
            enc = tok([prompt + t for t in SPAN_TEXTS], return_offsets_mapping=True, return_special_tokens_mask=True)
            by_offsets = prompt_token_counts(enc["offset_mapping"], enc["special_tokens_mask"], len(prompt))
            assert _prompt_counts_by_prefix(tok, enc["input_ids"], prompt) == by_offsets


def test_prompt_filling_the_length_limit_raises(minilm_path):
    m = BiEncoder.from_config(TrainConfig(model=minilm_path, query_prompt=PROMPTS[1], query_max_length=6))
    with pytest.raises(ValueError, match="prompt fills all 6 tokens"):
        m.tokenize(["aspirin"], "query")


def test_left_padding_positions_for_absolute_position_models(minilm_path):
    """BERT has absolute position embeddings: left padding must not shift them."""
    m = BiEncoder.from_config(TrainConfig(model=minilm_path)).eval()
    texts = ["short", "a somewhat longer passage text here about cells"]
    right = m.encode(texts)
    m.tokenizer.padding_side = "left"
    try:
        left = m.encode(texts)
    finally:
        m.tokenizer.padding_side = "right"
    torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-5)


def test_last_token_padding_side(tiny_mistral_path):
    cfg = TrainConfig(model=tiny_mistral_path, bidirectional=True, pooling="last_token")
    m = BiEncoder.from_config(cfg).eval()
    texts = ["short", "a somewhat longer passage text here"]
    right = m.encode(texts)
    m.tokenizer.padding_side = "left"
    left = m.encode(texts)
    torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-5)


def _step(m: BiEncoder, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    q = m(**m.tokenize(["what is a cat", "protein folding"], "query"))
    p = m(**m.tokenize(["a cat is an animal", "proteins fold", "dogs bark", "yeast cells"], "passage"))
    loss = info_nce(q, p[:2], p[2:].reshape(2, 1, -1), temperature=0.05)
    loss.backward()
    opt.step()


def test_lora_trains_only_adapters(tiny_mistral_path):
    cfg = TrainConfig(model=tiny_mistral_path, bidirectional=True, lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    m = BiEncoder.from_config(cfg)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    _step(m)
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)  # B starts at zero: it must have moved


def test_gradient_checkpointing_same_gradients(tiny_mistral_path):
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        m = BiEncoder.from_config(TrainConfig(model=tiny_mistral_path, bidirectional=True, gradient_checkpointing=gc))
        m.train()
        q = m(**m.tokenize(["what is a cat"], "query"))
        p = m(**m.tokenize(["a cat is an animal", "dogs bark"], "passage"))
        info_nce(q, p[:1], p[1:].reshape(1, 1, -1)).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_saved_lora_mistral_reloads_bidirectional(tiny_mistral_path, tmp_path):
    cfg = TrainConfig(model=tiny_mistral_path, bidirectional=True, lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    m = BiEncoder.from_config(cfg)
    _step(m)
    texts = ["a cat is an animal", "proteins fold"]
    want = m.encode(texts)
    m.save(str(tmp_path / "out"))
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(str(tmp_path / "out"))
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert plain.config.is_causal is False
    again = BiEncoder.from_config(TrainConfig(model=str(tmp_path / "out"), bidirectional=True))
    torch.testing.assert_close(again.encode(texts), want, rtol=1e-4, atol=1e-5)


def test_saved_minilm_matches_sentence_transformers(minilm_path, tmp_path):
    prompt = "query: "
    m = BiEncoder.from_config(TrainConfig(model=minilm_path, query_prompt=prompt))
    m.save(str(tmp_path / "st"))
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    texts = ["aspirin lowers fever", "a longer text about protein folding in yeast cells"]
    ours_p = m.encode(texts, "passage")
    ours_q = m.encode(texts, "query")
    theirs_p = torch.from_numpy(st.encode(texts))
    theirs_q = torch.from_numpy(st.encode(texts, prompt_name="query"))
    torch.testing.assert_close(ours_p, theirs_p, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_q, theirs_q, rtol=1e-4, atol=1e-5)


# --- leading special tokens and the sentence-transformers folder ----------------------------------
def _sp_student(path: str, passage_prompt: str, leading: str, **kw) -> BiEncoder:
    backbone, tok = load_backbone(path, bidirectional=True)
    return BiEncoder(backbone, tok, "mean", True, PROMPTS[1], passage_prompt, mask_leading_special=leading, **kw).eval()


@pytest.mark.parametrize("passage_prompt, leading, bos_in_passages", [
    ("", "with_prompt", True),  # BOS leaves the pool with the query's prompt only: the two sides differ
    ("passage: ", "with_prompt", False),  # the NV-Retriever-v1 card's prefixes: a prompt on both sides
    ("", "always", False),
])
def test_bos_pooling_on_both_sides(tiny_sp_mistral_path, passage_prompt, leading, bos_in_passages):
    """BOS sits before a prompt, so it is masked with it (sentence-transformers' include_prompt=False, NV-Embed's
    `attention_mask[:, :instruction_lens] = 0`); 'always' masks it on an unprompted side too, so queries and
    passages pool the same kind of tokens: the text's."""
    m = _sp_student(tiny_sp_mistral_path, passage_prompt, leading)
    tok, bos = m.tokenizer, m.tokenizer.bos_token_id
    q, p = m.tokenize(SPAN_TEXTS, "query"), m.tokenize(SPAN_TEXTS, "passage")
    assert (q["input_ids"][:, 0] == bos).all() and (p["input_ids"][:, 0] == bos).all()  # right padding
    assert q["pool_mask"][:, 0].tolist() == [0] * len(SPAN_TEXTS)
    assert p["pool_mask"][:, 0].tolist() == [int(bos_in_passages)] * len(SPAN_TEXTS)
    for f in (q, p):
        for i, text in enumerate(SPAN_TEXTS):
            pooled = f["input_ids"][i][f["pool_mask"][i] == 1].tolist()
            own = tok(text, add_special_tokens=False)["input_ids"]
            assert pooled == ([bos] if f is p and bos_in_passages else []) + own


def test_leading_special_option_is_checked(tiny_sp_mistral_path):
    with pytest.raises(ValueError, match="mask_leading_special"):
        _sp_student(tiny_sp_mistral_path, "", "sometimes")


# letter-, digit- and bracket-first texts (a SentencePiece prompt's trailing "▁" merges into a letter only),
# and one longer than the query limit (cut the same way by both libraries)
ST_TEXTS = ["what is protein folding", "1984 was the year the planets aligned", "(a) which planets have moons",
            "how long should i cook spaghetti tonight " * 4]


@pytest.mark.parametrize("passage_prompt, leading, padding_side", [
    ("", "with_prompt", "right"), ("passage: ", "with_prompt", "left"), ("", "always", "right"),
])
def test_saved_sentencepiece_student_matches_sentence_transformers(
        tiny_sp_mistral_path, tmp_path, passage_prompt, leading, padding_side):
    """A bidirectional Mistral student with a SentencePiece tokenizer and a query prompt, saved by raymine, gives
    raymine's vectors in sentence-transformers (encode_query / encode_document, both sides). sentence-transformers
    measures a prompt tokenised alone, one token more than the prompt holds in context here, so the folder
    carries raymine's input module (loaded with trust_remote_code=True)."""
    from sentence_transformers import SentenceTransformer

    from raymine.model import st_prompt_length

    m = _sp_student(tiny_sp_mistral_path, passage_prompt, leading, query_max_length=16, passage_max_length=48)
    m.tokenizer.padding_side = padding_side
    alone, in_context = st_prompt_length(m.tokenizer, PROMPTS[1]), m.tokenize_rows(ST_TEXTS[:1], "query").counts[0]
    assert alone == in_context + 1  # the lone trailing "▁"
    m.save(str(tmp_path / "st"))
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(tmp_path / "st"), device="cpu")
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu", trust_remote_code=True)
    st[0].tokenizer.padding_side = padding_side  # transformers saves the side given at init only
    for ours, theirs in ((m.encode(ST_TEXTS, "query"), st.encode_query(ST_TEXTS)),
                         (m.encode(ST_TEXTS, "passage"), st.encode_document(ST_TEXTS))):
        torch.testing.assert_close(ours, torch.from_numpy(theirs), rtol=1e-5, atol=1e-6)
