"""Dense teacher encoders: exact agreement with sentence-transformers, pooling under both padding sides,
prompts on the right side only, order restored after length sorting, bad input and truncation."""
from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from raymine.config import TeacherConfig
from raymine.encoders import Encoder, resolve_model_path

TEXTS = [
    "Protein folding is driven by hydrophobic collapse.",
    "short",
    "A considerably longer passage about the cerebral white matter of newborn infants, measured in vivo "
    "by diffusion tensor magnetic resonance imaging, and what it tells us about cortical development.",
    "Vitamin D deficiency and bone density.",
    "x y",
    "Mitochondria are the powerhouse of the cell; they produce ATP through oxidative phosphorylation.",
]


@pytest.fixture(scope="module")
def minilm(minilm_path) -> Encoder:
    return Encoder(TeacherConfig(model=minilm_path, batch_size=2))


def test_resolve_model_path(minilm_path, tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == minilm_path
    assert resolve_model_path("all-MiniLM-L6-v2") == minilm_path
    assert resolve_model_path("intfloat/e5-large-v2") == "intfloat/e5-large-v2"


def test_minilm_mean_pooling_equals_sentence_transformers(minilm, minilm_path):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(minilm_path, device="cpu")
    ref = st.encode(TEXTS, batch_size=3, normalize_embeddings=True, convert_to_numpy=True)
    ours = minilm.encode(TEXTS, "passage")
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384) == (len(TEXTS), minilm.dim)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_length_sorted_batches_restore_input_order(minilm):
    batched = minilm.encode(TEXTS, "passage", batch_size=2)  # sorted by length, padded per batch
    one_by_one = np.stack([minilm.encode([t], "passage")[0] for t in TEXTS])  # no padding at all
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    # the rows really differ, so a permutation would have been caught
    assert np.abs(batched[0] - batched[1]).max() > 1e-2


def test_prompts_apply_to_their_side_only(minilm, minilm_path):
    """A side's prompt is read by the model but left out of the mean: the vector differs both from the
    bare text's and from the prompt-pooled one (the old teacher behaviour), and equals the mean over the
    text's own tokens (+ [SEP]) of the prompted sequence, computed here by hand."""
    import torch

    prompted = Encoder(TeacherConfig(model=minilm_path, query_prompt="query: ", passage_prompt="passage: "))
    q = prompted.encode(TEXTS[:3], "query")
    p = prompted.encode(TEXTS[:3], "passage")
    assert np.abs(q - p).max() > 1e-3
    assert np.abs(q - minilm.encode(["query: " + t for t in TEXTS[:3]], "query")).max() > 1e-3  # prompt not pooled
    tok, model = prompted.tokenizer, prompted.model
    for i, t in enumerate(TEXTS[:3]):
        ids = torch.tensor([tok("query: " + t)["input_ids"]])
        n_text = len(tok(t, add_special_tokens=False)["input_ids"]) + 1  # the text's tokens + [SEP]
        with torch.no_grad():
            h = model(input_ids=ids).last_hidden_state[0, -n_text:].mean(dim=0)
        np.testing.assert_allclose(q[i], torch.nn.functional.normalize(h, dim=0).numpy(), atol=1e-5)

    only_query = Encoder(TeacherConfig(model=minilm_path, query_prompt="query: "))
    np.testing.assert_allclose(only_query.encode(TEXTS[:3], "passage"), minilm.encode(TEXTS[:3], "passage"),
                               atol=1e-6)


def test_normalize_off_keeps_raw_mean(minilm_path, minilm):
    raw = Encoder(TeacherConfig(model=minilm_path, normalize=False)).encode(TEXTS[:2], "passage")
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True),
                               minilm.encode(TEXTS[:2], "passage"), atol=1e-5)


@pytest.mark.parametrize("bad", ["", "   \n\t"])
def test_empty_text_raises_naming_the_index(minilm, bad):
    with pytest.raises(ValueError, match=r"index 2 is empty"):
        minilm.encode(["fine", "also fine", bad, "fine"], "passage")


def test_non_string_text_raises(minilm):
    with pytest.raises(ValueError, match=r"index 1 is NoneType"):
        minilm.encode(["fine", None], "query")  # type: ignore[list-item]


def test_side_must_be_query_or_passage(minilm):
    with pytest.raises(ValueError, match="side"):
        minilm.encode(["x"], "document")  # type: ignore[arg-type]


