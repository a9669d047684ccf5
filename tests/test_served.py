"""Served teachers (kind: openai) against real server processes (``python -m raymine.serve``, the packaged
MiniLM on CPU): the client's batching, retries, rate limit and checks; the Ray embed stage's vectors against
the in-process teacher; a server that dies mid-stage, then a resumed re-run; an endpoint down at the start."""
from __future__ import annotations

import contextlib
import json
import random
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymine.columns import DOC_ID, QUERY_ID, TEXT
from raymine.config import ConfigError, EmbedConfig, TeacherConfig, load_config
from raymine.serve import text_hash
from raymine.served import (
    RateLimiter,
    ServedEncoder,
    ServedError,
    backoff_delay,
    embeddings_url,
    estimate_tokens,
    key_config,
    parse_embeddings,
    plan_requests,
)

TINY_BEIR = Path(__file__).resolve().parent / "data" / "tiny_beir"
WORDS = "protein cell gene vitamin bone brain neuron insulin tumour virus receptor dose".split()
PROMPT = "query: "


def texts(n: int, seed: int) -> list[str]:
    """Unique texts of very different lengths."""
    rng = np.random.default_rng(seed)
    return [f"text {seed}-{i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for i in range(n)]


# ------------------------------------------------------------------------------------------------
# Server processes
# ------------------------------------------------------------------------------------------------
class Server:
    """One ``python -m raymine.serve`` process on a free port, with a request log and the test hooks."""

    def __init__(self, model: str, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.log, self.out = folder / "requests.jsonl", folder / "stdout.txt"
        self.model = model
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raymine.serve", "--model", model, "--port", "0", "--threads", "1",
             "--request-log", str(self.log), "--test-hooks"],
            stdout=self.out.open("w"), stderr=(folder / "stderr.txt").open("w"))
        self.endpoint = ""

    def wait_ready(self, timeout_s: float = 180) -> Server:
        t0 = time.time()
        while not self.endpoint:
            text = self.out.read_text() if self.out.exists() else ""
            if " on http://" in text:
                self.endpoint = text.split(" on ", 1)[1].split()[0]
            elif self.proc.poll() is not None or time.time() - t0 > timeout_s:
                raise RuntimeError(f"server did not start: {(self.out.parent / 'stderr.txt').read_text()[-2000:]}")
            else:
                time.sleep(0.2)
        return self

    def faults(self, **faults) -> None:
        req = urllib.request.Request(self.endpoint.replace("/v1", "/_raymine/faults"), json.dumps(faults).encode(),
                                     {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()

    def records(self, since: int = 0) -> list[dict]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [json.loads(x) for x in lines[since:]]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(minilm_path, tmp_path_factory):
    """Two servers started side by side (the second is killed by a test); and the in-process teacher's
    reference vectors, computed while they load."""
    from raymine.encoders import Encoder

    tmp = tmp_path_factory.mktemp("served")
    main, spare = Server(minilm_path, tmp / "main"), Server(minilm_path, tmp / "spare")
    try:
        passages, queries = texts(60, 0), texts(20, 1)
        enc = Encoder(TeacherConfig(model=minilm_path))
        ref = {"passage": enc.encode(passages, "passage"),  # [60, 384]
               "query": enc.encode([PROMPT + q for q in queries], "passage")}  # the prompt sent as text: [20, 384]
        yield main.wait_ready(), spare.wait_ready(), passages, queries, ref
    finally:
        main.stop()
        spare.stop()


def teacher(server: Server, **kw) -> TeacherConfig:
    base = dict(kind="openai", endpoint=server.endpoint, served_model=server.model, max_texts_per_request=4,
                concurrency=2, backoff_s=0.02, backoff_max_s=0.5, max_retries=2, request_timeout_s=30.0)
    return TeacherConfig(**{**base, **kw})


@contextlib.contextmanager
def armed(server: Server, **faults):
    server.faults(**faults)
    try:
        yield
    finally:
        server.faults()


# ------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("tokens", "max_texts", "max_tokens", "expected"), [
    ([], 4, 100, []),
    ([5], 4, 100, [(0, 1)]),
    ([5] * 9, 4, 100, [(0, 4), (4, 8), (8, 9)]),  # the text cap
    ([40, 40, 40, 10, 10], 10, 90, [(0, 2), (2, 5)]),  # the token budget: 80 + 40 > 90
    ([50, 50], 10, 100, [(0, 2)]),  # exactly the budget fits
    ([10, 500, 10, 10], 10, 100, [(0, 1), (1, 2), (2, 4)]),  # a text over the budget goes alone
    ([500], 10, 100, [(0, 1)]),
])
def test_plan_requests(tokens, max_texts, max_tokens, expected):
    assert plan_requests(tokens, max_texts, max_tokens) == expected


