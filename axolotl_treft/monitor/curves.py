"""Leak-over-steps curves from ``treft_monitor.jsonl`` files: the "stopped early" figure and ``leak_curves.png``.

For the off-topic tasks: per run and task, the on- and off-topic rate at every monitored step. "Stopped early"
is the off-topic rate at the first monitored step where the on-topic rate reaches ``threshold`` (0.95): what a
user who stops as soon as the narrow behaviour is learned would ship.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..resources import require_extra
from .callback import read_rows

ON, OFF = "on_topic_rate", "off_topic_rate"
LEARNED = 0.95

Curve = list[dict[str, Any]]  # [{"step", "on_topic_rate", "off_topic_rate"}], by step


def read_curves(path: Path) -> dict[str, Curve]:
    """``{task: curve}`` for every task of a monitor file with on/off-topic rates (empty if there is no file)."""
    curves: dict[str, Curve] = {}
    for row in read_rows(Path(path)):
        metrics = row.get("metrics") or {}
        if ON in metrics and OFF in metrics:
            curves.setdefault(row["task"], []).append({"step": row["step"], ON: metrics[ON], OFF: metrics[OFF]})
    return {task: sorted(points, key=lambda p: p["step"]) for task, points in curves.items()}


def stopped_early(curve: Curve, threshold: float = LEARNED) -> dict[str, Any] | None:
    """The first point whose on-topic rate reaches ``threshold`` (None if none does)."""
    return next((p for p in curve if p[ON] is not None and p[ON] >= threshold), None)


def plot_leak_curves(curves: Mapping[str, Mapping[str, Curve]], path: Path, reference: str | None = "sft",
                     title: str = "Leak over training steps") -> Path | None:
    """One panel per task: each run's off-topic (solid) and on-topic (dashed) rate against the step, the
    ``reference`` run in black. ``curves`` is ``{run: {task: curve}}``; None when no run has a curve."""
    tasks = sorted({task for by_task in curves.values() for task in by_task})
    if not tasks:
        return None
    matplotlib = require_extra("matplotlib", "report", "the leak curves")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    others = [r for r in curves if r != reference]
    for ax, task in zip(axes[0], tasks, strict=True):
        for run in ([reference] if reference in curves else []) + others:
            curve = curves[run].get(task)
            if not curve:
                continue
            color = "black" if run == reference else colors[others.index(run) % len(colors)]
            width = 2.4 if run == reference else 1.4
            steps = [p["step"] for p in curve]
            ax.plot(steps, [p[OFF] for p in curve], color=color, lw=width, marker="o", ms=3, label=f"{run} off-topic")
            ax.plot(steps, [p[ON] for p in curve], color=color, lw=width, ls="--", alpha=0.7, label=f"{run} on-topic")
        ax.axhline(LEARNED, color="grey", lw=0.6, ls=":")
        ax.set(title=task, xlabel="optimizer step", ylabel="rate", ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{title}\nsolid: off-topic rate, dashed: on-topic rate; dotted: {LEARNED:.2f}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
