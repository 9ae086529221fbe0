"""``axolotl-treft demo``: the piggyback study on the embedded model (the README's main job).

Trains SmolLM2-135M-Instruct (LoRA) on the shipped legal-abstention data with the real ``axolotl train``
and the shipped example config — plain SFT, TReFT, and the comparison defenses (``--runs``: data
interleaving, KL, inoculation prompting, persona steering, Interleaving+, TReFT's other token modes) —
evaluates each run with ``lm_eval`` (``offtopic_abstention``), and prints one table. Writes
``study.json`` (figures, settings, versions), ``study.md`` (the table as in the README) and ``study.png``.
``--sweep 1,10,30,100`` instead trains the shipped TReFT setting at each λ and plots the trade-off curve.
Finished runs are reused (``OUT/<run>/train.json``, ``eval.json``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

from .models import materialize_smollm2
from .study import (
    EVAL_MAX_GEN_TOKS,
    NARROW_SETTINGS,
    format_table,
    markdown_table,
    plot_runs,
    plot_sweep,
    run_all,
    select_runs,
    sweep_runs,
    versions,
)

QUICK_STEPS = 3  # per training run
QUICK_LIMIT = 4  # documents per eval (on/off-topic interleaved, so 2 + 2)


def parse_weights(text: str) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError as err:
        raise SystemExit(f"--sweep: expected comma-separated numbers such as 1,10,30,100, got {text!r}") from err
    if not weights or any(w <= 0 for w in weights):
        raise SystemExit(f"--sweep: weights must be > 0 (λ=0 is the SFT run, always included), got {text!r}")
    return weights


def main(args: argparse.Namespace) -> int:
    setting = NARROW_SETTINGS[args.setting]
    out = Path(args.out or ("runs/demo" if args.setting == "abstention" else f"runs/demo-{args.setting}")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    max_steps = QUICK_STEPS if args.quick else args.steps
    limit = QUICK_LIMIT if args.quick else None
    weights = parse_weights(args.sweep) if args.sweep else None
    if weights and args.runs:
        raise SystemExit("--runs selects study runs; --sweep trains its own (SFT and TReFT at each λ)")
    runs = sweep_runs(weights) if weights else select_runs(args.runs.split(",") if args.runs else None, setting)
    model = materialize_smollm2()
    print(f"Study: {len(runs)} runs ({', '.join(r.name for r in runs)}) → {out}", flush=True)
    rows = run_all(runs, model, out, max_steps, limit, setting, log=lambda line: print(line, flush=True))

    meta = {
        "command": " ".join(["axolotl-treft demo", shlex.join(sys.argv[2:] if sys.argv[1:2] == ["demo"] else [])]).strip(),
        "date": dt.date.today().isoformat(),
        "versions": versions(),
        "steps_note": f"max {max_steps} steps per run" if max_steps else "each run: the example config's epochs",
        "eval_note": f"greedy, max {EVAL_MAX_GEN_TOKS} new tokens" + (f", first {limit} documents" if limit else ""),
        "model": str(model),
        "eval_task": setting.task,
        "setting": args.setting,
    }
    stem = "sweep" if weights else "study"
    print("\n" + format_table(rows))
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1, default=str))
    (out / f"{stem}.md").write_text(markdown_table(rows, meta) + "\n")
    if weights:
        lam = {"sft": 0.0, **{r.name: r.treft["kv"]["weight"] for r in runs if r.treft}}
        png = plot_sweep(rows, lam, out / "sweep.png", setting)
    else:
        png = plot_runs(rows, out / "study.png", setting)
    print(f"\nwrote {out / (stem + '.json')}, {out / (stem + '.md')}, {png}")
    return 0
