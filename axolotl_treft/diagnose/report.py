"""Table, summary line, Markdown and PNG of a diagnose run.

A *row* is one measured line: ``{"name", "label", "kind", "region", "layers", "metrics": {task: {"metric,filter":
value}}, "seconds"}``. Perturbation (and its sampled control) gives two rows, its trials' average and best.

"Recovers" (the summary line and the table's last column): the relative change of the headline metric
towards "better" against the unpatched model. For the ``offtopic_*`` tasks the headline metric is
``off_topic_rate`` (lower is better), so recovery = (unpatched − patched) / unpatched: 1.0 means patching
removes the off-topic behaviour entirely, 0 that it changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..resources import require_extra

HEADLINE_METRICS = ("off_topic_rate", "em_rate", "aligned")
TEMPLATE_REGIONS = ("prefix_postfix", "prefix", "postfix_empty", "postfix")
BEHAVIOUR_WORDS = {"off_topic_rate": "the off-topic behaviour", "em_rate": "the emergent misalignment",
                   "aligned": "the alignment score"}


def headline(metrics: Mapping[str, Mapping[str, float | None]],
             better: Mapping[str, Mapping[str, bool | None]]) -> tuple[str, str, bool]:
    """(task, "metric,filter", lower_is_better) of the metric the summary line speaks about."""
    for wanted in HEADLINE_METRICS:
        for task, values in metrics.items():
            for key in values:
                if key.split(",", 1)[0] == wanted:
                    return task, key, not better.get(task, {}).get(wanted, False)
    task = next(iter(metrics))
    key = next(k for k in metrics[task] if not k.startswith("judge_errors"))
    return task, key, not better.get(task, {}).get(key.split(",", 1)[0], False)


def recovery(unpatched: float | None, value: float | None, lower_is_better: bool) -> float | None:
    """Relative change towards better vs unpatched: (u − v) / u for a rate to remove, (v − u) / u otherwise."""
    if unpatched is None or value is None or unpatched == 0:
        return None
    return (unpatched - value) / unpatched if lower_is_better else (value - unpatched) / unpatched


def _value(row: Mapping[str, Any], task: str, key: str) -> float | None:
    return (row["metrics"].get(task) or {}).get(key)


def columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(task, metric key) of every metric shown, judge error counts last."""
    seen: list[tuple[str, str]] = []
    for row in rows:
        for task, values in row["metrics"].items():
            for key in values:
                if (task, key) not in seen:
                    seen.append((task, key))
    return sorted(seen, key=lambda c: c[1].startswith("judge_errors"))


def table(rows: Sequence[Mapping[str, Any]], head: tuple[str, str, bool]) -> list[list[str]]:
    cols = columns(rows)
    tasks = {t for t, _ in cols}
    names = [(k.split(",", 1)[0] if len(tasks) == 1 else f"{t}/{k.split(',', 1)[0]}") for t, k in cols]
    header = ["intervention", *names, "recovers", "s"]
    base = _value(rows[0], head[0], head[1])
    body = []
    for row in rows:
        cells = [row["label"]]
        cells += ["—" if (v := _value(row, t, k)) is None else f"{v:.3f}" for t, k in cols]
        rec = recovery(base, _value(row, head[0], head[1]), head[2])
        cells.append("—" if row["kind"] == "none" and row.get("trials") is None else
                     ("n/a" if rec is None else f"{100 * rec:+.1f}%"))
        cells.append(f"{row['seconds']:.0f}")
        body.append(cells)
    return [header, *body]


def format_table(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def markdown(lines: list[list[str]]) -> str:
    md = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    return "\n".join(md + ["| " + " | ".join(line) + " |" for line in lines[1:]])


def summary(rows: Sequence[Mapping[str, Any]], head: tuple[str, str, bool]) -> str:
    """One readable line: how much patching the template recovers, and the query control."""
    task, key, lower = head
    metric = key.split(",", 1)[0]
    what = BEHAVIOUR_WORDS.get(metric, metric)
    kv = {r["region"]: r for r in rows if r["kind"] == "kv"}
    base = _value(rows[0], task, key)
    if base is None:
        return f"the unpatched model has no {metric} value; nothing to compare"
    if base == 0:
        return f"the unpatched model shows none of {what} ({metric} 0), so there is nothing to recover"

    def part(row: Mapping[str, Any]) -> str:
        v = _value(row, task, key)
        rec = recovery(base, v, lower)
        return "n/a" if rec is None else f"{100 * rec:.1f} % of {what} ({metric} {base:.3f} → {v:.3f})"

    pieces = []
    template = next((kv[r] for r in TEMPLATE_REGIONS if r in kv), None)
    if template is not None:
        pieces.append(f"patching the template ({template['region']} K/V) recovers {part(template)}")
    if "query" in kv:
        pieces.append(f"the query control recovers {part(kv['query'])}")
    if not pieces:
        best = max(rows[1:], key=lambda r: recovery(base, _value(r, task, key), lower) or -1e9, default=None)
        if best is None:
            return f"unpatched {metric} {base:.3f}"
        pieces.append(f"{best['label']} recovers {part(best)}")
    return "; ".join(pieces)


def plot(rows: Sequence[Mapping[str, Any]], head: tuple[str, str, bool], layerwise: Sequence[Mapping[str, Any]],
         path: Path, title: str) -> Path:
    """Bars per intervention (every mean metric of the headline task); the layer-wise curve when measured."""
    matplotlib = require_extra("matplotlib", "report", "the diagnose plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = head[0]
    keys = [k for t, k in columns(rows) if t == task and not k.startswith("judge_errors")]
    panels = 2 if layerwise else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(6.0, 1.1 * len(rows)) + 5.0 * (panels - 1), 4.4),
                             squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        ys = [_value(r, task, key) for r in rows]
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(rows))]
        bars = ax.bar(xs, [0.0 if y is None else y for y in ys], width=width, label=key.split(",", 1)[0])
        ax.bar_label(bars, labels=["" if y is None else f"{y:.2f}" for y in ys], fontsize=7)
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if layerwise:
        ax = axes[0][1]
        xs = [r["layers"][0] for r in layerwise]
        ax.plot(xs, [_value(r, task, head[1]) for r in layerwise], "o-", label=f"{head[1].split(',', 1)[0]}, "
                "residual at prefix patched")
        base = _value(rows[0], task, head[1])
        if base is not None:
            ax.axhline(base, color="grey", linestyle="--", label="unpatched")
        ax.set_xlabel("decoder layer (residual stream entering it)")
        ax.set_title("layer-wise residual patching at the prefix", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
