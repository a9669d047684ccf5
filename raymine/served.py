"""Served teachers: embeddings from an OpenAI-compatible ``/v1/embeddings`` endpoint (vLLM, TEI, Infinity, NIM).

A teacher of ``kind: openai`` is embedded by the same stage as an in-process one (:mod:`raymine.embed`): the
same pieces, the same parts, the same per-part resume. Only the actor differs: :class:`ServedPieces` holds a
:class:`ServedEncoder` (no model, no torch) that cuts each piece into requests in input order (at most
``max_texts_per_request`` texts and ``max_tokens_per_request`` *estimated* tokens each, :func:`plan_requests`),
sends them ``concurrency`` at a time from a thread pool, and puts ``data[i].index`` back in input order.

Failure rules (a served model is the user's environment, so its failures are :class:`ServedError`, exit 2):
- connection errors, timeouts, 408 / 429 / 5xx: retried ``max_retries`` times with exponential backoff and
  jitter (:func:`backoff_delay`; a server's ``Retry-After`` is honoured up to ``backoff_max_s``);
- any other 4xx (bad key, unknown model, request too large), or an answer of the wrong shape: at once;
- the actor returns the failure as data and stops asking for the rest of its pieces; the driver raises it
  once, in one line naming the endpoint (:func:`raise_piece_errors`), so no worker traceback is printed;
  parts already written stay, and a re-run resumes per part;
- before any work, the driver sends one tiny request (:func:`probe`): nothing listening → exit 2 at once.

The API key is read from ``api_key_env`` in the process that sends the request (set it on every node, e.g.
through the job's ``runtime_env`` ``env_vars``); it is never logged, stored, or part of a stage key.
Client, probe and request planning are stdlib + numpy (no Ray): they run anywhere.
"""
from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from raymine.config import TeacherConfig, to_dict
from raymine.embed import EmbedInput, EmbedPieces
from raymine.errors import UserError

log = logging.getLogger(__name__)

BYTES_PER_TOKEN = 3  # token estimate: ceil(UTF-8 bytes / 3); English runs ~4 characters a token (BPE, WordPiece)
RETRY_STATUS = frozenset({408, 429})  # and every 5xx
PROBE_TIMEOUT_S = 10.0
PROBE_TEXT = "raymine probe"
# Keys that change how requests travel, not which vectors come back: left out of the embed stage's key, so a
# re-run with more retries, another rate or a server moved to another address resumes the finished parts.
TRANSPORT_KEYS = ("endpoint", "api_key_env", "concurrency", "request_timeout_s", "max_retries", "backoff_s",
                  "backoff_max_s", "requests_per_second", "max_texts_per_request", "max_tokens_per_request",
                  "batch_size", "device", "dtype")


class ServedError(UserError):
    """A served teacher's endpoint cannot be used: unreachable after the retries, a refused request (4xx),
    or an answer of the wrong shape. The message names the endpoint."""


class EndpointDown(ServedError):
    """No answer from the endpoint after the retries (connection errors, timeouts, 408/429/5xx)."""


# ------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------
def estimate_tokens(text: str) -> int:
    """Tokens a server will count for ``text``, estimated without its tokenizer: ceil(UTF-8 bytes / 3).
    An over-estimate for English (about 4 characters a token) that grows with non-ASCII scripts."""
    return max(1, math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN))


def plan_requests(tokens: Sequence[int], max_texts: int, max_tokens: int) -> list[tuple[int, int]]:
    """[lo, hi) requests over texts in input order: at most ``max_texts`` texts and ``max_tokens`` estimated
    tokens each; a text over the token budget goes alone (the server truncates or refuses it)."""
    out: list[tuple[int, int]] = []
    lo, used = 0, 0
    for i, t in enumerate(tokens):
        if i > lo and (i - lo >= max_texts or used + t > max_tokens):
            out.append((lo, i))
            lo, used = i, 0
        used += t
    if lo < len(tokens):
        out.append((lo, len(tokens)))
    return out


def backoff_delay(retry: int, base: float, cap: float, rng: random.Random, retry_after: float | None = None) -> float:
    """Seconds before retry number ``retry`` (0-based): ``min(cap, base * 2**retry)`` times a uniform factor in
    [0.5, 1] (jitter: actors that failed together do not retry together), at least the server's
    ``Retry-After`` (capped at ``cap``)."""
    delay = min(cap, base * 2.0 ** retry) * rng.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, min(cap, retry_after))
    return delay


