"""The study's leak curves: every trained run carries ``treft.monitor`` on the study's off-topic tasks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..monitor.checks import OFFTOPIC_PREFIXES, check_parallelism
from .runs import TREFT_PLUGIN, TREFT_PLUGIN_PATHS
from .settings import Settings


def monitor_block(cfg: Mapping, settings: Settings) -> tuple[dict | None, str]:
    """The ``treft.monitor`` block every trained run gets (the study's off-topic tasks), or None; and a note."""
    if not settings.monitor_every:
        return None, "leak curves off (--monitor-every 0)"
    tasks = [t for t in settings.tasks if t.startswith(OFFTOPIC_PREFIXES)]
    if not tasks:
        return None, "leak curves off: they follow the off-topic tasks, and none is in --tasks"
    try:
        check_parallelism(cfg, "treft.monitor")
    except ValueError as err:
        return None, f"leak curves off: {err}"
    block: dict[str, Any] = {"tasks": tasks, "every": settings.monitor_every}
    if settings.monitor_limit:
        block["limit"] = settings.monitor_limit
    if settings.max_gen_toks:
        block["max_gen_toks"] = settings.max_gen_toks
    if settings.eval_batch_size.isdigit():
        block["batch_size"] = int(settings.eval_batch_size)
    shown = ", ".join(f"{k} {v}" for k, v in block.items() if k != "tasks")
    return block, f"leak curves: every run trains with treft.monitor on {', '.join(tasks)} ({shown})"


def add_monitor(derived: dict, monitor: Mapping[str, Any]) -> dict:
    """``derived`` with the study's ``treft.monitor`` block (the leak-over-steps curve of the run), and the plugin
    listed if it is not (the plain-SFT twin then carries the monitor alone: it trains exactly as without it)."""
    plugins = list(derived.get("plugins") or [])
    if not any(p in TREFT_PLUGIN_PATHS for p in plugins):
        derived["plugins"] = [*plugins, TREFT_PLUGIN]
    derived["treft"] = {**(derived.get("treft") or {}), "monitor": dict(monitor)}
    return derived