def test_token_estimate_and_url():
    assert estimate_tokens("abc") == 1 and estimate_tokens("abcd") == 2 and estimate_tokens("") == 1
    assert estimate_tokens("é" * 3) == 2  # 6 UTF-8 bytes
    assert embeddings_url("http://h:8000/v1/") == "http://h:8000/v1/embeddings"
    assert embeddings_url("http://h:8000/v1/embeddings") == "http://h:8000/v1/embeddings"


def test_parse_embeddings_places_by_index_and_checks_the_shape():
    def body(index, vectors):
        return json.dumps({"data": [{"index": i, "embedding": v} for i, v in zip(index, vectors, strict=True)]}).encode()

    got = parse_embeddings(body([2, 0, 1], [[3.0, 3.5], [1.0, 1.5], [2.0, 2.5]]), 3, 2, "E")
    np.testing.assert_array_equal(got, [[1.0, 1.5], [2.0, 2.5], [3.0, 3.5]])
    for bad, n, dim, what in [(body([0, 0], [[1.0], [2.0]]), 2, 0, "indexes"), (body([0], [[1.0]]), 2, 0, "indexes"),
                              (body([0, 1], [[1.0], [2.0, 3.0]]), 2, 0, "dimension"),
                              (body([0], [[1.0, 2.0]]), 1, 3, "dimension"), (b"<html>busy</html>", 1, 0, "not an")]:
        with pytest.raises(ServedError, match=what) as err:
            parse_embeddings(bad, n, dim, "http://E/v1/embeddings")
        assert "http://E/v1/embeddings" in str(err.value)


def test_backoff_is_exponential_with_jitter_and_honours_retry_after():
    rng = random.Random(0)
    for retry, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (6, 10.0), (9, 10.0)]:
        d = [backoff_delay(retry, 0.5, 10.0, rng) for _ in range(200)]
        assert cap * 0.5 <= min(d) and max(d) <= cap and max(d) - min(d) > cap * 0.3  # jittered within [cap/2, cap]
    assert backoff_delay(0, 0.5, 10.0, rng, retry_after=3.0) == 3.0
    assert backoff_delay(0, 0.5, 10.0, rng, retry_after=60.0) == 10.0  # capped


def test_rate_limiter_spaces_request_starts():
    lim, starts, t0 = RateLimiter(20.0), [], time.monotonic()
    for _ in range(6):
        lim.wait()
        starts.append(time.monotonic())
    assert all(t - t0 >= k * 0.05 for k, t in enumerate(starts))  # start k waits for k intervals, not less
    t0 = time.monotonic()
    for _ in range(50):
        RateLimiter(0).wait()
    assert time.monotonic() - t0 < 0.05


def test_config_keys():
    with pytest.raises(ConfigError, match=r"teacher_defs\.srv\.endpoint"):
        load_config(None, ["teachers=srv", "teacher_defs.srv.kind=openai"])
    with pytest.raises(ConfigError, match=r"teacher_defs\.srv\.concurrency"):
        load_config(None, ["teachers=srv", "teacher_defs.srv.kind=openai",
                           "teacher_defs.srv.endpoint=http://h:1/v1", "teacher_defs.srv.concurrency=0"])
    cfg = load_config(None, ["teachers=srv", "teacher_defs.srv.kind=openai", "teacher_defs.srv.endpoint=http://h:1/v1"])
    t = cfg.teacher("srv")
    assert t.api_key_env == "OPENAI_API_KEY" and t.max_retries == 5
    # transport keys leave the embed stage's key alone (a moved or slower server resumes); the model does not
    moved = replace(t, endpoint="http://other:2/v1", max_retries=9, concurrency=16, requests_per_second=3.0)
    assert key_config(moved) == key_config(t) and key_config(replace(t, served_model="m2")) != key_config(t)
    assert not {"endpoint", "api_key_env", "max_retries"} & set(key_config(t))