def test_too_long_text_is_truncated_and_counted(minilm_path):
    enc = Encoder(TeacherConfig(model=minilm_path, passage_max_length=8, query_max_length=64))
    head = "alpha beta gamma delta epsilon zeta"  # 6 word-piece tokens + [CLS] + [SEP] = 8
    texts = [head + " eta theta iota kappa", head + " completely different ending words", "short one"]
    out = enc.encode(texts, "passage")
    assert enc.last_truncated.tolist() == [True, True, False]
    assert enc.truncated == 2 and enc.truncated_by_side == {"query": 0, "passage": 2}
    # both were cut to the same 8 tokens, so they embed identically, and equal the head alone
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)
    np.testing.assert_allclose(out[0], enc.encode([head], "passage")[0], atol=1e-5)
    assert enc.last_truncated.tolist() == [False]  # exactly 8 tokens: not truncated
    enc.encode(texts, "query")  # query side has its own, longer limit
    assert enc.truncated_by_side == {"query": 0, "passage": 2}


def test_empty_input_gives_empty_matrix(minilm):
    out = minilm.encode([], "query")
    assert out.shape == (0, 384) and out.dtype == np.float32


def test_bm25_kind_is_rejected(minilm_path):
    with pytest.raises(ValueError, match="dense"):
        Encoder(TeacherConfig(kind="bm25", model=minilm_path))


# --- decoders --------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["last_token", "mean"])
def test_decoder_pooling_same_under_left_and_right_padding(tiny_mistral_path, pooling):
    texts = TEXTS[:4]
    cfg = TeacherConfig(model=tiny_mistral_path, pooling=pooling, batch_size=4)
    left = Encoder(replace(cfg, padding_side="left"))
    right = Encoder(replace(cfg, padding_side="right"))
    assert left.tokenizer.padding_side == "left" and right.tokenizer.padding_side == "right"
    a, b = left.encode(texts, "query"), right.encode(texts, "query")
    alone = np.stack([right.encode([t], "query")[0] for t in texts])  # unpadded reference
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, alone, atol=1e-5)
    assert np.abs(a[0] - a[1]).max() > 1e-3


