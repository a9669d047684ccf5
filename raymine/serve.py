"""A small OpenAI-compatible embeddings server: ``python -m raymine.serve --model PATH --port N``.

Serves one dense model through raymine's own :class:`raymine.encoders.Encoder` (CPU or GPU) with the routes a
served teacher uses: ``POST /v1/embeddings`` (``input`` a string or a list of strings, ``model``,
``encoding_format`` float or base64; OpenAI's answer shape with ``usage``), ``GET /v1/models`` and
``GET /health``. For local trials of ``kind: openai`` teachers and for the tests, which check the served teacher
against a real server process; for production serving use vLLM, TEI, Infinity or NIM.

Texts are encoded as given (the client prepends its prompts), as passages without a prompt, so a served text's
vector equals the in-process teacher's vector of the same text with no prompt. Requests are encoded one at a
time (a lock: the tokenizer is not thread-safe), connections are served by threads, with HTTP/1.1 keep-alive.
``--port 0`` takes a free port; the line ``serving MODEL on http://HOST:PORT/v1`` on stdout says which.

``--request-log FILE`` appends one JSON line per embeddings request (status, input count, a hash of each
input, start and end times) and ``--test-hooks`` enables ``POST /_raymine/faults`` to make the server refuse
or fail the next requests, answer in reversed order, or exit after N more requests — fault injection for tests.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


class EmbeddingService:
    """The model and the server's state: request counter, faults to inject, request log."""

    def __init__(self, args: argparse.Namespace) -> None:
        from raymine.config import TeacherConfig
        from raymine.encoders import Encoder

        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        cfg = TeacherConfig(model=args.model, pooling=args.pooling, normalize=not args.no_normalize,
                            passage_max_length=args.max_length, query_max_length=args.max_length,
                            batch_size=args.batch_size, device=args.device, trust_remote_code=args.trust_remote_code)
        self.encoder = Encoder(cfg)
        self.name = args.served_model_name or args.model
        self.api_key = args.api_key or os.environ.get("RAYMINE_SERVE_API_KEY", "")
        self.request_log = args.request_log
        self.test_hooks = args.test_hooks
        self.faults: dict[str, Any] = {}
        self.served = 0
        self.model_lock = threading.Lock()
        self.state_lock = threading.Lock()

    def embed(self, texts: list[str]) -> tuple[Any, int]:
        """Texts → (float32 [n, d], prompt tokens counted by the model's tokenizer)."""
        with self.model_lock:
            emb = self.encoder.encode(texts, "passage")  # [n, d] float32
            tokens = sum(len(r) for r in self.encoder.bi.tokenize_rows(texts, "passage").rows)
        return emb, tokens

    def fault(self) -> tuple[int, float | None]:
        """Count one embeddings request; (status to answer instead, Retry-After) when a fault is armed."""
        with self.state_lock:
            self.served += 1
            if self.faults.get("fail_next", 0) > 0:
                self.faults["fail_next"] -= 1
                return int(self.faults.get("status", 503)), self.faults.get("retry_after")
        return 0, None

    def exit_due(self) -> bool:
        """True once ``exit_after`` more requests have been answered (the server then dies, as in a crash)."""
        with self.state_lock:
            left = self.faults.get("exit_after")
            if left is None:
                return False
            self.faults["exit_after"] = left - 1
            return left - 1 <= 0

    def log_request(self, record: dict[str, Any]) -> None:
        if not self.request_log:
            return
        with self.state_lock, open(self.request_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def text_hash(text: str) -> str:
    """The short hash of one input in the request log (a test matches requested texts without storing them)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class Handler(BaseHTTPRequestHandler):
    """The OpenAI routes over :class:`EmbeddingService` (``server.service``)."""

    protocol_version = "HTTP/1.1"
    server_version = "raymine-serve"

    @property
    def service(self) -> EmbeddingService:
        return self.server.service  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s " + format, self.address_string(), *args)

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._json(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"null")

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._json(200, {"status": "ok"})
        elif self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.service.name, "object": "model",
                                                         "owned_by": "raymine"}]})
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:
        path = self.path.rstrip("/")
        if path in ("/v1/embeddings", "/embeddings"):
            self._embeddings()
        elif path == "/_raymine/faults" and self.service.test_hooks:
            body = self._body()
            with self.service.state_lock:
                self.service.faults = dict(body or {})
            self._json(200, {"faults": self.service.faults, "served": self.service.served})
        else:
            self._error(404, f"no route POST {self.path}")

    def _embeddings(self) -> None:
        t0 = time.time()
        status, record = self._answer_embeddings()
        record.update(status=status, t0=t0, t1=time.time())
        self.service.log_request(record)
        if status == 200 and self.service.exit_due():
            sys.stdout.flush()
            os._exit(3)  # a crash: no goodbye to the clients whose requests are in flight

    def _answer_embeddings(self) -> tuple[int, dict[str, Any]]:
        svc = self.service
        try:
            body = self._body()
        except ValueError:
            self._error(400, "the body is not JSON")
            return 400, {"n": 0}
        status, retry_after = svc.fault()
        if status:
            self._error(status, "injected fault", {"Retry-After": str(retry_after)} if retry_after is not None else None)
            return status, {"n": 0}
        key = svc.faults.get("api_key", svc.api_key)
        if key and self.headers.get("Authorization", "") != f"Bearer {key}":
            self._error(401, "invalid API key")
            return 401, {"n": 0}
        if not isinstance(body, dict):
            self._error(400, "the body must be a JSON object")
            return 400, {"n": 0}
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            self._error(400, "'input' must be a string or a non-empty list of strings (token ids are not supported)")
            return 400, {"n": 0}
        if body.get("model") not in (None, svc.name):
            self._error(404, f"the model {body.get('model')!r} does not exist (this server serves {svc.name!r})")
            return 404, {"n": len(texts)}
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            self._error(400, f"encoding_format {fmt!r}: use 'float' or 'base64'")
            return 400, {"n": len(texts)}
        try:
            emb, tokens = svc.embed(texts)
        except ValueError as e:  # an empty text
            self._error(400, str(e))
            return 400, {"n": len(texts)}
        order = range(len(texts) - 1, -1, -1) if svc.faults.get("reverse") else range(len(texts))
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(emb[i].astype("<f4").tobytes()).decode() if fmt == "base64"
                 else emb[i].tolist()} for i in order]
        self._json(200, {"object": "list", "data": data, "model": svc.name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return 200, {"n": len(texts), "texts": [text_hash(t) for t in texts]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raymine.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model folder or name (all-MiniLM-L6-v2: the packaged one)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 = a free one, printed on stdout)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 = every interface)")
    p.add_argument("--served-model-name", default="", help="the name requests must give as 'model' (default: --model)")
    p.add_argument("--api-key", default="", help="require 'Authorization: Bearer KEY' (or $RAYMINE_SERVE_API_KEY)")
    p.add_argument("--pooling", default="mean", choices=("mean", "cls", "last_token"), help="pooling of the model")
    p.add_argument("--no-normalize", action="store_true", help="return vectors without L2 normalisation")
    p.add_argument("--max-length", type=int, default=512, help="tokens per text; longer texts are truncated")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'auto'")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model repos that ship their own code")
    p.add_argument("--request-log", default="", help="append one JSON line per embeddings request to this file")
    p.add_argument("--test-hooks", action="store_true", help="enable POST /_raymine/faults (fault injection, tests)")
    return p


def serve(args: argparse.Namespace) -> None:
    """Load the model, bind, print the base URL, serve until interrupted."""
    service = EmbeddingService(args)
    httpd = ThreadingHTTPServer((args.host, args.port), Handler)
    httpd.daemon_threads = True
    httpd.service = service  # type: ignore[attr-defined]
    host, port = httpd.server_address[:2]
    print(f"serving {service.name} on http://{host}:{port}/v1", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("RAYMINE_LOG", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
