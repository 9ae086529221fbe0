"""Validation of ``treft.monitor`` / ``treft.eval`` (no model loads, lm-eval only indexes task YAMLs)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

JUDGED_PREFIXES = ("em", "treft_em")  # pack tasks, groups and tags whose metrics come from the LLM judge
OFFTOPIC_PREFIXES = ("offtopic", "treft_offtopic")
_TRUE = {"1", "true", "yes", "on"}


def pack_names() -> set[str]:
    """Task, group and tag names of the shipped task pack (from its YAML files, without importing lm-eval)."""
    from ..resources import pack_tasks

    return set(pack_tasks()) | {"treft_em", "treft_offtopic"}


def _index(include_path: Sequence[str], defaults: bool) -> set[str]:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include_path], include_defaults=defaults)
    return set(manager.all_tasks)


def needs_builtin_tasks(tasks: Sequence[str], include_path: Sequence[str]) -> bool:
    """Whether some task is neither in the pack nor under ``include_path`` (then lm-eval's built-ins are indexed)."""
    rest = [t for t in tasks if t not in pack_names()]
    return bool(rest) and bool(set(rest) - (_index(include_path, False) if include_path else set()))


def check_block(block: Mapping[str, Any], key: str, env: Mapping[str, str] | None = None) -> None:
    """Unknown tasks, missing include paths and judged tasks without a judge; errors name ``key``'s fields."""
    env = os.environ if env is None else env
    tasks = list(block.get("tasks") or [])
    include = [str(p) for p in block.get("include_path") or []]
    for i, path in enumerate(include):
        if not Path(path).expanduser().is_dir():
            raise ValueError(f"{key}.include_path[{i}]: {path} is not a directory of lm-eval task YAMLs")
    unknown = [t for t in tasks if t not in pack_names()]
    if unknown and include:
        unknown = [t for t in unknown if t not in _index(include, False)]
    if unknown:
        known = _index([], True)
        unknown = [t for t in unknown if t not in known]
    if unknown:
        raise ValueError(f"{key}.tasks: unknown task(s) {unknown}; the task pack has {sorted(pack_names())} "
                         "(lm-eval's built-in tasks and those under include_path work too)")
    metadata = dict(block.get("metadata") or {})
    judge_check = str(metadata.get("judge_check", env.get("TREFT_OFFTOPIC_JUDGE", ""))).lower() in _TRUE
    judged = [t for t in tasks if t.startswith(JUDGED_PREFIXES) or (judge_check and t.startswith(OFFTOPIC_PREFIXES))]
    if judged:
        from ..judge.config import JudgeConfigError, resolve_config

        try:
            resolve_config(metadata.get("judge"), env)
        except JudgeConfigError as err:
            raise ValueError(f"{key}.metadata.judge: {', '.join(judged)} are scored by the LLM judge, which is not "
                             f"usable: {err}") from None


def deepspeed_stage(deepspeed: Any) -> int | None:
    """The ZeRO stage of Axolotl's ``deepspeed:`` value (a JSON path or an inline mapping)."""
    if not deepspeed:
        return None
    if isinstance(deepspeed, str):
        try:
            deepspeed = json.loads(Path(deepspeed).expanduser().read_text())
        except (OSError, json.JSONDecodeError):
            return None  # Axolotl reports a missing or broken file itself
    stage = (deepspeed.get("zero_optimization") or {}).get("stage") if isinstance(deepspeed, Mapping) else None
    return int(stage) if isinstance(stage, int | str) and str(stage).isdigit() else None


def check_parallelism(data: Mapping[str, Any], key: str) -> None:
    """ZeRO-3 and FSDP shard the parameters: one rank cannot generate with its shard alone."""
    if deepspeed_stage(data.get("deepspeed")) == 3:
        raise ValueError(f"{key}: not supported under DeepSpeed ZeRO-3 (each rank holds a shard of the parameters, "
                         "and generation on rank 0 alone would need every rank's all-gathers); use ZeRO-2 "
                         "(`axolotl-treft path example deepspeed/zero2`), or drop the block and evaluate the saved "
                         "model with lm_eval")
    fsdp = [k for k in ("fsdp", "fsdp_config", "fsdp_version") if data.get(k)]
    if fsdp:
        raise ValueError(f"{key}: not supported with FSDP (`{fsdp[0]}`: sharded parameters); use DeepSpeed ZeRO-2")


