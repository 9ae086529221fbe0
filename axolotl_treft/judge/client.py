"""OpenAI-compatible ``/chat/completions`` client for the judge: retries, rate limits, cache, preflight.

Only transport errors and HTTP errors (status codes, malformed bodies, missing logprobs) become failed
verdicts; anything else is a bug and propagates.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import httpx
import tenacity
from tqdm.auto import tqdm

from .cache import JudgeCache
from .config import JudgeConfig, JudgeConfigError, resolve_config
from .prompts import PROMPTS, YESNO_METRICS
from .scoring import Verdict, aggregate_0_100, looks_digit_split, parse_sampled, yes_probability

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429})
MAX_RETRY_AFTER = 120.0


class JudgeHTTPError(RuntimeError):
    """The endpoint answered with an error status or an unusable body."""

    def __init__(self, msg: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(msg)
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in RETRY_STATUS or self.status >= 500


class JudgeResponseError(JudgeHTTPError):
    """HTTP 200 with a body the judge cannot use (malformed JSON, no logprobs when they are required)."""


JUDGE_CALL_ERRORS = (JudgeHTTPError, httpx.HTTPError)  # absorbed as failed verdicts; nothing else is


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (a number or an HTTP date); None when absent or unparsable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True)
class JudgeItem:
    """One judge call: ``metric`` scored with ``template`` (default: our prompt of that name)."""

    metric: str
    question: str
    answer: str
    context: str = ""
    template: str = ""

    @property
    def prompt_template(self) -> str:
        return self.template or PROMPTS[self.metric]

    @property
    def yesno(self) -> bool:
        return self.metric in YESNO_METRICS


class JudgeClient:
    """Scores :class:`JudgeItem` s concurrently against ``config``; verdicts go to the sqlite cache."""

    def __init__(self, config: JudgeConfig, cache: JudgeCache | None = None):
        self.config = config
        self.cache = (
            cache if cache is not None else (JudgeCache(config.cache_path) if config.cache_path else None)
        )
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        limits = httpx.Limits(
            max_connections=config.concurrency, max_keepalive_connections=config.concurrency
        )
        self._http = httpx.Client(headers=headers, timeout=config.timeout, limits=limits)
        self._logprobs_supported = config.mode != "sampled"
        self._lock = threading.Lock()
        self._pause_until = 0.0  # a 429 with Retry-After pauses every worker, not just the one that got it
        self.requests_made = 0
        self.rate_limited = 0

    # -- HTTP
    def _wait_for_gate(self) -> None:
        while (delay := self._pause_until - time.monotonic()) > 0:
            time.sleep(delay)

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        self._wait_for_gate()
        with self._lock:
            self.requests_made += 1
        r = self._http.post(f"{self.config.base_url}/chat/completions", json=payload)
        if r.status_code >= 400:
            retry_after = retry_after_seconds(r.headers.get("retry-after"))
            if r.status_code == 429:
                with self._lock:
                    self.rate_limited += 1
                    if retry_after:
                        self._pause_until = max(
                            self._pause_until, time.monotonic() + min(retry_after, MAX_RETRY_AFTER)
                        )
            raise JudgeHTTPError(f"HTTP {r.status_code}: {r.text[:300]}", r.status_code, retry_after)
        try:
            choice = r.json()["choices"][0]
            if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
                raise TypeError("no message")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise JudgeResponseError(f"malformed response body: {r.text[:200]!r}") from e
        return choice

    def _post_retrying(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``retries`` attempts on transport errors, 408/409/5xx and malformed bodies; HTTP 429 is retried
        (honouring ``Retry-After``) until ``rate_limit_wait`` seconds have passed."""
        failures = Counter()
        backoff = tenacity.wait_exponential(multiplier=self.config.backoff, max=30.0) + tenacity.wait_random(
            0, self.config.backoff
        )

        def stop(state: tenacity.RetryCallState) -> bool:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, JudgeHTTPError) and exc.status == 429:
                return state.seconds_since_start >= self.config.rate_limit_wait
            failures["other"] += 1
            return failures["other"] >= self.config.retries

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            ra = getattr(exc, "retry_after", None)
            return min(ra, MAX_RETRY_AFTER) if ra is not None else backoff(state)

        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, httpx.TransportError) or (
                isinstance(exc, JudgeHTTPError) and exc.retryable
            )

        retrying = tenacity.Retrying(
            stop=stop, wait=wait, retry=tenacity.retry_if_exception(retryable), reraise=True
        )
        return retrying(self._post, payload)

    # -- one item
    def _judge(self, item: JudgeItem) -> Verdict:
        prompt = item.prompt_template.format(question=item.question, answer=item.answer, context=item.context)
        base = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "seed": 0,
        }
        if self._logprobs_supported:
            choice = self._post_retrying(
                base | {"max_tokens": 1, "logprobs": True, "top_logprobs": self.config.top_logprobs}
            )
            content = (choice.get("logprobs") or {}).get("content") or []
            top = content[0].get("top_logprobs") if content and isinstance(content[0], dict) else None
            if top:
                v = yes_probability(top) if item.yesno else aggregate_0_100(top)
                split = not item.yesno and v.label == "number" and looks_digit_split(top)
                if self.config.mode == "logprob" or (v.score is not None and not split):
                    return v
                if v.label in {"refusal", "code"}:
                    return v
            elif self.config.mode == "logprob":
                raise JudgeResponseError("the endpoint returned no logprobs (judge mode logprob)")
            else:
                self._logprobs_supported = False  # endpoint-level property: skip the logprob call from now on
                log.warning("judge endpoint returned no logprobs; parsing sampled numbers instead")
        choice = self._post_retrying(base | {"max_tokens": self.config.sample_tokens})
        return parse_sampled(str(choice["message"].get("content") or ""), yesno=item.yesno)

    def cache_key(self, item: JudgeItem) -> str:
        c = self.config
        return JudgeCache.key(
            c.base_url,
            c.model,
            c.mode,
            item.prompt_template,
            item.metric,
            item.question,
            item.answer,
            item.context,
        )

    def cached(self, item: JudgeItem) -> Verdict | None:
        if self.cache is None or (hit := self.cache.get(self.cache_key(item))) is None:
            return None
        return Verdict(**(hit | {"source": "cache"}))

    def score(self, item: JudgeItem) -> Verdict:
        """The cached verdict, or a new one; a call failing after its retries gives an ``error`` one."""
        if (hit := self.cached(item)) is not None:
            return hit
        try:
            v = self._judge(item)
        except JUDGE_CALL_ERRORS as e:
            return Verdict(None, "error", error=f"{type(e).__name__}: {e}")
        if self.cache is not None:
            self.cache.put(self.cache_key(item), v.to_json())
        return v

    def score_many(self, items: Sequence[JudgeItem], desc: str = "judge") -> list[Verdict]:
        """Score concurrently (``config.concurrency`` threads) with a progress bar; order is kept."""
        out: list[Verdict | None] = [None] * len(items)
        with (
            ThreadPoolExecutor(max_workers=self.config.concurrency) as pool,
            tqdm(total=len(items), desc=desc, disable=not items) as bar,
        ):
            futures = {pool.submit(self.score, it): i for i, it in enumerate(items)}
            for fut in as_completed(futures):
                out[futures[fut]] = fut.result()
                bar.update(1)
        verdicts = [v for v in out if v is not None]
        errors = Counter(v.error for v in verdicts if v.label == "error")
        if errors:
            reasons = "; ".join(f"{n}x {e}" for e, n in errors.most_common(3))
            log.warning(
                "%s: %d of %d judge calls to %s (model %s) failed after retries: %s. Their answers have no "
                "score (judge_errors); rerun, or re-judge the saved samples with `axolotl-treft judge`.",
                desc,
                sum(errors.values()),
                len(items),
                self.config.base_url,
                self.config.model,
                reasons,
            )
        return verdicts

    def close(self) -> None:
        self._http.close()
        if self.cache is not None:
            self.cache.close()


