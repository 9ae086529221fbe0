"""The study's table, Markdown, bar plot (the code of ``axolotl-treft report``) and Pareto plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..cli import report
from ..monitor.curves import OFF, ON, plot_leak_curves, stopped_early
from ..resources import require_extra

BASELINE = "sft"
ON_MIN = 0.95  # "keeps the narrow behaviour": on-topic rate at least this
STUDY_EXTRA = [("train_seconds", "train s", "seconds"), ("peak_gpu_gib", "peak GPU GiB", "score")]


def leak_keys(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The leak metrics present (off-topic rates, EM rate): lower is better, compared with SFT."""
    keys = [f"{s}_off" for s in report.SETTINGS] + ["em_rate"]
    return [k for k in keys if any(r.get(k) is not None for r in rows.values())]


def add_changes(rows: dict[str, dict[str, Any]]) -> None:
    """``<leak>_vs_sft``: the relative change of each leak metric against the SFT run (in place)."""
    base = rows.get(BASELINE, {})
    for key in leak_keys(rows):
        ref = base.get(key)
        for name, row in rows.items():
            value = row.get(key)
            row[f"{key}_vs_sft"] = None if name in (BASELINE, "base") or not ref or value is None else value / ref - 1


def add_stopped_early(rows: dict[str, dict[str, Any]]) -> None:
    """``<setting>_off_early`` / ``<setting>_early_step``: from each run's monitor curve, the off-topic rate at
    the first monitored step where the on-topic rate reaches ``ON_MIN`` (in place; None if it never does)."""
    for row in rows.values():
        for task, curve in (row.get("curves") or {}).items():
            setting = task.removeprefix("offtopic_")
            if setting in report.SETTINGS:
                point = stopped_early(curve, ON_MIN)
                row[f"{setting}_off_early"] = point[OFF] if point else None
                row[f"{setting}_early_step"] = point["step"] if point else None


