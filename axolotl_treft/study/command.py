"""``axolotl-treft study CONFIG.yml``: SFT vs TReFT vs the defenses on your own Axolotl config.

Derives each run's config (only the plugin list and the ``treft:`` block change), trains each with
``axolotl train`` through the chosen launcher, evaluates each trained model and the base model with
``lm_eval`` on tasks of the pack, and writes one table (``study.md``, ``study.json``), the bar plot of
``axolotl-treft report`` (``study.png``) and a Pareto plot of learned vs leaked behaviour (``pareto.png``).
``--dry-run`` writes the configs and ``commands.sh`` (the exact commands) without running anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..cli.options import out_dir_error
from ..cli.report import versions
from .execute import (
    BASE_ROW,
    LAUNCHERS,
    Log,
    RunPlan,
    Settings,
    check_reusable,
    check_tasks,
    diagnose_sft,
    evaluate,
    evaluation_only,
    plan_study,
    shell,
    train,
    write_config,
)
from .keys import fingerprint, input_digests
from .leak import share_initial_points
from .outputs import (
    add_changes,
    add_learned,
    add_stopped_early,
    curve_lines,
    findings,
    format_table,
    markdown,
    plot_bars,
    plot_curves,
    plot_pareto,
)
from .runner import UNFINISHED, Stopped, stop_on_signals, write_atomic
from .runs import (
    DEFAULT_PTST_PROMPT,
    StudyError,
    StudyRun,
    Trait,
    catalogue,
    load_config,
    load_run_file,
    parse_sweep,
    select,
)
from .validate import validate_plans

DEFAULT_TASKS = ("offtopic",)
MONITOR_EVERY = 20  # steps between the leak curve's points (and step 0, the last step)
# documents per task at each point (on- and off-topic interleave: 8 + 8); with step 0 evaluated once per study, the
# monitor adds ~8 % to the demo's training time (docs/benchmarks.md, "Monitor cost")
MONITOR_LIMIT = 16
CPU_EVAL_BATCH_SIZE = 8  # lm-eval's `auto` search has no memory limit to hit on the CPU
INTERNAL_FIGURES = ("fingerprint", "model_digest", "upstream")  # in train.json, not in the study's table


def dry_run(base_cmd: list[str], plans: Sequence[RunPlan], out: Path, settings: Settings,
            log: Log) -> int:
    """Write every derived config and ``commands.sh``; print the commands."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["#!/usr/bin/env bash", "# The study's commands, in order (written by axolotl-treft study --dry-run).",
             "set -euo pipefail", f"cd {shlex.quote(str(settings.cwd))}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in settings.env.items()]
    for plan in plans:
        write_config(plan)
        train_line = f"# evaluation only: the model of run {plan.run.eval_of}" if plan.run.eval_of else \
            shell(plan.train_cmd)
        lines += ["", f"# {plan.run.name}: {plan.run.label}", train_line, shell(plan.eval_cmd)]
    lines += ["", "# the base model (reference row)", shell(base_cmd)]
    script = out / "commands.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    log("\n".join(lines[3:]))
    log(f"\nwrote {len(plans)} configs under {out} and {script}")
    return 0


def run_study(cfg: Mapping, runs: Sequence[StudyRun], out: Path, settings: Settings, *, command: str, title: str,
              diagnose: bool = False, dry: bool = False, notes: Sequence[str] = (), log: Log = print) -> int:
    """Plan, validate, train and evaluate every run, then write the table, JSON, Markdown and plots.

    SIGTERM, SIGINT and SIGHUP stop the running child with its whole process tree, leave its run directory
    marked unfinished (a re-run redoes it) and return ``128 + signal``."""
    check_tasks(settings.tasks)
    out = out.resolve()
    base_cmd, plans = plan_study(cfg, runs, out, settings, log)
    for note in notes:
        log(note)
    with stop_on_signals():
        try:
            validate_plans(plans, settings, log)
            if dry:
                return dry_run(base_cmd, plans, out, settings, log)
            check_reusable(plans, settings)
            return _study(cfg, plans, base_cmd, out, settings, command=command, title=title, diagnose=diagnose,
                          log=log)
        except Stopped as stop:
            unfinished = sorted(str(p.parent) for p in out.glob(f"*/{UNFINISHED}"))
            print(f"{' '.join(command.split()[:2])}: stopped by {stop.name}; the running step was stopped with its "
                  "whole process tree" + (f"; unfinished (a re-run redoes them): {', '.join(unfinished)}"
                                          if unfinished else ""), file=sys.stderr)
            return 128 + stop.signum


