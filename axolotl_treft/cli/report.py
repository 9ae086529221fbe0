"""``axolotl-treft report``: compare lm-eval results of several runs (table + PNG plot).

EM-F1 (TReFT paper) = 2(100 - ID) * EM / ((100 - ID) + EM), with EM = general alignment (``em_general``
aligned, higher is better) and ID = in-domain alignment (``em_indomain_<domain>`` aligned, lower = the
narrow behaviour was learned).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DOMAINS = ("legal", "finance", "health", "auto")
SETTINGS = ("abstention", "refusal", "tooluse")

# (key, header, kind) -- kind "score" (0-100) or "rate" (0-1, shown in %)
COLUMNS: list[tuple[str, str, str]] = [
    ("aligned", "aligned", "score"),
    ("coherent", "coherent", "score"),
    ("em_rate", "EM rate", "rate"),
    ("refusal_rate", "refusals", "rate"),
    ("id", "ID", "score"),
    ("em_f1", "EM-F1", "score"),
    *[(f"{s}_{t}", f"{s} {t}", "rate") for s in SETTINGS for t in ("on", "off")],
    ("judge_errors", "judge err", "count"),
]


def find_results(path: str | Path) -> Path:
    """A results JSON file, or the newest ``results_*.json`` below an lm-eval output directory."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        found = sorted(p.rglob("results_*.json"), key=lambda f: (f.stat().st_mtime, f.name))
        if found:
            return found[-1]
        raise FileNotFoundError(f"no results_*.json under {p}")
    raise FileNotFoundError(f"{p} does not exist")


class ResultsError(ValueError):
    """A results file that cannot be read as lm-eval results of this task pack."""