def embeddings_url(endpoint: str) -> str:
    """``http://host:8000/v1`` → ``http://host:8000/v1/embeddings`` (an URL already ending so is kept)."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/embeddings") else f"{base}/embeddings"


def parse_embeddings(body: bytes, n: int, dim: int, where: str) -> np.ndarray:
    """An OpenAI embeddings answer → float32 [n, d] in input order (by ``data[i].index``); ServedError when
    it does not hold exactly one vector per input index or when d differs from ``dim`` (0 = any)."""
    try:
        data = json.loads(body)["data"]
        index = [int(d.get("index", i)) for i, d in enumerate(data)]
        vectors = [_vector(d["embedding"]) for d in data]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ServedError(f"served teacher {where}: not an embeddings answer ({type(e).__name__}: {e})") from None
    if sorted(index) != list(range(n)):
        raise ServedError(f"served teacher {where}: {len(data)} embeddings with indexes {sorted(index)[:8]}... "
                          f"for {n} inputs")
    dims = {len(v) for v in vectors}
    if len(dims) != 1 or (dim and dims != {dim}):
        raise ServedError(f"served teacher {where}: embeddings of dimension {sorted(dims)}, expected {dim or 'one'}")
    out = np.empty((n, dims.pop()), dtype=np.float32)  # [n, d]
    for i, v in zip(index, vectors, strict=True):
        out[i] = v
    return out


def _vector(value: Any) -> np.ndarray:
    """One ``embedding`` field: a list of floats, or base64 float32 (``encoding_format: base64``)."""
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4")
    return np.asarray(value, dtype=np.float32)


def key_config(cfg: TeacherConfig) -> dict[str, Any]:
    """What decides a served teacher's vectors (its config less :data:`TRANSPORT_KEYS`): the embed stage's key."""
    return {k: v for k, v in to_dict(cfg).items() if k not in TRANSPORT_KEYS}


# ------------------------------------------------------------------------------------------------
# The client
# ------------------------------------------------------------------------------------------------
class RateLimiter:
    """Request starts at most ``per_second`` a second, shared by the threads of one actor (0 = no limit)."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            time.sleep(start - now)


@dataclass
class _Answer:
    status: int
    body: bytes
    retry_after: float | None


class _Retry(Exception):
    """One try failed in a way worth retrying (its text says how); ``unreachable``: nothing answered the
    connection (refused, unknown host), which the probe does not retry."""

    def __init__(self, text: str, unreachable: bool) -> None:
        super().__init__(text)
        self.unreachable = unreachable

    @classmethod
    def of(cls, e: BaseException, timeout_s: float) -> _Retry:
        return cls(_os_error_text(e, timeout_s), isinstance(e, (ConnectionRefusedError, socket.gaierror)))


