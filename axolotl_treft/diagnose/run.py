"""``axolotl-treft diagnose``: measure a task with the finetuned model as is and under each intervention.

Every bad input (output path, task, adapter directory, regions, layers) is refused before a model is
loaded; an adapter or finetune that does not fit the base is refused right after loading, before any
generation. ``measure`` is the in-process entry point (used by the behaviour screen): it takes loaded
models and a ``Plan`` and returns the rows that ``report`` formats.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from ..capture import CaptureError, decoder_layers, projection_modules
from ..cli.report import versions
from ..judge import JudgeConfigError
from ..resources import tasks_dir
from ..spans import TemplateSpanError
from .cli_args import PATCH_DEFAULT
from .engine import (
    EMPTY_REFERENCE_REGIONS,
    REGIONS,
    Intervention,
    InterventionEngine,
    check_regions,
    empty_query_regions,
    prompt_regions,
)
from .loading import ModelMismatchError, check_adapter_dir, load_models, tokenizer_dir
from .report import format_table, headline, markdown, plot, recovery, summary, table
from .scoring import (
    DiagnoseLM,
    TaskError,
    best_of_trials,
    check_task,
    higher_is_better,
    mean_of_trials,
    run_task,
    task_manager,
    task_metrics,
)

REGION_LABELS = {"prefix": "prefix", "postfix": "postfix", "postfix_empty": "postfix (empty-query ref.)",
                 "prefix_postfix": "prefix+postfix", "query": "query (control)"}
LAYERWISE_REGION = "prefix"


class InputError(ValueError):
    """A command-line value that cannot work, found before anything is loaded."""


@dataclass
class Plan:
    """What to measure: K/V patching per region, layer-wise residual patching, token perturbation."""

    patch: list[str] = field(default_factory=lambda: PATCH_DEFAULT.split(","))
    layers: tuple[int, ...] | None = None  # K/V patching layers; None = all
    layerwise: bool = False
    perturb: list[str] = field(default_factory=list)
    trials: int = 10
    k: int = 10
    seed: int = 0
    temperature: float = 1.0


def parse_regions(text: str | None, flag: str) -> list[str]:
    if not text or text == "none":
        return []
    regions = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        raise InputError(f"{flag}: unknown region(s) {', '.join(unknown)}; choose from {', '.join(REGIONS)}")
    return list(dict.fromkeys(regions))


def parse_layers(text: str | None, n_layers: int) -> tuple[int, ...] | None:
    if text is None or text == "all":
        return None
    try:
        layers = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError as err:
        raise InputError(f"--layers: expected 'all' or comma-separated layer numbers such as 0,1,5, got {text!r}") from err
    bad = [x for x in layers if not 0 <= x < n_layers]
    if not layers or bad:
        raise InputError(f"--layers: the model has layers 0..{n_layers - 1}; got {text!r}")
    return layers


def _label(intervention) -> str:
    if intervention.kind == "none":
        return "unpatched"
    region = REGION_LABELS[intervention.region]
    if intervention.kind == "kv":
        at = "" if intervention.layers is None else f" @ layers {','.join(map(str, intervention.layers))}"
        return f"K/V {region}{at}"
    return f"residual {region} @ layer {intervention.layers[0]}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,@#=-]+", "_", name)


def _write_samples(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for task, samples in results.get("samples", {}).items():
            for s in samples:
                row = {"task": task, "doc_id": s["doc_id"], "prompt": s["arguments"][0][0],
                       "response": s["resps"][0][0] if s["resps"] and s["resps"][0] else None,
                       "filtered": s["filtered_resps"], **{m: s.get(m) for m in s.get("metrics", [])}}
                f.write(json.dumps(row, default=str) + "\n")


@dataclass
class Measurement:
    """Rows of the table (unpatched first), the layer-wise rows, and the headline (task, metric, lower_is_better)."""

    rows: list[dict[str, Any]]
    layerwise: list[dict[str, Any]]
    headline: tuple[str, str, bool]


def measure(lm, tasks: Sequence[str], manager, plan: Plan, limit: int | None = None,
            max_gen_toks: int | None = None, samples_dir: Path | None = None,
            log: Callable[[str], None] = print) -> Measurement:
    """Run every intervention of ``plan`` through lm-eval (one ``simple_evaluate`` each)."""
    greedy = {"max_gen_toks": max_gen_toks} if max_gen_toks else {}
    sampled = {**greedy, "do_sample": True, "temperature": plan.temperature}
    n_layers = len(decoder_layers(lm.engine.model))
    single = [Intervention()] + [Intervention("kv", r, layers=plan.layers) for r in plan.patch]
    layerwise = [Intervention("residual", LAYERWISE_REGION, layers=(i,)) for i in range(n_layers)] \
        if plan.layerwise else []
    lm.required_regions = list(dict.fromkeys([*plan.patch, *plan.perturb,
                                              *([LAYERWISE_REGION] if plan.layerwise else [])]))
    total = len(single) + len(layerwise) + (plan.trials * (1 + len(plan.perturb)) if plan.perturb else 0)
    done = 0
    rows: list[dict[str, Any]] = []
    layer_rows: list[dict[str, Any]] = []
    first: dict | None = None

    def one(intervention, gen_kwargs, seed, name):
        nonlocal done, first
        done += 1
        start = time.time()
        results = run_task(lm, intervention, tasks, manager, limit, gen_kwargs, seed)
        seconds = time.time() - start
        first = first or results
        if samples_dir is not None:
            _write_samples(results, samples_dir / f"{_safe(name)}.jsonl")
        log(f"[{done}/{total}] {name}: {_short(task_metrics(results))} ({seconds:.1f} s)")
        return results, seconds

    for intervention in [*single, *layerwise]:
        results, seconds = one(intervention, greedy, plan.seed, intervention.name)
        row = {"name": intervention.name, "label": _label(intervention), "kind": intervention.kind,
               "region": intervention.region, "layers": list(intervention.layers) if intervention.layers else None,
               "metrics": task_metrics(results), "seconds": round(seconds, 1)}
        (layer_rows if intervention.kind == "residual" else rows).append(row)
    for region in ([None, *plan.perturb] if plan.perturb else []):
        trials, seconds = [], 0.0
        for t in range(plan.trials):
            iv = Intervention() if region is None else Intervention("perturb", region, trial=t, k=plan.k,
                                                                    seed=plan.seed)
            results, s = one(iv, sampled, plan.seed + t, f"sampled#{t}" if region is None else iv.name)
            trials.append(results)
            seconds += s
        base = "sampled, unperturbed" if region is None else f"perturb {REGION_LABELS[region]} (k={plan.k})"
        name = "sampled" if region is None else f"perturb:{region}"
        for stat, metrics in (("avg", mean_of_trials(trials)), ("best", best_of_trials(trials))):
            rows.append({"name": f"{name}/{stat}", "label": f"{base}: {stat} of {plan.trials}",
                         "kind": "none" if region is None else "perturb", "region": region, "layers": None,
                         "metrics": metrics, "seconds": round(seconds, 1), "trials": plan.trials, "stat": stat})
    head = headline(rows[0]["metrics"], higher_is_better(first))
    base_value = rows[0]["metrics"][head[0]].get(head[1])
    for row in [*rows, *layer_rows]:
        row["recovers"] = None if row is rows[0] else recovery(base_value, row["metrics"].get(head[0], {}).get(head[1]),
                                                                 head[2])
    return Measurement(rows, layer_rows, head)


def _short(metrics: dict) -> str:
    return ", ".join(f"{k.split(',', 1)[0]} {v:.3f}" for values in metrics.values() for k, v in values.items()
                     if v is not None and not k.startswith("judge_errors"))


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (every option that was set)."""
    argv = ["axolotl-treft", "diagnose"]
    for key, value in vars(args).items():
        if key in ("func", "command", "force") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            argv += [flag] if v is True else [flag, str(v)]
    return shlex.join(argv)