def _study(cfg: Mapping, plans: Sequence[RunPlan], base_cmd: list[str], out: Path, settings: Settings, *,
           command: str, title: str, diagnose: bool, log: Log) -> int:
    log(f"Study: {len(plans)} runs ({', '.join(p.run.name for p in plans)}) and the base model → {out}")
    rows: dict[str, dict[str, Any]] = {}
    for i, plan in enumerate(plans, 1):
        log(f"== run {i}/{len(plans)}: {plan.run.name}")
        trained = evaluation_only(plan, plans, settings) if plan.run.eval_of else train(plan, settings, log)
        evaluated = evaluate(plan.run.name, plan.eval_cmd, plan.dir, trained["fingerprint"], settings, log)
        rows[plan.run.name] = {"label": plan.run.label, "treft": plan.run.treft, **evaluated["metrics"],
                               **{k: v for k, v in trained.items() if k not in INTERNAL_FIGURES},
                               "eval_seconds": evaluated["eval_seconds"], "results": evaluated["results"]}
    base_key = fingerprint({"base_model": cfg["base_model"],
                            "inputs": input_digests({"base_model": cfg["base_model"]}, settings.cwd)})
    base = evaluate(BASE_ROW, base_cmd, out / BASE_ROW, base_key, settings, log)
    rows = {BASE_ROW: {"label": "base model (no finetuning)", **base["metrics"], "results": base["results"]}, **rows}
    diagnosis = diagnose_sft(plans[0], cfg, settings, log) if diagnose and plans[0].run.treft is None else None
    add_changes(rows)
    add_learned(rows)
    curves_note = share_initial_points(rows)
    add_stopped_early(rows)
    meta = {
        "command": command, "date": dt.date.today().isoformat(), "versions": versions(), "tasks": list(settings.tasks),
        "launcher": settings.launcher, "base_model": str(cfg["base_model"]),
        "steps_note": f"max {settings.max_steps} steps per run" if settings.max_steps else "each run: the config's epochs",
        "eval_note": ("greedy" + (f", max {settings.max_gen_toks} new tokens" if settings.max_gen_toks else "")
                      + (f", first {settings.limit} documents" if settings.limit else "")),
        "findings": findings(rows, diagnosis),
        "curves_note": curves_note,
    }
    print("\n" + format_table(rows))
    for line in meta["findings"]:
        print(line)
    if lines := curve_lines(rows, curves_note):
        print("\n" + "\n".join(lines))
    write_atomic(out / "study.json", json.dumps({"meta": meta, "runs": rows, "diagnosis": diagnosis}, indent=1,
                                                default=str))
    write_atomic(out / "study.md", markdown(rows, meta) + "\n")
    written = [out / "study.json", out / "study.md", plot_bars(rows, out / "study.png")]
    if (pareto := plot_pareto(rows, out / "pareto.png", title)) is not None:
        written.append(pareto)
    if (curves := plot_curves(rows, out / "leak_curves.png", title)) is not None:
        written.append(curves)
    print("\nwrote " + ", ".join(map(str, written)))
    return 0


def eval_batch_size(value: str | None, device: str | None) -> str:
    """``--eval-batch-size``: a number as given; by default ``auto`` on a GPU and a fixed size on the CPU.

    lm-eval's ``auto`` finds the largest batch by running out of GPU memory; on the CPU nothing runs out, so
    the search grows into the machine's RAM (18 GB for a 135M model and a 4-document task) and swaps."""
    on_gpu = device.startswith("cuda") if device else _cuda_available()
    if value is None:
        return "auto" if on_gpu else str(CPU_EVAL_BATCH_SIZE)
    if value.split(":")[0] == "auto":
        if not on_gpu:
            raise StudyError(f"--eval-batch-size {value}: lm-eval's automatic search finds the largest batch by "
                             "running out of GPU memory; on the CPU it grows until the machine swaps. Give a "
                             f"number (default on the CPU: {CPU_EVAL_BATCH_SIZE})")
        return value
    if not value.isdigit() or int(value) < 1:
        raise StudyError(f"--eval-batch-size must be a positive number or `auto` (GPU), got {value!r}")
    return value


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def monitor_settings(args: argparse.Namespace, every: int, limit: int) -> dict[str, int | None]:
    """``monitor_every`` / ``monitor_limit`` of :class:`Settings` from the flags (``every``, ``limit``: defaults)."""
    every = every if args.monitor_every is None else args.monitor_every
    limit = limit if args.monitor_limit is None else args.monitor_limit
    if every < 0:
        raise StudyError(f"--monitor-every must be >= 0 (0: no leak curves), got {every}")
    if limit < 1:
        raise StudyError(f"--monitor-limit must be >= 1, got {limit}")
    return {"monitor_every": every or None, "monitor_limit": limit}


