"""Where and how to call the judge: settings from lm-eval metadata (``"judge": {...}``), env vars as fallback.

| setting | metadata key | environment | default |
|---|---|---|---|
| endpoint | ``base_url`` | ``TREFT_JUDGE_BASE_URL`` | ``https://api.openai.com/v1`` |
| model | ``model`` | ``TREFT_JUDGE_MODEL`` | required |
| API key | ``api_key_env`` (the *name* of a variable) | ``TREFT_JUDGE_API_KEY``, ``OPENAI_API_KEY`` | none |
| concurrent requests | ``concurrency`` | ``TREFT_JUDGE_CONCURRENCY`` | 8 |
| request timeout (s) | ``timeout`` | ``TREFT_JUDGE_TIMEOUT`` | 60 |
| attempts per call | ``retries`` | ``TREFT_JUDGE_RETRIES`` | 6 |
| first backoff (s) | ``backoff`` | ``TREFT_JUDGE_BACKOFF`` | 1 |
| longest total wait on HTTP 429 (s) | ``rate_limit_wait`` | ``TREFT_JUDGE_RATE_LIMIT_WAIT`` | 600 |
| scoring | ``mode``: ``auto`` / ``logprob`` / ``sampled`` | ``TREFT_JUDGE_MODE`` | ``auto`` |
| verdict cache | ``cache`` (path, ``off``) | ``TREFT_JUDGE_CACHE`` | ``~/.cache/axolotl-treft/judge.sqlite``|
| check before generating | ``preflight`` | ``TREFT_JUDGE_PREFLIGHT`` | on |

The key itself is only ever read from the environment: metadata is written into lm-eval's results.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_CACHE = "~/.cache/axolotl-treft/judge.sqlite"
MODES = {
    "auto": "auto",
    "logprob": "logprob",
    "logprobs": "logprob",
    "sampled": "sampled",
    "sample": "sampled",
}
KEY_VARS = ("TREFT_JUDGE_API_KEY", "OPENAI_API_KEY")
OFF = {"0", "false", "no", "off", "none"}


class JudgeConfigError(RuntimeError):
    """The judge is not configured, not reachable or not serving the model (raised before generation)."""


@dataclass(frozen=True)
class JudgeConfig:
    """Resolved judge settings. ``api_key`` never appears in ``repr`` or in :meth:`record`."""

    model: str
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str | None = None
    concurrency: int = 8
    timeout: float = 60.0
    retries: int = 6
    backoff: float = 1.0
    rate_limit_wait: float = 600.0
    mode: str = "auto"
    cache_path: str | None = None
    preflight: bool = True
    top_logprobs: int = 20
    sample_tokens: int = 16

    def __post_init__(self) -> None:
        mode = MODES.get(str(self.mode).strip().lower())
        if mode is None:
            raise JudgeConfigError(f"judge mode must be auto, logprob or sampled, got {self.mode!r}")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "base_url", self.base_url.strip().rstrip("/"))
        if self.concurrency < 1 or self.retries < 1:
            raise JudgeConfigError("judge concurrency and retries must be >= 1")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JudgeConfig:
        """Settings from the environment only (the fallback of :func:`resolve_config`)."""
        return resolve_config(None, env)

    def record(self) -> dict[str, Any]:
        """Non-secret settings: what the results and sample logs show, and what :func:`from_record` reads."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_key"}

    def info(self) -> dict[str, str]:
        from .prompts import prompt_hash

        return {
            "judge_model": self.model,
            "judge_base_url": self.base_url,
            "judge_prompt_hash": prompt_hash(),
        }


METADATA_KEYS = {
    "base_url": ("TREFT_JUDGE_BASE_URL", str),
    "model": ("TREFT_JUDGE_MODEL", str),
    "api_key_env": (None, str),
    "concurrency": ("TREFT_JUDGE_CONCURRENCY", int),
    "timeout": ("TREFT_JUDGE_TIMEOUT", float),
    "retries": ("TREFT_JUDGE_RETRIES", int),
    "backoff": ("TREFT_JUDGE_BACKOFF", float),
    "rate_limit_wait": ("TREFT_JUDGE_RATE_LIMIT_WAIT", float),
    "mode": ("TREFT_JUDGE_MODE", str),
    "cache": ("TREFT_JUDGE_CACHE", str),
    "preflight": ("TREFT_JUDGE_PREFLIGHT", str),
}


def _convert(name: str, value: Any, kind: type, source: str) -> Any:
    if kind is str:
        return str(value).strip()
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise JudgeConfigError(f"{source}: judge {name} must be a {kind.__name__}, got {value!r}") from e


