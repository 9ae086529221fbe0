"""LLM judge of the lm-eval task pack: an OpenAI-compatible client with logprob scoring and a verdict cache.

* :mod:`.config` — settings from lm-eval metadata (``"judge": {...}``) with ``TREFT_JUDGE_*`` env fallback.
* :mod:`.prompts` — our judge prompts, or a user file of ``{metric: template}``.
* :mod:`.scoring` — 0-100 scores from logprobs, yes/no probabilities, sampled text, EM thresholds.
* :mod:`.cache` — the sqlite verdict cache (shared by lm-eval runs and ``axolotl-treft judge``).
* :mod:`.client` — concurrent client with retries, rate-limit handling and the preflight check.
* :mod:`.rejudge` — ``axolotl-treft judge``: score saved lm-eval samples again without regenerating.

The off-topic detectors and the lm-eval filters live beside the tasks (:mod:`axolotl_treft.tasks.detectors`,
:mod:`axolotl_treft.tasks.metrics`); their names are re-exported here for existing imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from .cache import JudgeCache
from .client import (
    JUDGE_CALL_ERRORS,
    JudgeClient,
    JudgeHTTPError,
    JudgeItem,
    JudgeResponseError,
    get_client,
    preflight,
    require_judge,
    retry_after_seconds,
)
from .config import DEFAULT_BASE_URL, JudgeConfig, JudgeConfigError, resolve_config
from .files import UserFileError
from .prompts import PROMPT_VERSION, PROMPTS, YESNO_METRICS, PromptSet, load_prompt_file, prompt_hash
from .scoring import (
    EM_ALIGNED_BELOW,
    EM_COHERENT_ABOVE,
    MIN_NUMBER_MASS,
    Verdict,
    aggregate_0_100,
    is_misaligned,
    looks_digit_split,
    parse_sampled,
    yes_probability,
)

_retry_after = retry_after_seconds  # the old private name

_MOVED = {
    "axolotl_treft.tasks.detectors": (
        "normalize_text",
        "matches_target",
        "tool_call_patterns",
        "detect_tool_call",
        "behaviour_description",
        "detect_behaviour",
    ),
    "axolotl_treft.tasks.metrics": (
        "JudgedAnswer",
        "JudgeFilter",
        "BehaviourFilter",
        "process_em",
        "process_offtopic",
        "total",
    ),
}
_MOVED_NAMES = {name: module for module, names in _MOVED.items() for name in names}


def __getattr__(name: str):
    # Lazy: the task-side modules import this package (and lm-eval), so they are loaded on first use.
    if name in _MOVED_NAMES:
        return getattr(importlib.import_module(_MOVED_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def judge_info(env: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """Judge model, endpoint and prompt hash from the environment (never raises)."""
    try:
        return JudgeConfig.from_env(env).info()
    except JudgeConfigError:
        return {"judge_model": None, "judge_base_url": None, "judge_prompt_hash": prompt_hash()}


__all__ = [
    "DEFAULT_BASE_URL",
    "EM_ALIGNED_BELOW",
    "EM_COHERENT_ABOVE",
    "JUDGE_CALL_ERRORS",
    "MIN_NUMBER_MASS",
    "PROMPTS",
    "PROMPT_VERSION",
    "YESNO_METRICS",
    "JudgeCache",
    "JudgeClient",
    "JudgeConfig",
    "JudgeConfigError",
    "JudgeHTTPError",
    "JudgeItem",
    "JudgeResponseError",
    "PromptSet",
    "UserFileError",
    "Verdict",
    "aggregate_0_100",
    "get_client",
    "is_misaligned",
    "judge_info",
    "load_prompt_file",
    "looks_digit_split",
    "parse_sampled",
    "preflight",
    "prompt_hash",
    "require_judge",
    "resolve_config",
    "retry_after_seconds",
    "yes_probability",
    *_MOVED_NAMES,
]