# ------------------------------------------------------------------------------------------------
# The client against a real server
# ------------------------------------------------------------------------------------------------
def _post(server: Server, body: dict) -> dict:
    req = urllib.request.Request(f"{server.endpoint}/embeddings", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def test_server_speaks_the_openai_shape(servers):
    import base64

    main, _, passages, _, ref = servers
    one = _post(main, {"input": passages[0], "model": main.model})  # a string, not a list
    assert one["object"] == "list" and one["model"] == main.model and len(one["data"]) == 1
    assert one["data"][0]["index"] == 0 and one["data"][0]["object"] == "embedding"
    assert one["usage"]["prompt_tokens"] == one["usage"]["total_tokens"] > len(passages[0].split())
    b64 = _post(main, {"input": [passages[0]], "encoding_format": "base64"})["data"][0]["embedding"]
    vec = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    np.testing.assert_array_equal(vec, np.asarray(one["data"][0]["embedding"], dtype=np.float32))
    assert float(vec @ ref["passage"][0]) >= 0.999
    health = json.loads(urllib.request.urlopen(main.endpoint.replace("/v1", "/health"), timeout=10).read())
    models = json.loads(urllib.request.urlopen(f"{main.endpoint}/models", timeout=10).read())
    assert health == {"status": "ok"} and [m["id"] for m in models["data"]] == [main.model]


def test_client_batches_by_token_budget_in_input_order(servers):
    main, _, passages, _, ref = servers
    sample = passages[:14]
    cfg = teacher(main, concurrency=1, max_texts_per_request=5, max_tokens_per_request=120)
    expected = plan_requests([estimate_tokens(t) for t in sample], 5, 120)
    assert len(expected) >= 4 and any(hi - lo < 5 for lo, hi in expected[:-1])  # the budget cut some requests
    since = len(main.records())
    enc = ServedEncoder(cfg)
    got = enc.encode(sample, "passage")  # [14, 384]
    rec = main.records(since)
    assert [r["texts"] for r in rec] == [[text_hash(t) for t in sample[lo:hi]] for lo, hi in expected]
    assert enc.client.stats == {"requests": len(expected), "retries": 0, "texts": 14}
    cos = np.sum(got * ref["passage"][:14], axis=1)
    assert cos.min() >= 0.999
    with armed(main, reverse=True):  # data[i].index, not the answer's order, places each vector
        np.testing.assert_array_equal(ServedEncoder(cfg).encode(sample, "passage"), got)


def test_client_retries_with_backoff_then_succeeds_or_gives_up(servers):
    main, _, passages, _, _ = servers
    cfg = teacher(main, max_retries=2, backoff_s=0.1, backoff_max_s=1.0)
    since = len(main.records())
    with armed(main, fail_next=2, status=503):
        enc = ServedEncoder(cfg)
        t0 = time.monotonic()
        enc.encode(passages[:3], "passage")
        waited = time.monotonic() - t0
    assert [r["status"] for r in main.records(since)] == [503, 503, 200]
    assert enc.client.stats == {"requests": 3, "retries": 2, "texts": 3}
    assert waited >= 0.1 * 0.5 + 0.2 * 0.5  # two backoffs, each at least half its step

    since = len(main.records())
    with armed(main, fail_next=3, status=500), pytest.raises(ServedError) as err:
        ServedEncoder(cfg).encode(passages[:3], "passage")
    assert [r["status"] for r in main.records(since)] == [500, 500, 500]  # 1 + max_retries tries
    assert main.endpoint in str(err.value) and "3 tries" in str(err.value) and "HTTP 500" in str(err.value)

    with armed(main, fail_next=1, status=429, retry_after=0.4):  # Retry-After beats the 0.1 s backoff
        t0 = time.monotonic()
        ServedEncoder(cfg).encode(passages[:1], "passage")
        assert time.monotonic() - t0 >= 0.4


def test_client_fails_fast_on_4xx_and_never_shows_the_key(servers, monkeypatch):
    main, _, passages, _, _ = servers
    since = len(main.records())
    with pytest.raises(ServedError, match="404") as err:
        ServedEncoder(teacher(main, served_model="no-such-model")).encode(passages[:2], "passage")
    assert main.endpoint in str(err.value) and "no-such-model" in str(err.value)
    assert [r["status"] for r in main.records(since)] == [404]  # no retry

    with armed(main, api_key="sk-test-123"):
        since = len(main.records())
        for wrong in ("", "sk-wrong-456"):  # no key, a wrong key: refused at once, the key not repeated
            monkeypatch.setenv("RAYMINE_TEST_KEY", wrong)
            with pytest.raises(ServedError, match="401") as err:
                ServedEncoder(teacher(main, api_key_env="RAYMINE_TEST_KEY")).encode(passages[:2], "passage")
            assert "$RAYMINE_TEST_KEY" in str(err.value) and "sk-" not in str(err.value)
        assert [r["status"] for r in main.records(since)] == [401, 401]
        monkeypatch.setenv("RAYMINE_TEST_KEY", "sk-test-123")
        enc = ServedEncoder(teacher(main, api_key_env="RAYMINE_TEST_KEY"))
        assert enc.encode(passages[:2], "passage").shape == (2, 384)

    with pytest.raises(ServedError, match="dimension"):  # the stage's dimension, checked on every answer
        ServedEncoder(teacher(main), dim=100).encode(passages[:2], "passage")


def test_client_rate_limit_against_server(servers):
    main, _, passages, _, _ = servers
    cfg = teacher(main, requests_per_second=10.0, concurrency=4, max_texts_per_request=1)
    since = len(main.records())
    t0 = time.monotonic()
    ServedEncoder(cfg).encode(passages[:6], "passage")
    assert time.monotonic() - t0 >= 5 / 10.0 - 0.01  # 6 starts, 0.1 s apart, although 4 could go at once
    assert len(main.records(since)) == 6


# ------------------------------------------------------------------------------------------------
# The Ray embed stage
# ------------------------------------------------------------------------------------------------
def _write(rows: list[dict], path: Path) -> str:
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def _inputs(tmp: Path, passages: list[str], queries: list[str], out: Path):
    from raymine.embed import EmbedInput

    if not (tmp / "corpus.parquet").exists():
        _write([{DOC_ID: f"d{i:03d}", TEXT: t} for i, t in enumerate(passages)], tmp / "corpus.parquet")
        _write([{QUERY_ID: f"q{i:03d}", TEXT: t} for i, t in enumerate(queries)], tmp / "queries.parquet")
    return [EmbedInput("passage", str(tmp / "corpus.parquet"), DOC_ID, TEXT, str(out / "corpus")),
            EmbedInput("query", str(tmp / "queries.parquet"), QUERY_ID, TEXT, str(out / "queries"))]


EMBED = EmbedConfig(num_actors=2, rows_per_block=8, num_cpus_per_actor=0.25)  # 8 + 3 pieces, 2 requests each


@pytest.fixture(scope="module")
def reference_run(ray_local, servers, tmp_path_factory):
    """The served teacher's uninterrupted run: 60 passages and 20 prompted queries."""
    from raymine.embed import embed_tables

    main, _, passages, queries, _ = servers
    tmp = tmp_path_factory.mktemp("served_ref")
    inputs = _inputs(tmp, passages, queries, tmp / "out")
    t = teacher(main, query_prompt=PROMPT)
    manifest = embed_tables(t, EMBED, inputs, str(tmp / "out"), input_key="k")
    return tmp, inputs, t, manifest


def test_served_stage_equals_in_process_minilm(servers, reference_run):
    from raymine.embed import read_embeddings

    _, _, passages, queries, ref = servers
    _, inputs, _, manifest = reference_run
    ids, emb = read_embeddings(inputs[0].out_uri, DOC_ID)
    assert list(ids) == [f"d{i:03d}" for i in range(60)] and emb.shape == (60, 384)
    cos = np.sum(emb * ref["passage"], axis=1)
    assert cos.min() >= 0.999, cos.min()
    qids, qemb = read_embeddings(inputs[1].out_uri, QUERY_ID)
    assert list(qids) == [f"q{i:03d}" for i in range(20)]
    assert np.sum(qemb * ref["query"], axis=1).min() >= 0.999  # the query prompt went out as text
    c = manifest["counts"]
    assert c["passage_rows"] == 60 and c["query_rows"] == 20 and c["pieces"] == 8 + 3 and manifest["dim"] == 384


def _part_texts(uri: str, id_col: str, text_of: dict[str, str]) -> set[str]:
    """Hashes of the texts sent for the parts written under ``uri``."""
    return {text_hash(text_of[i]) for f in Path(uri).glob("part-*.parquet") for i in pq.read_table(f)[id_col].to_pylist()}


def test_server_dying_mid_stage_fails_in_one_line_then_resumes_per_part(servers, reference_run, tmp_path, capfd):
    """The spare server answers 6 requests then dies (a crash): the stage retries, fails with one line naming
    the endpoint (exit 2, no traceback), keeps its finished parts; the re-run against a live server asks only
    for the missing parts' texts and ends identical to the uninterrupted run."""
    from raymine.cli import guard
    from raymine.embed import embed_tables, read_embeddings

    main, spare, passages, queries, _ = servers
    ref_tmp, ref_inputs, ref_teacher, ref_manifest = reference_run
    inputs = _inputs(ref_tmp, passages, queries, tmp_path / "out")  # the same input tables
    spare.faults(exit_after=6)  # the probe + 5 stage requests, then the process exits
    dying = replace(ref_teacher, endpoint=spare.endpoint)
    capfd.readouterr()
    code = guard(lambda: embed_tables(dying, EMBED, inputs, str(tmp_path / "out"), input_key="k"))
    err = capfd.readouterr().err
    assert code == 2 and spare.proc.wait(timeout=30) == 3
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and spare.endpoint in lines[0] and "3 tries" in lines[0], err[-3000:]
    kept = [f for s in inputs for f in Path(s.out_uri).glob("part-*.parquet")]
    assert 1 <= len(kept) < 11  # some parts finished before the crash, not all

    text_of = {f"d{i:03d}": t for i, t in enumerate(passages)} | {f"q{i:03d}": PROMPT + t for i, t in enumerate(queries)}
    done_texts = _part_texts(inputs[0].out_uri, DOC_ID, text_of) | _part_texts(inputs[1].out_uri, QUERY_ID, text_of)
    since = len(main.records())
    back = embed_tables(ref_teacher, EMBED, inputs, str(tmp_path / "out"), input_key="k")  # the server is back
    asked = [h for r in main.records(since) for h in r["texts"]]
    all_texts = {text_hash(t) for t in text_of.values()}
    assert set(asked) - {text_hash("raymine probe")} == all_texts - done_texts  # only the missing parts' texts
    assert back["counts"]["parts_kept"] == len(kept) and back["counts"]["pieces"] == 11 - len(kept)
    for ref_spec, spec, col in zip(ref_inputs, inputs, (DOC_ID, QUERY_ID), strict=True):
        ref_ids, ref_emb = read_embeddings(ref_spec.out_uri, col)
        ids, emb = read_embeddings(spec.out_uri, col)
        assert list(ids) == list(ref_ids)
        np.testing.assert_array_equal(emb, ref_emb)  # identical to the uninterrupted run


def test_unreachable_endpoint_exits_2_before_any_work(ray_local, tmp_path, capfd):
    from raymine.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}/v1"
    capfd.readouterr()
    t0 = time.monotonic()
    code = main(["run", "--stages", "embed", "--data", str(TINY_BEIR), "--output", str(tmp_path / "run"),
                 "teachers=srv", "teacher_defs.srv.kind=openai", f"teacher_defs.srv.endpoint={endpoint}"])
    err = capfd.readouterr().err
    assert code == 2 and time.monotonic() - t0 < 30
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and f"{endpoint}/embeddings" in lines[0], err
    assert "connection refused" in lines[0] and "1 try" in lines[0] and "before any work" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written: no ingest, no parts