def _settings_mapping(settings: Any) -> Mapping[str, Any]:
    if settings is None:
        return {}
    if isinstance(settings, str):  # `--metadata` on lm-eval 0.4.13 may pass nested JSON as a string
        try:
            settings = json.loads(settings)
        except json.JSONDecodeError as e:
            raise JudgeConfigError(f"metadata 'judge' must be a JSON object, got {settings!r}") from e
    if not isinstance(settings, Mapping):
        raise JudgeConfigError(f"metadata 'judge' must be a mapping, got {type(settings).__name__}")
    if "api_key" in settings:
        raise JudgeConfigError(
            "metadata 'judge' must not hold the API key (lm-eval writes metadata into the results JSON): "
            'export TREFT_JUDGE_API_KEY, or name the variable that holds it with "api_key_env"'
        )
    unknown = sorted(set(settings) - set(METADATA_KEYS))
    if unknown:
        raise JudgeConfigError(
            f"unknown judge setting(s) {unknown} in metadata 'judge'; known: {sorted(METADATA_KEYS)}"
        )
    return settings


def resolve_config(settings: Any = None, env: Mapping[str, str] | None = None) -> JudgeConfig:
    """Judge settings: each ``settings`` (metadata ``judge``) key wins over its env var, then the default."""
    env = os.environ if env is None else env
    settings = _settings_mapping(settings)
    values: dict[str, Any] = {}
    for name, (var, kind) in METADATA_KEYS.items():
        source = (
            "metadata judge." + name
            if settings.get(name) not in (None, "")
            else var
            if var and env.get(var)
            else None
        )
        if source is None:
            continue
        values[name] = _convert(
            name, settings[name] if source.startswith("metadata") else env[var], kind, source
        )
        if name == "mode" and values[name].lower() not in MODES:
            raise JudgeConfigError(
                f"{source}: judge mode must be auto, logprob or sampled, got {values[name]!r}"
            )
    model = values.get("model", "")
    if not model:
        raise JudgeConfigError(
            "The LLM judge is not configured: pass --metadata "
            '\'{"judge": {"base_url": URL, "model": NAME}}\' '
            "or set TREFT_JUDGE_MODEL (and TREFT_JUDGE_BASE_URL for a non-OpenAI endpoint), e.g.\n"
            "  export TREFT_JUDGE_BASE_URL=http://127.0.0.1:8000/v1 TREFT_JUDGE_MODEL=my-judge\n"
            "The em_* tasks (and offtopic_* with judge_check) need it."
        )
    key_env = values.get("api_key_env")
    if key_env and not env.get(key_env):
        raise JudgeConfigError(
            f"judge api_key_env names {key_env!r}, but that environment variable is not set"
        )
    key = env.get(key_env) if key_env else next((env[v] for v in KEY_VARS if env.get(v)), None)
    base_url = values.get("base_url") or DEFAULT_BASE_URL
    if base_url.rstrip("/") == DEFAULT_BASE_URL and not key:
        raise JudgeConfigError(
            f"judge model {model!r} points at {DEFAULT_BASE_URL} but no API key is set: export "
            "TREFT_JUDGE_API_KEY (or OPENAI_API_KEY), or set the judge base_url to your server."
        )
    cache = values.get("cache")
    if cache is None or cache == "":
        cache = str(Path(DEFAULT_CACHE).expanduser())
    elif cache.lower() in OFF:
        cache = None
    else:
        cache = str(Path(cache).expanduser())
    preflight = str(values.get("preflight", "1")).lower() not in OFF
    return JudgeConfig(
        model=model,
        base_url=base_url,
        api_key=key,
        api_key_env=key_env,
        concurrency=values.get("concurrency", 8),
        timeout=values.get("timeout", 60.0),
        retries=values.get("retries", 6),
        backoff=values.get("backoff", 1.0),
        rate_limit_wait=values.get("rate_limit_wait", 600.0),
        mode=values.get("mode", "auto"),
        cache_path=cache,
        preflight=preflight,
    )


def from_record(record: Mapping[str, Any], env: Mapping[str, str] | None = None) -> JudgeConfig:
    """Rebuild a config from :meth:`JudgeConfig.record` (the key is read from the environment again)."""
    env = os.environ if env is None else env
    key_env = record.get("api_key_env")
    key = env.get(key_env) if key_env else next((env[v] for v in KEY_VARS if env.get(v)), None)
    known = {f.name for f in fields(JudgeConfig)} - {"api_key"}
    return JudgeConfig(**{k: v for k, v in record.items() if k in known}, api_key=key)