_CLIENTS: dict[JudgeConfig, JudgeClient] = {}
_PREFLIGHT_OK: set[tuple[str, str, str]] = set()
_CLIENTS_LOCK = threading.Lock()


def get_client(config: JudgeConfig | None = None) -> JudgeClient:
    """Process-wide client for ``config`` (default: from the environment)."""
    config = config or resolve_config()
    with _CLIENTS_LOCK:
        if config not in _CLIENTS:
            _CLIENTS[config] = JudgeClient(config)
        return _CLIENTS[config]


PROBE = JudgeItem("coherent", "What is two plus two?", "Two plus two is four.")


def _served_models(config: JudgeConfig) -> list[str] | None:
    """Model ids from ``GET /models``; None when the endpoint has no usable listing."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    try:
        r = httpx.get(f"{config.base_url}/models", headers=headers, timeout=min(config.timeout, 15.0))
    except httpx.HTTPError as e:
        raise JudgeConfigError(
            f"cannot reach the judge endpoint {config.base_url} ({type(e).__name__}: {e}); check the judge "
            "base_url (metadata judge.base_url or TREFT_JUDGE_BASE_URL)"
        ) from e
    if r.status_code in (401, 403):
        raise JudgeConfigError(
            f"judge endpoint {config.base_url} rejected the API key (HTTP {r.status_code})"
        )
    if r.status_code != 200:
        return None
    try:
        return [str(m.get("id")) for m in r.json().get("data", [])] or None
    except (ValueError, AttributeError):
        return None


def preflight(config: JudgeConfig, probe: JudgeItem = PROBE, client: JudgeClient | None = None) -> Verdict:
    """Raise :class:`JudgeConfigError` unless the endpoint serves ``config.model`` and answers one judge call
    (``probe``); return that call's verdict."""
    served = _served_models(config)
    if served is not None and config.model not in served:
        raise JudgeConfigError(
            f"judge model {config.model!r} is not served by {config.base_url} (it serves: "
            f"{', '.join(served[:10])}); set the judge model to one of these"
        )
    own = client is None
    client = client or JudgeClient(config, cache=None)
    try:
        return client._judge(probe)
    except httpx.HTTPError as e:
        raise JudgeConfigError(
            f"cannot reach the judge endpoint {config.base_url} ({type(e).__name__}: {e})"
        ) from e
    except JudgeHTTPError as e:
        hint = {
            404: f"the base_url is wrong or the model {config.model!r} is not served there",
            401: "the API key was rejected",
            403: "the API key was rejected",
            400: "the endpoint rejected the judge request (a model that refuses max_tokens/logprobs?)",
        }.get(e.status or 0, "it kept failing after its retries")
        if isinstance(e, JudgeResponseError):
            hint = (
                "set the judge mode to auto or sampled"
                if "logprobs" in str(e)
                else "is it OpenAI-compatible?"
            )
        raise JudgeConfigError(
            f"the judge endpoint {config.base_url}/chat/completions failed a test call with model "
            f"{config.model!r}: {e} ({hint})"
        ) from e
    finally:
        if own:
            client.close()


def require_judge(env: Mapping[str, str] | None = None, *, config: JudgeConfig | None = None) -> JudgeConfig:
    """The resolved judge config, checked once per process (endpoint, model, mode) unless preflight is off."""
    config = config or resolve_config(None, env)
    key = (config.base_url, config.model, config.mode)
    if config.preflight and key not in _PREFLIGHT_OK:
        preflight(config)
        _PREFLIGHT_OK.add(key)
    return config