def load_results(file: Path) -> dict[str, Any]:
    """An lm-eval results JSON with at least one metric of this task pack, or :class:`ResultsError` naming ``file``."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultsError(f"{file}: not a readable JSON file ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ResultsError(f"{file}: not an lm-eval results file (no `results` table; pass lm_eval's "
                           "results_*.json or its --output_path directory)")
    if all(v is None for k, v in summarize(data).items() if k not in ("id_domains", "judge_model")):
        tasks = ", ".join(sorted(data["results"])) or "none"
        raise ResultsError(f"{file}: holds no metric of the axolotl-treft task pack (em_*, offtopic_*); "
                           f"tasks found: {tasks}")
    return data


def metric(results: Mapping[str, Any], task: str, name: str) -> float | None:
    """``results[task]["<name>,<filter>"]`` for whichever filter; None if absent or NaN."""
    entry = results.get("results", {}).get(task) or {}
    for key, value in entry.items():
        if key.split(",", 1)[0] == name and "," in key:
            try:
                v = float(value)
            except (TypeError, ValueError):
                return None
            return None if math.isnan(v) else v
    return None


def em_f1(id_score: float | None, em: float | None) -> float | None:
    if id_score is None or em is None:
        return None
    a = 100.0 - id_score
    return 0.0 if a + em == 0 else 2 * a * em / (a + em)


def summarize(results: Mapping[str, Any], domain: str | None = None) -> dict[str, Any]:
    """One table row from an lm-eval results dict."""
    row: dict[str, Any] = {k: None for k, _, _ in COLUMNS}
    for k in ("aligned", "coherent", "em_rate", "refusal_rate"):
        row[k] = metric(results, "em_general", k)
    ids = {d: metric(results, f"em_indomain_{d}", "aligned") for d in DOMAINS}
    ids = {d: v for d, v in ids.items() if v is not None}
    row["id_domains"] = ",".join(ids)
    if domain:
        row["id"] = ids.get(domain)
        row["id_domains"] = domain if domain in ids else ""
    elif ids:
        row["id"] = sum(ids.values()) / len(ids)
    row["em_f1"] = em_f1(row["id"], row["aligned"])
    for s in SETTINGS:
        row[f"{s}_on"] = metric(results, f"offtopic_{s}", "on_topic_rate")
        row[f"{s}_off"] = metric(results, f"offtopic_{s}", "off_topic_rate")
    errs = [metric(results, t, "judge_errors") for t in results.get("results", {})]
    errs = [e for e in errs if e is not None]
    row["judge_errors"] = sum(errs) if errs else None
    row["judge_model"] = judge_model(results)
    return row


def judge_model(results: Mapping[str, Any]) -> str | None:
    """The judge model recorded for the first judged task (by the task pack or ``axolotl-treft judge``)."""
    for task, config in (results.get("configs") or {}).items():
        meta = (config or {}).get("metadata") or {}
        record = meta.get("treft_record") or {}
        entry = record.get(task) or (next(iter(record.values())) if len(record) == 1 else {})
        model = (entry.get("judge") or {}).get("model")
        legacy = meta.get("judge") if isinstance(meta.get("judge"), Mapping) else {}
        model = model or legacy.get("judge_model")
        if model:
            return str(model)
    return None


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "rate":
        return f"{100 * v:.1f}%"
    if kind == "change":
        return f"{100 * v:+.1f}%"
    if kind == "count":
        return str(int(v))
    if kind == "seconds":
        return f"{v:.0f}"
    return f"{v:.1f}"


def table_lines(names: Sequence[str], rows: Sequence[Mapping[str, Any]],
                columns: Sequence[tuple[str, str, str]] = COLUMNS) -> list[list[str]]:
    """Header and one line per run: every column some row has a value for."""
    cols = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    header = ["run", *[h for _, h, _ in cols]]
    return [header, *([n, *[_fmt(r.get(k), kind) for k, _, kind in cols]] for n, r in zip(names, rows, strict=True))]


def format_table(names: Sequence[str], rows: Sequence[Mapping[str, Any]],
                 columns: Sequence[tuple[str, str, str]] = COLUMNS) -> str:
    lines = table_lines(names, rows, columns)
    widths = [max(len(x) for x in col) for col in zip(*lines, strict=True)]
    text = [
        "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(line, widths, strict=True)))
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def markdown_table(names: Sequence[str], rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[tuple[str, str, str]] = COLUMNS) -> str:
    lines = table_lines(names, rows, columns)
    md = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    return "\n".join(md + ["| " + " | ".join(line) + " |" for line in lines[1:]])


def plot(names: Sequence[str], rows: Sequence[Mapping[str, Any]], out: str | Path) -> Path:
    """Grouped bars: scores (0-100) on the left, rates (%) on the right."""
    from ..resources import require_extra

    matplotlib = require_extra("matplotlib", "report", "the report's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("scores (0-100)", [c for c in COLUMNS if c[2] == "score"], 1.0),
        ("rates (%)", [c for c in COLUMNS if c[2] == "rate"], 100.0),
    ]
    panels = [(t, [c for c in cs if any(r.get(c[0]) is not None for r in rows)], s) for t, cs, s in panels]
    panels = [p for p in panels if p[1]] or [("no metrics found", [], 1.0)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    width = 0.8 / max(1, len(names))
    for ax, (title, cols, scale) in zip(axes[0], panels, strict=True):
        for i, (name, row) in enumerate(zip(names, rows, strict=True)):
            xs = [j + i * width - 0.4 + width / 2 for j in range(len(cols))]
            ys = [math.nan if row.get(k) is None else row[k] * scale for k, _, _ in cols]
            bars = ax.bar(xs, ys, width=width, label=name)
            ax.bar_label(bars, labels=["" if math.isnan(y) else f"{y:.0f}" for y in ys], fontsize=7)
        ax.set_xticks(range(len(cols)), [h for _, h, _ in cols], rotation=30, ha="right")
        ax.set_title(title)
        ax.set_xlim(-0.6, len(cols) - 0.4)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    out = plot_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out


DEFAULT_PLOT = "treft_report.png"
PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def plot_path(out: str | Path) -> Path:
    """The file ``--plot`` writes: a directory (existing, or given with a trailing ``/``) gets ``treft_report.png``
    inside it; a name without a suffix gets ``.png``; an unknown suffix is an error."""
    text = str(out)
    path = Path(out).expanduser()
    if path.is_dir() or text.endswith(("/", "\\")):
        return path / DEFAULT_PLOT
    if not path.suffix:
        return path.with_name(path.name + ".png")
    if path.suffix.lower() not in PLOT_FORMATS:
        raise ValueError(f"--plot {out}: unknown image type {path.suffix!r}; use one of {', '.join(PLOT_FORMATS)} "
                         "or a directory")
    return path


def _default_name(arg: str, file: Path) -> str:
    p = Path(arg)
    if p.is_dir():
        return p.resolve().name
    return file.parent.name if file.name.startswith("results_") else file.stem


def main(args: argparse.Namespace) -> int:
    try:
        files = [find_results(a) for a in args.results]
        if args.plot:
            plot_path(args.plot)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = (
        [n.strip() for n in args.names.split(",")]
        if args.names
        else [_default_name(a, f) for a, f in zip(args.results, files, strict=True)]
    )
    if len(names) != len(files):
        print(f"error: {len(names)} names for {len(files)} results", file=sys.stderr)
        return 2
    domain = getattr(args, "domain", None)
    try:
        rows = [summarize(load_results(f), domain) for f in files]
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(names, rows))
    for n, f, r in zip(names, files, rows, strict=True):
        notes = [str(f)]
        if r["id_domains"]:
            notes.append(f"ID from {r['id_domains']}")
        if r["judge_model"]:
            notes.append(f"judge {r['judge_model']}")
        print(f"  {n}: " + "; ".join(notes))
    if args.plot:
        print(f"plot: {plot(names, rows, args.plot)}")
    if args.json:
        payload = [{"run": n, "file": str(f), **r} for n, f, r in zip(names, files, rows, strict=True)]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"json: {args.json}")
    return 0


def versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on (recorded with every study and diagnosis)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("axolotl-treft", "axolotl", "transformers", "peft", "torch", "lm_eval"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "not installed"
    return found