def test_decoder_without_pad_token_pads_with_eos(tiny_mistral_path, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "nopad"
    shutil.copytree(tiny_mistral_path, folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.eos_token = "[SEP]"
    tok.pad_token = None
    tok.save_pretrained(str(folder))
    assert AutoTokenizer.from_pretrained(str(folder)).pad_token is None

    enc = Encoder(TeacherConfig(model=str(folder), pooling="last_token", padding_side="left", batch_size=3))
    assert enc.tokenizer.pad_token == "[SEP]"
    texts = TEXTS[:3]
    batched = enc.encode(texts, "passage")
    alone = np.stack([enc.encode([t], "passage")[0] for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


# --- one encoder: evaluation embeds exactly as training does ---------------------------------------
PROMPT = "Instruct: Given a question, retrieve passages that answer the question\nQuery: "
QUERIES = ["what is protein folding", "which planets have moons", "how long should I cook spaghetti tonight"]


@pytest.mark.parametrize("arch", ["mistral", "minilm"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_evaluation_equals_training_embeddings(arch, padding, minilm_path, tiny_sp_mistral_path):
    """Encoder.encode (teachers, evaluation) = BiEncoder forward in eval mode (training) to 1e-5, for a
    prompted bidirectional Mistral and a prompted MiniLM, under either padding side of the Encoder
    (training pads right). Both also equal an independent reference: each text alone, unpadded, through
    the (bidirectional) backbone, averaged over the text's own trailing tokens."""
    import torch

    from raymine.config import TrainConfig
    from raymine.model import BiEncoder, load_backbone

    path = tiny_sp_mistral_path if arch == "mistral" else minilm_path
    bidi = arch == "mistral"
    common = dict(model=path, pooling="mean", query_prompt=PROMPT, query_max_length=64, passage_max_length=64)
    enc = Encoder(TeacherConfig(**common, bidirectional=bidi, padding_side=padding, batch_size=3, device="cpu"))
    student = BiEncoder.from_config(TrainConfig(**common, bidirectional=bidi)).eval()
    assert student.tokenizer.padding_side == "right"
    with torch.no_grad():
        trained = student(**student.tokenize(QUERIES, "query")).numpy()
    evaluated = enc.encode(QUERIES, "query")
    np.testing.assert_allclose(evaluated, trained, atol=1e-5)

    backbone, tok = load_backbone(path, bidirectional=bidi)
    backbone.eval()
    for i, t in enumerate(QUERIES):
        ids = tok(PROMPT + t)["input_ids"]
        n_text = len(tok(t, add_special_tokens=False)["input_ids"]) + (ids[-1] in tok.all_special_ids)
        with torch.no_grad():
            h = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -n_text:].mean(dim=0)
        np.testing.assert_allclose(evaluated[i], torch.nn.functional.normalize(h, dim=0).numpy(), atol=1e-5)
    if bidi:  # the encoder really is bidirectional: a causal one differs
        causal = Encoder(TeacherConfig(**common, bidirectional=False, padding_side=padding, device="cpu"))
        assert np.abs(causal.encode(QUERIES, "query") - evaluated).max() > 1e-3


# --- decoder teachers with last-token pooling: EOS appended after truncation ------------------------
@pytest.mark.parametrize("padding", ["left", "right"])
def test_last_token_teacher_appends_eos_after_truncation(tiny_sp_mistral_path, padding):
    """e5-mistral-7b-instruct's recipe, written out independently: tokenise at max_length - 1 without
    padding, append EOS, pad, last-token pool. The EOS is the pooled token even for a truncated text."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    max_len = 8
    cfg = TeacherConfig(model=tiny_sp_mistral_path, pooling="last_token",
                        query_max_length=max_len, passage_max_length=max_len, padding_side=padding, batch_size=4,
                        device="cpu")
    enc = Encoder(cfg)
    texts = ["what is protein folding and why does it matter so much for cells", "moons", *QUERIES[1:]]
    got = enc.encode(texts, "passage")
    assert enc.last_truncated.tolist() == [True, False, False, True]
    tok = AutoTokenizer.from_pretrained(tiny_sp_mistral_path)
    f = enc.bi.tokenize(texts, "passage")
    last = f["attention_mask"].shape[1] - 1 if padding == "left" else f["attention_mask"].sum(dim=1) - 1
    assert (f["input_ids"][torch.arange(4), last] == tok.eos_token_id).all()
    assert int(f["attention_mask"].sum(dim=1).max()) == max_len

    model = AutoModel.from_pretrained(tiny_sp_mistral_path).eval()
    for i, t in enumerate(texts):  # one at a time: no padding in the reference
        ids = tok(t, max_length=max_len - 1, truncation=True)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        np.testing.assert_allclose(got[i], torch.nn.functional.normalize(h, dim=0).numpy(), atol=1e-5)

    never = Encoder(replace(cfg, append_eos="never")).bi.tokenize(texts, "passage")
    assert (never["input_ids"][never["attention_mask"] == 1] != tok.eos_token_id).all()  # pads are EOS: skip them


def test_append_eos_rules(tiny_sp_mistral_path, minilm_path):
    mean = Encoder(TeacherConfig(model=tiny_sp_mistral_path, pooling="mean"))
    assert mean.bi.eos_id is None  # 'auto': only for last-token pooling
    assert Encoder(TeacherConfig(model=tiny_sp_mistral_path, pooling="mean", append_eos="always")).bi.eos_id == \
        mean.tokenizer.eos_token_id
    assert Encoder(TeacherConfig(model=minilm_path, pooling="last_token")).bi.eos_id is None  # BERT: no EOS token
    with pytest.raises(ValueError, match="no eos token"):
        Encoder(TeacherConfig(model=minilm_path, pooling="last_token", append_eos="always"))


def test_int8_backend_replaces_every_linear_and_stays_close_to_fp32(minilm, minilm_path):
    """quantize='int8' swaps all 36 Linear layers of MiniLM (6 layers x Q, K, V, O, up, down) for torch's dynamic
    int8 ones; the vectors move, but stay close to fp32 (cosine > 0.95 per text)."""
    import torch

    q = Encoder(TeacherConfig(model=minilm_path, batch_size=2, quantize="int8"))
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    assert sum(isinstance(m, Int8Linear) for m in q.bi.backbone.modules()) == 36
    assert not any(type(m) is torch.nn.Linear for m in q.bi.backbone.modules())
    a, b = minilm.encode(TEXTS, "passage"), q.encode(TEXTS, "passage")
    cos = (a * b).sum(1)
    assert cos.min() > 0.95, cos
    assert np.abs(a - b).max() > 1e-4  # really quantised, not the fp32 path again


def test_int8_backend_is_cpu_and_dense_only(minilm_path):
    from raymine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="quantize"):
        load_config(None, ["teacher_defs.minilm.quantize=int8", "teacher_defs.minilm.device=cuda"])
    with pytest.raises(ConfigError, match="quantize"):
        load_config(None, ["teacher_defs.bm25.quantize=int8"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_encoder_equals_cpu(tiny_sp_mistral_path, dtype):
    """The GPU path (pinned, non-blocking copies; bf16 where asked) gives the CPU's embeddings in input order."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = TeacherConfig(model=tiny_sp_mistral_path, pooling="mean", bidirectional=True, batch_size=2,
                        dtype="float32", device="cpu")
    want = Encoder(cfg).encode(TEXTS, "passage")
    got = Encoder(replace(cfg, device="cuda", dtype=dtype)).encode(TEXTS, "passage")
    cos = (got * want).sum(1)
    assert got.shape == want.shape and got.dtype == np.float32
    assert cos.min() > (0.99999 if dtype == "float32" else 0.999), cos


# --- one tokenizer pass, batches capped by padded tokens -----------------------------------------
LONG = ("The cerebral white matter of newborn infants was measured in vivo by diffusion tensor magnetic resonance "
        "imaging; what it tells us about cortical development is discussed at length here.")


@pytest.mark.parametrize("trunc_side", ["right", "left"])
@pytest.mark.parametrize("prompt", ["", "query: "])
@pytest.mark.parametrize("which", ["minilm", "sp_mistral"])
def test_tokenize_rows_equals_tokenizing_at_the_limit(minilm_path, tiny_sp_mistral_path, which, prompt, trunc_side):
    """One pass one token past the limit, then the cut: the rows, prompt counts and truncation flags are those
    of the tokenizer called at the limit itself (and, for the flags, of the untruncated token count), for texts
    of every length around the limit, both truncation sides, WordPiece and SentencePiece."""
    from transformers import AutoTokenizer

    path = minilm_path if which == "minilm" else tiny_sp_mistral_path
    max_len = 12
    enc = Encoder(TeacherConfig(model=path, passage_max_length=max_len, passage_prompt=prompt, device="cpu"))
    enc.bi.tokenizer.truncation_side = trunc_side
    words = LONG.split()
    texts = [" ".join(words[:n]) for n in range(1, 16)]  # 1..15 words: short, exactly at, and past the limit
    got = enc.bi.tokenize_rows(texts, "passage")
    tok = AutoTokenizer.from_pretrained(path)
    tok.truncation_side = trunc_side
    budget = max_len - (enc.bi.eos_id is not None)
    want = tok([prompt + t for t in texts], truncation=True, max_length=budget)["input_ids"]
    full = tok([prompt + t for t in texts])["input_ids"]
    assert got.rows == [r + ([enc.bi.eos_id] if enc.bi.eos_id is not None else []) for r in want]
    assert got.truncated == [len(f) > budget for f in full]
    assert any(got.truncated) and not all(got.truncated)
    if prompt and trunc_side == "right":  # the prompt's tokens are all still there
        n_prompt = len(tok(prompt.strip(), add_special_tokens=False)["input_ids"])
        assert all(c >= n_prompt for c in got.counts)
    padded = enc.bi.tokenize(texts, "passage")  # = tokenize_rows + pad
    assert padded["input_ids"].shape == (len(texts), max(len(r) for r in got.rows))


def test_batch_bounds_hand_computed():
    from raymine.encoders import batch_bounds

    lengths = np.array([300, 256, 256, 100, 100, 100, 20])  # longest first
    assert batch_bounds(lengths, 8, 512) == [(0, 1), (1, 3), (3, 7)]  # 512 // 300 = 1, // 256 = 2, // 100 = 5
    assert batch_bounds(lengths, 3, 0) == [(0, 3), (3, 6), (6, 7)]  # no token cap: batch_size alone
    assert batch_bounds(lengths, 2, 10_000) == [(0, 2), (2, 4), (4, 6), (6, 7)]  # batch_size still caps
    assert batch_bounds(lengths, 8, 100) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7)]  # >= 1 text
    assert batch_bounds(np.zeros(0, np.int64), 8, 512) == []


def test_token_capped_batches_give_the_same_vectors(minilm_path):
    """max_batch_tokens changes only how texts are grouped: the vectors (input order) equal the uncapped ones;
    -1 means 2048 for fp32 on a CPU and no cap for bf16."""
    from raymine.encoders import CPU_BATCH_TOKENS

    texts = TEXTS + [LONG, LONG[:60], "a b c"]
    capped = Encoder(TeacherConfig(model=minilm_path, batch_size=64, max_batch_tokens=40, device="cpu"))
    whole = Encoder(TeacherConfig(model=minilm_path, batch_size=64, max_batch_tokens=0, device="cpu"))
    auto = Encoder(TeacherConfig(model=minilm_path, device="cpu"))
    bf16 = Encoder(TeacherConfig(model=minilm_path, device="cpu", dtype="bfloat16"))
    assert (capped.batch_tokens, whole.batch_tokens, auto.batch_tokens, bf16.batch_tokens) == (40, 0, CPU_BATCH_TOKENS, 0)
    np.testing.assert_allclose(capped.encode(texts, "passage"), whole.encode(texts, "passage"), atol=1e-5)
    assert capped.last_truncated.tolist() == whole.last_truncated.tolist()