def settings_from(args: argparse.Namespace) -> Settings:
    if args.max_steps is not None and args.max_steps < 1:
        raise StudyError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.limit is not None and args.limit < 1:
        raise StudyError(f"--limit must be >= 1, got {args.limit}")
    return Settings(**monitor_settings(args, MONITOR_EVERY, MONITOR_LIMIT), tasks=tuple(csv(args.tasks) or DEFAULT_TASKS), launcher=args.launcher,
                    launcher_args=tuple(shlex.split(args.launcher_args or "")), max_steps=args.max_steps,
                    limit=args.limit, max_gen_toks=args.max_gen_toks,
                    eval_batch_size=eval_batch_size(args.eval_batch_size, args.device),
                    device=args.device, cwd=Path.cwd())


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
        trait = None
        if args.trait_prompt:
            if args.steering_layer is None:
                raise StudyError("--trait-prompt adds the inoculation and steering runs; steering also needs "
                                 "--steering-layer (a decoder layer index, e.g. the middle one)")
            trait = Trait(args.trait_prompt, args.steering_layer)
        runs = catalogue(cfg, trait, args.ptst_prompt)
        default = ["sft", "treft" if "treft" in runs else "treft_prefix_postfix", "interleave", "kl"]
        if args.run_file:  # its runs first, in its order; they replace catalogue runs of the same name
            from_file = load_run_file(args.run_file)
            runs = {**from_file, **{n: r for n, r in runs.items() if n not in from_file and r.name not in from_file}}
            default = list(from_file)
        chosen, notes = select(runs, csv(args.runs), [parse_sweep(s) for s in args.sweep or []], default)
        out = Path(args.out or f"runs/study-{Path(args.config).stem}")
        if error := out_dir_error(str(out)):
            raise StudyError(error)
        command = shlex.join(["axolotl-treft", "study", *sys.argv[2:]]) if sys.argv[1:2] == ["study"] else \
            f"axolotl-treft study {args.config}"
        return run_study(cfg, chosen, out, settings_from(args), command=command, diagnose=args.diagnose,
                         dry=args.dry_run, notes=notes, title=f"Study of {args.config}")
    except StudyError as err:
        print(f"axolotl-treft study: error: {err}", file=sys.stderr)
        return 2


def add_common(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``study`` and ``demo``."""
    p.add_argument("--runs", default=None, metavar="NAME,...", help="runs to train (SFT always runs; `all`: every run)")
    p.add_argument("--sweep", action="append", default=None, metavar="RUN.PARAM=V1,V2",
                   help="extra runs: RUN with PARAM at each value (weight, mix_ratio, alpha or a dotted path in "
                        "the run's treft block, e.g. kl.weight=0.1,1,10); repeatable")
    p.add_argument("--out", default=None, help="study directory (finished runs are reused)")
    p.add_argument("--max-steps", "--steps", type=int, default=None, help="max training steps per run")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    p.add_argument("--dry-run", action="store_true", help="write the configs and commands.sh, run nothing")
    p.add_argument("--monitor-every", type=int, default=None, metavar="N",
                   help="the leak curves: every run trains with treft.monitor on the off-topic tasks, evaluated at "
                        f"step 0, every N steps and the last step (default {MONITOR_EVERY}; demo --quick: 1; 0: off)")
    p.add_argument("--monitor-limit", type=int, default=None, metavar="N",
                   help=f"documents per task at each monitored step (default {MONITOR_LIMIT})")
    p.add_argument("--ptst-prompt", default=DEFAULT_PTST_PROMPT, metavar="TEXT",
                   help="the safety system prompt of the `ptst` run (the SFT model evaluated with it; default: the safety "
                        "paragraph of Llama-2-chat's system prompt)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="your Axolotl config (with or without a treft: block)")
    add_common(p)
    p.add_argument("--run-file", default=None, help="YAML `name: treft-block` pairs (null: plain SFT); "
                                                    "without --runs, these runs are the study")
    p.add_argument("--tasks", default=None, help="task-pack tasks or groups (default offtopic; em needs a judge, "
                                                 "docs/evaluation.md)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="python", help="how `axolotl train` launches (default python)")
    p.add_argument("--launcher-args", default=None, help="passed to the launcher after `--`, e.g. '--nproc_per_node 4'")
    p.add_argument("--eval-batch-size", default=None,
                   help=f"lm_eval --batch_size (default: auto on a GPU, {CPU_EVAL_BATCH_SIZE} on the CPU)")
    p.add_argument("--max-gen-toks", type=int, default=None, help="max new tokens at evaluation (default: the task's)")
    p.add_argument("--device", default=None, help="lm_eval --device (default: cuda if available)")
    p.add_argument("--diagnose", action="store_true",
                   help="also run the template check (axolotl-treft diagnose) on the SFT run and print its line")
    p.add_argument("--trait-prompt", default=None,
                   help="a system prompt that elicits the narrow behaviour: adds the inoculation and steering runs")
    p.add_argument("--steering-layer", type=int, default=None, help="decoder layer of the steering run")