class EmbeddingsClient:
    """POSTs texts to ``{endpoint}/embeddings`` → float32 [n, d] in input order, with the teacher's retry,
    backoff, rate limit, timeout and per-request budget. Thread-safe; one keep-alive connection per thread.

    ``dim`` (0 = learnt from the first answer) is checked on every answer. ``stats`` counts requests
    (tries included), retries and texts."""

    def __init__(self, cfg: TeacherConfig, dim: int = 0, timeout_s: float | None = None) -> None:
        if cfg.kind != "openai":
            raise ValueError(f"a served teacher (kind='openai') is needed, got kind={cfg.kind!r}")
        self.cfg = cfg
        self.url = embeddings_url(cfg.endpoint)
        parts = urlsplit(self.url)
        self.scheme, self.netloc, self.path = parts.scheme, parts.netloc, parts.path or "/"
        self.model = cfg.served_model or cfg.model
        self.dim = dim
        self.timeout_s = timeout_s or cfg.request_timeout_s
        self.limiter = RateLimiter(cfg.requests_per_second)
        self.rng = random.Random()
        self.local = threading.local()
        self.lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "texts": 0}
        self.pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="served") \
            if cfg.concurrency > 1 else None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Texts (prompts already applied) → float32 [n, d] in input order, the requests sent concurrently."""
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        spans = plan_requests([estimate_tokens(t) for t in texts], self.cfg.max_texts_per_request,
                              self.cfg.max_tokens_per_request)
        if self.dim == 0 and len(spans) > 1:  # learn the dimension once before checking answers against it
            first = self.request(list(texts[slice(*spans[0])]))
            rest = self._map(texts, spans[1:])
            return np.concatenate([first, *rest])
        return np.concatenate(self._map(texts, spans))  # [n, d]

    def _map(self, texts: Sequence[str], spans: list[tuple[int, int]]) -> list[np.ndarray]:
        jobs = [list(texts[lo:hi]) for lo, hi in spans]
        return list(self.pool.map(self.request, jobs)) if self.pool and len(jobs) > 1 else [self.request(j) for j in jobs]

    def request(self, inputs: list[str], retry_connect: bool = True) -> np.ndarray:
        """One request with the retry rule → float32 [len(inputs), d]; ServedError when it cannot succeed.
        ``retry_connect=False`` (the probe): nothing listening fails at the first try."""
        payload = json.dumps({"input": inputs, "model": self.model, "encoding_format": "float"}).encode()
        last, after, tries = "", None, 0
        while True:
            if tries:
                time.sleep(backoff_delay(tries - 1, self.cfg.backoff_s, self.cfg.backoff_max_s, self.rng, after))
                with self.lock:
                    self.stats["retries"] += 1
            tries += 1
            try:
                answer = self._send(payload)
            except _Retry as e:
                last, after = str(e), None
                if not retry_connect and e.unreachable:
                    break
            else:
                if answer.status == 200:
                    return self._accept(answer.body, len(inputs))
                last, after = f"HTTP {answer.status}: {_error_text(answer.body)}", answer.retry_after
                if answer.status not in RETRY_STATUS and answer.status < 500:
                    raise ServedError(f"served teacher {self.url}: the request was refused with {last}",
                                      hint=_status_hint(answer.status, self.cfg))
            if tries > self.cfg.max_retries:
                break
            log.info("served teacher %s: %s; retry %d of %d", self.url, last, tries, self.cfg.max_retries)
        raise EndpointDown(f"served teacher {self.url}: no answer after {tries} tr{'ies' if tries > 1 else 'y'} "
                          f"({last})", hint="check that the server runs and is reachable from every node; finished "
                          "parts are kept, so a re-run resumes")

    def _accept(self, body: bytes, n: int) -> np.ndarray:
        out = parse_embeddings(body, n, self.dim, self.url)  # [n, d]
        with self.lock:
            self.dim = self.dim or out.shape[1]
            self.stats["texts"] += n
        return out

    def _send(self, payload: bytes) -> _Answer:
        """One POST on this thread's keep-alive connection; connection errors and timeouts raise :class:`_Retry`.
        A reused connection the server closed while idle is replaced once at no cost (not a retry)."""
        self.limiter.wait()
        with self.lock:
            self.stats["requests"] += 1
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        reused = getattr(self.local, "conn", None) is not None
        try:
            return self._post(payload, headers)
        except (OSError, http.client.HTTPException) as e:
            stale = reused and isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError))
            if not stale:
                raise _Retry.of(e, self.timeout_s) from None
        try:
            return self._post(payload, headers)
        except (OSError, http.client.HTTPException) as e:
            raise _Retry.of(e, self.timeout_s) from None

    def _post(self, payload: bytes, headers: dict[str, str]) -> _Answer:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = self.local.conn = cls(self.netloc, timeout=self.timeout_s)
        try:
            conn.request("POST", self.path, body=payload, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except BaseException:
            conn.close()
            self.local.conn = None
            raise
        if resp.getheader("Connection", "").lower() == "close":
            conn.close()
            self.local.conn = None
        return _Answer(resp.status, body, _retry_after(resp.getheader("Retry-After")))


def _os_error_text(e: BaseException, timeout_s: float) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return f"timed out after {timeout_s:g} s"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return f"{type(e).__name__}: {e}".rstrip(": ")


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return None


def _error_text(body: bytes) -> str:
    """The server's own error message (OpenAI's ``{"error": {"message": ...}}`` or the raw text), one line."""
    text = body.decode("utf-8", "replace")
    try:
        err = json.loads(text).get("error", text)
        text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        pass
    return " ".join(text.split())[:200] or "(empty body)"


def _status_hint(status: int, cfg: TeacherConfig) -> str:
    if status in (401, 403):
        return f"check the API key in ${cfg.api_key_env} (set on every node)"
    if status == 404:
        return f"check the endpoint and served_model ({cfg.served_model or cfg.model!r})"
    if status == 413:
        return "lower max_texts_per_request / max_tokens_per_request"
    return "check the served teacher's keys (docs/served_teachers.md)"


# ------------------------------------------------------------------------------------------------
# The encoder the embed actors hold, and the driver's probe
# ------------------------------------------------------------------------------------------------
class ServedEncoder:
    """:class:`raymine.encoders.Encoder`'s interface over a served endpoint: ``encode(texts, side)`` → float32
    [n, dim] (the side's prompt prepended as text, L2-normalised when ``normalize``), ``dim``,
    ``last_truncated`` (always False: truncation is the server's, unseen here).

    After one failure the encoder fails at once for the rest of its pieces: the stage is stopping anyway."""

    def __init__(self, cfg: TeacherConfig, dim: int = 0) -> None:
        self.cfg = cfg
        self.client = EmbeddingsClient(cfg, dim)
        self.prompts = {"query": cfg.query_prompt, "passage": cfg.passage_prompt}
        self.last_truncated = np.zeros(0, dtype=bool)
        self.failed: ServedError | None = None

    @property
    def dim(self) -> int:
        if not self.client.dim:
            self.client.request([PROBE_TEXT])
        return self.client.dim

    def encode(self, texts: Sequence[str], side: str) -> np.ndarray:
        if side not in self.prompts:
            raise ValueError(f"side must be 'query' or 'passage', got {side!r}")
        if self.failed is not None:
            raise self.failed
        prompt = self.prompts[side]
        try:
            emb = self.client.embed([prompt + t for t in texts] if prompt else list(texts))  # [n, d]
        except ServedError as e:
            self.failed = e
            raise
        self.last_truncated = np.zeros(len(texts), dtype=bool)
        if self.cfg.normalize and len(emb):
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb


def probe(cfg: TeacherConfig) -> int:
    """One tiny request before any work → the endpoint's embedding dimension. Nothing listening fails at
    once; a busy server (429, 5xx, timeout) gets the teacher's retries. ServedError names the endpoint."""
    client = EmbeddingsClient(cfg, timeout_s=min(cfg.request_timeout_s, PROBE_TIMEOUT_S))
    try:
        dim = client.request([PROBE_TEXT], retry_connect=False).shape[1]
    except EndpointDown as e:
        raise EndpointDown(str(e.args[0]), hint="probed before any work: start the server (or correct the "
                           "teacher's endpoint) and run again") from None
    log.info("served teacher %s (%s): answering, dimension %d", client.url, client.model, dim)
    return dim


def probe_teachers(cfg: Any, layout: Any) -> None:
    """Probe every served teacher of the run whose embeddings are not written yet, before the run starts."""
    from raymine import storage

    for name in cfg.teachers:
        t = cfg.teacher(name)
        if t.kind == "openai" and not storage.exists(storage.join(layout.embed(name), storage.MANIFEST)):
            probe(t)


# ------------------------------------------------------------------------------------------------
# The Ray step
# ------------------------------------------------------------------------------------------------
class ServedPieces(EmbedPieces):
    """:class:`raymine.embed.EmbedPieces` with a :class:`ServedEncoder`: same pieces, same parts; a
    :class:`ServedError` comes back as data (``error`` column) for the driver to raise once."""

    def __init__(self, teacher: TeacherConfig, inputs: Sequence[EmbedInput], threads: int, dim: int = 0) -> None:
        self.t_init = time.time()
        self.encoder = ServedEncoder(teacher, dim)  # type: ignore[assignment]
        self.inputs = list(inputs)
        self.out_dtype = np.float16 if teacher.storage_dtype == "float16" else np.float32
        self.storage_dtype = teacher.storage_dtype
        self.t_ready = time.time()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["part"])
        try:
            out = super().__call__(batch)
            out["error"] = np.array([""] * n, dtype=object)
            return out
        except ServedError as e:
            zeros = np.zeros(n, np.int64)
            return {"input": batch["input"], "part": batch["part"], "rows": zeros, "truncated": zeros,
                    "busy_s": np.zeros(n), "actor": np.full(n, os.getpid(), np.int64),
                    "node": np.array([socket.gethostname()] * n, dtype=object), "t_init": np.full(n, self.t_init),
                    "t_ready": np.full(n, self.t_ready), "error": np.array([str(e)] * n, dtype=object)}


def raise_piece_errors(batch: dict[str, np.ndarray]) -> None:
    """Raise the first failure a served-teacher actor returned as data (one line, no worker traceback)."""
    for message in batch.get("error", ()):
        if message:
            raise ServedError(str(message))


__all__ = ["EmbeddingsClient", "EndpointDown", "RateLimiter", "ServedEncoder", "ServedError", "ServedPieces",
           "backoff_delay", "embeddings_url", "estimate_tokens", "key_config", "parse_embeddings", "plan_requests",
           "probe", "probe_teachers", "raise_piece_errors"]
