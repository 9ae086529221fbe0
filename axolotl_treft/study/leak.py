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


def add_monitor(derived: dict, monitor: Mapping[str, Any], initial: bool = True) -> dict:
    """``derived`` with the study's ``treft.monitor`` block (the leak-over-steps curve of the run), and the plugin
    listed if it is not (the plain-SFT twin then carries the monitor alone: it trains exactly as without it).

    Every run of a study starts from the same model (runs differ in their ``treft:`` blocks only), so step 0 is
    evaluated in the first trained run alone (``initial``) and shared by :func:`share_initial_points`."""
    plugins = list(derived.get("plugins") or [])
    if not any(p in TREFT_PLUGIN_PATHS for p in plugins):
        derived["plugins"] = [*plugins, TREFT_PLUGIN]
    block = dict(monitor)
    if not initial:
        block["initial"] = False
    derived["treft"] = {**(derived.get("treft") or {}), "monitor": block}
    return derived


def keyed_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """``config`` as a run's training key sees it: without ``treft.monitor.initial``, which only says whether this
    run or another evaluates the shared step 0 (a finished run is reused whichever run that is now)."""
    monitor = (config.get("treft") or {}).get("monitor")
    if not isinstance(monitor, Mapping) or "initial" not in monitor:
        return config
    rest = {k: v for k, v in monitor.items() if k != "initial"}
    return {**config, "treft": {**config["treft"], "monitor": rest}}


def share_initial_points(rows: Mapping[str, dict[str, Any]]) -> str | None:
    """Give every run's curve the step-0 point (the initial model) of the first run that evaluated it, in place;
    a note saying which run that was (None when no curve lacked it)."""
    initial: dict[str, tuple[str, dict]] = {}  # task -> (run, step-0 point)
    for name, row in rows.items():
        for task, curve in (row.get("curves") or {}).items():
            if curve and curve[0]["step"] == 0:
                initial.setdefault(task, (name, curve[0]))
    shared, missing = set(), set()
    for row in rows.values():
        for task, curve in (row.get("curves") or {}).items():
            if curve and curve[0]["step"] == 0:
                continue
            if task in initial:
                curve.insert(0, dict(initial[task][1]))
                shared.add(initial[task][0])
            else:
                missing.add(task)
    notes = []
    if shared:
        notes.append(f"step 0 (the initial model, the same for every run) evaluated once, in run "
                     f"{', '.join(sorted(shared))}, and shared by the others")
    if missing:
        notes.append(f"no run evaluated step 0 of {', '.join(sorted(missing))} (its run was reused from an earlier "
                     "study); the curves start at the first monitored step")
    return "; ".join(notes) or None