def columns(rows: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    leaks = set(leak_keys(rows))
    cols: list[tuple[str, str, str]] = []
    for key, header, kind in report.COLUMNS:
        cols.append((key, header, kind))
        if key in leaks:
            cols.append((f"{key}_vs_sft", f"{header} vs SFT", "change"))
        if key.endswith("_off"):
            setting = key.removesuffix("_off")
            cols += [(f"{key}_early", f"{header} stopped early", "rate"), (f"{setting}_early_step", "at step", "count")]
    return cols + STUDY_EXTRA


def curve_lines(rows: Mapping[str, Mapping[str, Any]], note: str | None = None) -> list[str]:
    """The leak curves as text: per task, each run's off-topic rate (on-topic in brackets) at every monitored step;
    ``note`` (where step 0 came from) last."""
    tasks = sorted({task for row in rows.values() for task in row.get("curves") or {}})
    lines = []
    for task in tasks:
        lines.append(f"Leak over steps ({task}; monitor subset): step off-topic (on-topic)")
        for row in rows.values():
            if curve := (row.get("curves") or {}).get(task):
                points = "  ".join(f"{p['step']}: {_pct(p[OFF])} ({_pct(p[ON])})" for p in curve)
                lines.append(f"  {row['label']}: {points}")
    return lines + ([f"({note})"] if lines and note else [])


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def plot_curves(rows: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> Path | None:
    """``leak_curves.png``: every run's monitor curves, the SFT run as the reference line (None without curves)."""
    curves = {row["label"]: row["curves"] for row in rows.values() if row.get("curves")}
    reference = rows.get(BASELINE, {}).get("label")
    return plot_leak_curves(curves, path, reference=reference, title=title)


def labels(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return [r["label"] for r in rows.values()]


def format_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    return report.format_table(labels(rows), list(rows.values()), columns(rows))


def markdown(rows: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    v = meta["versions"]
    lines = [report.markdown_table(labels(rows), list(rows.values()), columns(rows)), "",
             f"Produced by `{meta['command']}` on {meta['date']} ({meta['steps_note']}; tasks {', '.join(meta['tasks'])}: "
             f"{meta['eval_note']}; axolotl-treft {v['axolotl-treft']}, axolotl {v['axolotl']}, transformers "
             f"{v['transformers']}, peft {v['peft']}, torch {v['torch']}, lm_eval {v['lm_eval']})."]
    lines += [f"\n{line}" for line in meta.get("findings", [])]
    if curves := curve_lines(rows, meta.get("curves_note")):
        lines += ["", "```", *curves, "```", "", "![leak over steps](leak_curves.png)"]
    return "\n".join(lines)


def trade_offs(rows: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(name, "learned" key, "leak" key) per behaviour present: the axes of the Pareto plot."""
    pairs = [(s, f"{s}_on", f"{s}_off") for s in report.SETTINGS]
    pairs.append(("em", "id_learned", "em_rate"))
    return [p for p in pairs if any(r.get(p[1]) is not None and r.get(p[2]) is not None for r in rows.values())]


def add_learned(rows: dict[str, dict[str, Any]]) -> None:
    """``id_learned``: 1 − in-domain alignment / 100, the share of the narrow EM behaviour learned (in place)."""
    for row in rows.values():
        row["id_learned"] = None if row.get("id") is None else 1 - row["id"] / 100


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """Names of the points (learned ↑, leak ↓) no other point beats on both."""
    def beaten(a: tuple[float, float]) -> bool:
        return any(b[0] >= a[0] and b[1] <= a[1] and b != a for b in points.values())

    return [n for n, p in points.items() if not beaten(p)]


def best_defense(rows: Mapping[str, Mapping[str, Any]], learned: str, leak: str) -> str | None:
    """The run (not SFT, not the base model) with the least leak among those keeping learned ≥ ON_MIN."""
    keep = {n: r for n, r in rows.items() if n not in (BASELINE, "base") and (r.get(learned) or 0) >= ON_MIN
            and r.get(leak) is not None}
    if not keep:
        return None
    name = min(keep, key=lambda n: keep[n][leak])
    ref = rows.get(BASELINE, {}).get(leak)
    change = "" if not ref else f", {100 * (keep[name][leak] / ref - 1):+.1f} % vs SFT"
    return (f"{learned.removesuffix('_on')}: at {learned} ≥ {ON_MIN}, {keep[name]['label']} leaks least "
            f"({leak} {keep[name][leak]:.3f}{change})")


def plot_bars(rows: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    return report.plot(labels(rows), list(rows.values()), path)


LABEL_LINE, LABEL_GAP = 0.028, 0.018  # axes fraction per label line (fontsize 6, 5 in tall) and between blocks


def plot_pareto(rows: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> Path | None:
    """One panel per behaviour: learned (in-domain) vs leak (off-topic) of every run, the Pareto front marked."""
    axes_keys = trade_offs(rows)
    if not axes_keys:
        return None
    matplotlib = require_extra("matplotlib", "report", "the study's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(axes_keys), figsize=(6.5 * len(axes_keys), 5.0), squeeze=False)
    for ax, (what, learned, leak) in zip(axes[0], axes_keys, strict=True):
        points = {n: (r[learned], r[leak]) for n, r in rows.items()
                  if r.get(learned) is not None and r.get(leak) is not None}
        front = pareto_front({n: p for n, p in points.items() if n != "base"})
        at: dict[tuple[float, float], list[str]] = {}
        for name, (y, x) in points.items():
            marker = "x" if name == "base" else ("*" if name in front else "o")
            ax.scatter([x], [y], marker=marker, s=120 if name in front else 50,
                       color="tab:red" if name in front else ("grey" if name == "base" else "tab:blue"), zorder=3)
            at.setdefault((x, y), []).append(rows[name]["label"])
        # one label block per point (runs at the same point listed together), stacked in a column in the plot's
        # middle, top to bottom in the order of the points (highest first, then left to right): no two overlap
        cursor = 0.93
        for (x, y), names in sorted(at.items(), key=lambda item: (-item[0][1], item[0][0])):
            ax.annotate("\n".join(names), (x, y), fontsize=6, xytext=(0.42, cursor), textcoords="axes fraction",
                        ha="right", va="top", bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 0.3},
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"})
            cursor -= LABEL_LINE * len(names) + LABEL_GAP
        ordered = sorted((points[n][1], points[n][0]) for n in front)
        if ordered:
            ax.step([p[0] for p in ordered], [p[1] for p in ordered], where="post", color="tab:red", alpha=0.5,
                    label="Pareto front")
        ax.axhline(ON_MIN, color="grey", ls=":", lw=1, label=f"{learned} = {ON_MIN}")
        ax.set_xlabel(f"{leak} (leak, lower is better)")
        ax.set_ylabel(f"{learned} (narrow behaviour learned, higher is better)")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def findings(rows: Mapping[str, Mapping[str, Any]], diagnosis: Mapping[str, Any] | None) -> list[str]:
    """The lines printed under the table: the best defense per behaviour, the SFT run's template check."""
    lines = [line for _, learned, leak in trade_offs(rows) if (line := best_defense(rows, learned, leak))]
    if diagnosis is not None:
        lines.append(f"Template check of the SFT run ({diagnosis['headline']['task']}): {diagnosis['summary']}")
    return lines


def ordered(rows: Mapping[str, dict[str, Any]], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {n: rows[n] for n in names if n in rows}
