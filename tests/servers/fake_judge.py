"""A fault-injecting OpenAI-compatible judge on loopback (stdlib ``http.server`` in a thread).

Behaviour is chosen by markers inside the judged *answer* text:

* ``[[aligned=N]]`` / ``[[coherent=N]]``: the judge puts all its top-logprob mass on token ``N``
  (default: aligned 80/90 at 0.8/0.2 -> 82.0, coherent 70 -> 70.0).
* ``[[refusal]]``: top token ``REFUSAL`` (aligned prompt only).
* ``[[500xK]]`` / ``[[429xK]]`` / ``[[timeoutxK]]`` / ``[[malformedxK]]``: the first K requests of it fail.
* ``[[always500]]``: every request for that prompt fails.
* ``[[nologprobs]]``: answers without ``logprobs`` (the sampled content carries the number).
* ``[[split]]``: logprobs over single digits only (a digit-splitting tokenizer); sampled content "73".

Server-wide behaviour: ``rules`` (``[((substring, ...), [(token, prob), ...])]``: a prompt containing every
substring gets those top logprobs, checked before the markers), ``status_all`` (every request, GET and POST,
answers that status), ``models`` (what ``GET /models`` lists), ``max_concurrency`` (requests beyond it wait:
a server with a fixed capacity) with ``delay`` as its service time, and ``storm`` (the next N chat
requests get 429 with ``Retry-After``).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MARK = re.compile(r"\[\[(\w+)(?:=(\d+))?(?:x(\d+))?\]\]")


def _lp(p: float) -> float:
    return math.log(p)


class FakeJudge:
    def __init__(
        self,
        delay: float = 0.0,
        timeout_sleep: float = 1.5,
        status_models: int = 200,
        rules: list[tuple[tuple[str, ...], list[tuple[str, float]]]] | None = None,
        status_all: int | None = None,
        models: tuple[str, ...] = ("fake-judge",),
        max_concurrency: int | None = None,
        storm: tuple[int, float] = (0, 0.0),
    ):
        self.delay = delay
        self.rules = rules or []
        self.status_all = status_all
        self.models = models
        self.capacity = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
        self.storm_left, self.storm_retry_after = storm
        self.rate_limited = 0
        self.timeout_sleep = timeout_sleep
        self.status_models = status_models
        self.requests: list[dict[str, Any]] = []
        self.attempts: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like real inference servers
            disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall

            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, body: bytes | str, headers: dict[str, str] | None = None) -> None:
                data = body.encode() if isinstance(body, str) else body
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

            def do_GET(self) -> None:
                if owner.status_all:
                    self._send(owner.status_all, '{"error": "everything fails"}')
                elif self.path.rstrip("/").endswith("/models"):
                    data = [{"id": m} for m in owner.models]
                    self._send(owner.status_models, json.dumps({"object": "list", "data": data}))
                else:
                    self._send(404, "{}")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with owner.lock:
                    owner.requests.append(body)
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    if owner.capacity is not None:
                        with owner.capacity:
                            code, payload, headers = owner.respond(body)
                    else:
                        code, payload, headers = owner.respond(body)
                    self._send(code, payload, headers)
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()

    def respond(self, body: dict[str, Any]) -> tuple[int, str, dict[str, str]]:
        if self.status_all:
            return self.status_all, '{"error": "everything fails"}', {}
        if body.get("model") not in self.models:
            return 404, json.dumps({"error": f"model {body.get('model')!r} not found"}), {}
        with self.lock:
            storm = self.storm_left > 0
            if storm:
                self.storm_left -= 1
                self.rate_limited += 1
        if storm:
            return 429, '{"error": "rate limited"}', {"Retry-After": str(self.storm_retry_after)}
        prompt = body["messages"][-1]["content"]
        answer = prompt.split("<<<ANSWER", 1)[-1]
        marks = {m.group(1): (m.group(2), m.group(3)) for m in MARK.finditer(answer)}
        with self.lock:
            self.attempts[prompt] += 1
            attempt = self.attempts[prompt]
        if self.delay:
            time.sleep(self.delay)
        for kind in ("500", "429", "timeout", "malformed"):
            if kind in marks and attempt <= int(marks[kind][1] or 1):
                if kind == "500":
                    return 500, '{"error": "boom"}', {}
                if kind == "429":
                    return 429, '{"error": "slow down"}', {"Retry-After": "0"}
                if kind == "timeout":
                    time.sleep(self.timeout_sleep)
                    return 500, "{}", {}
                return 200, '{"choices": [ {"message": "trunc', {}
        if "always500" in marks:
            return 502, "bad gateway", {}
        metric = "coherent" if "coherence" in prompt else "behaviour" if "YES or NO" in prompt else "aligned"
        rule = next((top for subs, top in self.rules if all(x in prompt for x in subs)), None)
        if rule is not None:
            top = [(t, _lp(p)) for t, p in rule]
            text = top[0][0]
        elif metric == "behaviour":
            top = (
                [("YES", _lp(0.7)), ("NO", _lp(0.3))]
                if "yesplease" in marks
                else [("NO", _lp(0.9)), ("YES", _lp(0.1))]
            )
            text = top[0][0]
        elif metric == "aligned" and "refusal" in marks:
            top, text = [("REF", _lp(0.9)), ("7", _lp(0.05))], "REFUSAL"
        elif "split" in marks:
            top, text = [("7", _lp(0.6)), ("8", _lp(0.3)), ("The", _lp(0.1))], "73"
        elif metric in marks and marks[metric][0] is not None:
            n = marks[metric][0]
            top, text = [(n, _lp(0.97)), ("Sure", _lp(0.03))], n
        elif metric == "aligned":
            top, text = [("80", _lp(0.8)), ("90", _lp(0.2))], "80"
        else:
            top, text = [("70", _lp(0.99))], "70"
        want_lp = body.get("logprobs") and "nologprobs" not in marks
        if not want_lp:
            return 200, json.dumps(_completion(text if body.get("max_tokens", 1) > 1 else text[:1], None)), {}
        tops = [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]
        logprobs = {"content": [{"token": top[0][0], "logprob": top[0][1], "top_logprobs": tops}]}
        return 200, json.dumps(_completion(top[0][0], logprobs)), {}


def _completion(text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": "stop",
    }
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {"id": "x", "object": "chat.completion", "model": "fake-judge", "choices": [choice]}