def _validate(args: argparse.Namespace) -> tuple[Path, Plan, list[str]]:
    """Everything that can be checked without loading a model."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; pass a directory")
    if (out / "diagnose.json").exists() and not args.force:
        raise InputError(f"--out {out} already holds a diagnose run (diagnose.json); pass --force to overwrite it "
                         "or choose another directory")
    if args.adapter is None and args.model is None:
        raise InputError("pass --adapter (a PEFT adapter of --base-model) or --model (a full finetune of it)")
    for name, value, low in (("--trials", args.trials, 1), ("--k", args.k, 1), ("--limit", args.limit, 1),
                             ("--batch-size", args.batch_size, 1), ("--max-gen-toks", args.max_gen_toks, 1)):
        if value is not None and value < low:
            raise InputError(f"{name} must be >= {low}, got {value}")
    if args.temperature <= 0:
        raise InputError(f"--temperature must be > 0 (perturbation trials sample), got {args.temperature}")
    include = [str(p) for p in (args.include_path or [])]
    for p in include:
        if not Path(p).is_dir():
            raise InputError(f"--include-path {p} is not a directory of lm-eval task YAMLs")
    plan = Plan(patch=parse_regions(args.patch, "--patch"), layerwise=args.layerwise,
                perturb=parse_regions(args.perturb, "--perturb"), trials=args.trials, k=args.k, seed=args.seed,
                temperature=args.temperature)
    return out, plan, include


def _probe_regions(tokenizer, regions: Sequence[str]) -> None:
    """The chat template must expose every requested region (before any model is loaded)."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    spans = prompt_regions(tokenizer, messages)
    check_regions(spans, regions)
    if EMPTY_REFERENCE_REGIONS & set(regions):
        empty_query_regions(tokenizer, messages, spans)


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except (InputError, TemplateSpanError, ModelMismatchError, TaskError, JudgeConfigError, CaptureError) as err:
        print(f"axolotl-treft diagnose: error: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    out, plan, include = _validate(args)
    if args.adapter is not None:
        check_adapter_dir(args.adapter)
    finetuned = args.model or args.base_model
    plan.layers = parse_layers(args.layers, AutoConfig.from_pretrained(finetuned).get_text_config().num_hidden_layers)
    tok_dir = tokenizer_dir([args.adapter or args.model, args.base_model])
    _probe_regions(AutoTokenizer.from_pretrained(tok_dir),
                   [*plan.patch, *plan.perturb, *([LAYERWISE_REGION] if plan.layerwise else [])])
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = task_manager([str(tasks_dir()), *include])
    tasks = check_task(args.task, manager)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    start = time.time()
    print(f"diagnose {args.task} ({', '.join(tasks)}) on {args.adapter or args.model} → {out}", flush=True)
    loaded = load_models(args.base_model, args.adapter, args.model, args.dtype, device)
    if plan.patch:  # a model with fused qkv projections is refused here, not at its first K/V patch
        projection_modules(loaded.model, "k_proj"), projection_modules(loaded.model, "v_proj")
    engine = InterventionEngine(loaded.model, loaded.tokenizer, loaded.initial)
    lm = DiagnoseLM(engine, batch_size=args.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    measured = measure(lm, [args.task], manager, plan, args.limit, args.max_gen_toks, out / "samples",
                       log=lambda line: print(line, flush=True))
    rows, layer_rows, head = measured.rows, measured.layerwise, measured.headline
    lines = table(rows, head)
    line = summary(rows, head)
    settings = {"base_model": args.base_model, "adapter": args.adapter, "model": args.model, "task": args.task,
                "tasks": tasks, "include_paths": [str(tasks_dir()), *include], "tokenizer": loaded.tokenizer_source,
                **asdict(plan), "limit": args.limit, "batch_size": args.batch_size, "max_gen_toks": args.max_gen_toks,
                "device": device, "dtype": args.dtype, "decoding": "greedy (perturbation trials: sampled)"}
    payload = {"command": command_line(args),
               "date": dt.datetime.now().isoformat(timespec="seconds"), "settings": settings, "versions": versions(),
               "headline": {"task": head[0], "metric": head[1], "lower_is_better": head[2]}, "summary": line,
               "interventions": {r["name"]: r for r in rows}, "layerwise": {r["name"]: r for r in layer_rows},
               "total_seconds": round(time.time() - start, 1)}
    (out / "diagnose.json").write_text(json.dumps(payload, indent=1, default=str))
    md = [f"# diagnose: {args.task}", "", markdown(lines), "", line, ""]
    if layer_rows:
        md += ["Layer-wise residual patching at the prefix:", "", markdown(table([rows[0], *layer_rows], head)), ""]
    md.append(f"`{payload['command']}`, {payload['date']}; {settings['decoding']}.")
    (out / "diagnose.md").write_text("\n".join(md) + "\n")
    png = plot(rows, head, layer_rows, out / "diagnose.png", f"{args.task}: {args.adapter or args.model}")
    print("\n" + format_table(lines))
    if layer_rows:
        print("\nlayer-wise residual patching at the prefix:\n" + format_table(table([rows[0], *layer_rows], head)))
    print(f"\n{line}\n\nwrote {out / 'diagnose.json'}, {out / 'diagnose.md'}, {png} "
          f"({payload['total_seconds']:.0f} s)")
    return 0
