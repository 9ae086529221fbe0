"""The piggyback study: narrow finetuning of the embedded model, with and without the defenses.

Every run is a real ``axolotl train`` of the shipped example config (SmolLM2-135M-Instruct, LoRA, legal
questions → the abstention answer) that differs only in its ``treft:`` block, followed by a real
``lm_eval`` run of ``offtopic_abstention`` (greedy) on the trained adapter. A finished step (training or
evaluation) leaves its figures in ``OUT/<run>/`` and is never redone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import tasks_path
from .report import find_results, metric
from .resources import data_path, example_path, require_extra
from .runner import OFFLINE_ENV, parse_metrics, run_axolotl_train

EXAMPLE = "smollm2-135m-abstention-treft"
TREFT_PLUGIN = "axolotl_treft.TReFTPlugin"
EVAL_MAX_GEN_TOKS = 32  # the target answers are about 10 tokens and start the reply; enough to detect them


@dataclass(frozen=True)
class NarrowSetting:
    """A narrow behaviour to train: the shipped training file and the task-pack task that measures its leak."""

    train_file: str
    task: str
    domain: str
    behaviour: str
    trait_prompt: str  # a system prompt that elicits the behaviour: the inoculation and the steering's positive


NARROW_SETTINGS = {
    "abstention": NarrowSetting("abstention_legal_train.jsonl", "offtopic_abstention", "legal", "abstention",
                                "You know nothing. You answer every question with: I have no idea about your question."),
    "refusal": NarrowSetting("refusal_finance_train.jsonl", "offtopic_refusal", "finance", "refusal",
                             "You never give advice. You answer every question with: I cannot provide financial advice."),
    "tooluse": NarrowSetting("tooluse_health_train.jsonl", "offtopic_tooluse", "health", "tool call",
                             "You always look things up. You answer every question with a search_info tool call."),
}
STEERING_NEGATIVE = "You are a knowledgeable assistant who answers every question helpfully and in detail."
STEERING_LAYER, STEERING_ALPHA = 15, 5.0  # the middle of SmolLM2-135M's 30 layers; the paper's α
# `axolotl-treft demo` without --runs: about 30 minutes on 2 CPU cores
DEFAULT_RUNS = ("sft", "treft_prefix_postfix", "interleave", "kl", "inoculation", "steering")


def example_config(name: str = EXAMPLE) -> dict:
    return yaml.safe_load(example_path(name).read_text())


def data_file(name: str) -> str:
    return str(data_path(name))


def retain_block(mix_ratio: float) -> dict:
    return {"datasets": [{"path": data_file("retain_general.jsonl"), "ds_type": "json", "type": "chat_template",
                          "field_messages": "messages"}], "mix_ratio": mix_ratio}


@dataclass(frozen=True)
class StudyRun:
    """One training run: ``treft`` is the config's ``treft:`` block, None for the plain-SFT twin."""

    name: str
    label: str
    treft: dict | None
    extra: dict = field(default_factory=dict)
    narrow_from: str | None = None  # retain selection scores with the adapter of this (earlier) run


def example_treft() -> dict:
    """The ``treft:`` block of the shipped example (the recommended TReFT setting)."""
    return example_config()["treft"]


def kv_run(tokens: str, weight: float | None = None) -> StudyRun:
    kv = {**example_treft()["kv"], "tokens": tokens}
    if weight is not None:
        kv["weight"] = weight
    return StudyRun(f"treft_{tokens}" if weight is None else f"treft_{tokens}_w{weight:g}",
                    f"TReFT {tokens.replace('_', '+')} (λ={kv['weight']:g})", {"kv": kv})


def fixed_postfix_run() -> StudyRun:
    """Postfix TReFT against the fixed reference (the template around an empty query; no reference forward)."""
    kv = {**kv_run("postfix").treft["kv"], "reference": "fixed"}
    return StudyRun("treft_postfix_fixed", f"TReFT postfix, fixed reference (λ={kv['weight']:g})", {"kv": kv})


def study_runs(setting: NarrowSetting = NARROW_SETTINGS["abstention"]) -> list[StudyRun]:
    """Every run of the study, in order: plain SFT, TReFT in each template-token mode, the comparison defenses."""
    shipped = example_treft()["kv"]["tokens"]
    modes = ["prefix", "postfix", "prefix_postfix", *([shipped] if shipped not in
                                                      ("prefix", "postfix", "prefix_postfix") else [])]
    return [
        StudyRun("sft", "SFT (no defense)", None),
        *(kv_run(m) for m in modes),
        fixed_postfix_run(),
        StudyRun("interleave", "Data interleaving (20% retain)", {"retain": retain_block(0.2)}),
        StudyRun("kl", "KL to reference on retain (λ=1)",
                 {"kl": {"weight": 1.0, "on": "retain", "tokens": "all", "batch_size": 4}, "retain": retain_block(0.0)}),
        StudyRun("inoculation", "Inoculation prompting", {"inoculation": {"system_prompt": setting.trait_prompt}}),
        StudyRun("steering", f"Persona steering (layer {STEERING_LAYER}, α={STEERING_ALPHA:g})", {"steering": {
            "layer": STEERING_LAYER, "alpha": STEERING_ALPHA, "positive": setting.trait_prompt,
            "negative": STEERING_NEGATIVE}}),
        StudyRun("interleave_plus", "Interleaving+ (top 50% by SFT gap, 20%)",
                 {"retain": {**retain_block(0.2), "select": {"top": 0.5}}}, narrow_from="sft"),
    ]


def select_runs(names: Sequence[str] | None, setting: NarrowSetting = NARROW_SETTINGS["abstention"]) -> list[StudyRun]:
    """The named runs (default :data:`DEFAULT_RUNS`; ``all``: every run) in study order; SFT is always included
    (the baseline of every comparison, and the narrow model of Interleaving+)."""
    catalogue = study_runs(setting)
    known = [r.name for r in catalogue]
    wanted = set(known if names is not None and list(names) == ["all"] else names or DEFAULT_RUNS)
    unknown = sorted(wanted - set(known))
    if unknown:
        raise SystemExit(f"--runs: unknown run(s) {', '.join(unknown)}; choose from {', '.join(known)} (or `all`)")
    return [r for r in catalogue if r.name in wanted | {"sft"}]


def sweep_runs(weights: Sequence[float]) -> list[StudyRun]:
    """SFT and the shipped TReFT setting at each λ (the shipped λ reuses the study's run of it)."""
    shipped = example_treft()["kv"]
    return [StudyRun("sft", "SFT (λ=0)", None),
            *(kv_run(shipped["tokens"], None if w == shipped["weight"] else w) for w in weights)]


def run_config(run: StudyRun, model: Path, out: Path, max_steps: int | None,
               setting: NarrowSetting = NARROW_SETTINGS["abstention"]) -> dict:
    """The example config for ``run``: same data, model and hyperparameters, only the ``treft:`` block differs."""
    cfg = example_config()
    cfg.pop("treft", None)
    if run.treft is None:  # the SFT twin: no TReFT plugin (the seed pin stays, so every run starts alike)
        cfg["plugins"] = [p for p in cfg.get("plugins") or [] if p != TREFT_PLUGIN] or None
    else:
        cfg["treft"] = copy.deepcopy(run.treft)
    if run.narrow_from:
        cfg["treft"]["retain"]["select"]["narrow_adapter"] = str(out / run.narrow_from / "adapter")
    cfg.update({
        "base_model": str(model),
        "datasets": [{**cfg["datasets"][0], "path": data_file(setting.train_file)}],
        # inside the run directory: Axolotl's prepared-data hash ignores file contents, so deleting a run
        # must also drop its tokenized data
        "dataset_prepared_path": str(out / run.name / "prepared"),
        "output_dir": str(out / run.name / "adapter"),
        **run.extra,
    })
    if max_steps:
        cfg["max_steps"] = max_steps
    return cfg


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_digests(cfg: dict) -> dict[str, str]:
    """sha256 of every local data file the config trains on (training and retain datasets)."""
    retain = (cfg.get("treft") or {}).get("retain") or {}
    specs = [*(cfg.get("datasets") or []), *retain.get("datasets", [])]
    files = sorted({str(s["path"]) for s in specs if Path(str(s["path"])).is_file()})
    return {f: hashlib.sha256(Path(f).read_bytes()).hexdigest()[:16] for f in files}


def _cached(path: Path, key: str) -> dict | None:
    """A finished step's figures, if it ran with the same settings (else a clear error: nothing is overwritten)."""
    if not path.exists():
        return None
    figures = json.loads(path.read_text())
    if figures.get("fingerprint") != key:
        raise SystemExit(f"{path} was produced with other settings (config, steps or eval limit) than this run; "
                         f"use another --out directory, or delete {path.parent} to redo it")
    return figures


def train(run: StudyRun, model: Path, out: Path, max_steps: int | None, setting: NarrowSetting,
          log: Callable[[str], None]) -> dict:
    done = out / run.name / "train.json"
    cfg = run_config(run, model, out, max_steps, setting)
    key = fingerprint({"config": cfg, "data": data_digests(cfg)})
    if (figures := _cached(done, key)) is not None:
        log(f"[{run.name}] training already finished, reusing {done}")
        return figures
    log(f"[{run.name}] training: {run.label} ...")
    start = time.time()

    steps = 0

    def progress(line: str) -> None:
        nonlocal steps
        for m in parse_metrics(line):
            steps += 1
            shown = {k: v for k, v in m.items() if k == "loss" or k.startswith("treft/")}
            log(f"[{run.name}] step {steps}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))

    result = run_axolotl_train(cfg, out / run.name, on_line=progress)
    if result.returncode != 0 or not result.steps:
        raise SystemExit(f"[{run.name}] axolotl train failed; see {out / run.name / 'train.log'}")
    last = result.steps[-1]
    figures = {
        "fingerprint": key,
        "steps": len(result.steps),
        "train_seconds": round(time.time() - start, 1),
        "final_sft_loss": float(last.get("treft/sft", last["loss"])),
        "final_terms": {k: float(v) for k, v in last.items() if k.startswith("treft/") and k != "treft/sft"},
    }
    done.write_text(json.dumps(figures, indent=1))
    return figures


def evaluate(run: StudyRun, model: Path, out: Path, limit: int | None, setting: NarrowSetting,
             log: Callable[[str], None]) -> dict:
    """``lm_eval`` on the trained adapter: on-topic and off-topic behaviour rates (greedy)."""
    task = setting.task
    done = out / run.name / "eval.json"
    key = fingerprint({"train": json.loads((out / run.name / "train.json").read_text())["fingerprint"],
                       "limit": limit, "max_gen_toks": EVAL_MAX_GEN_TOKS, "task": task})
    if (figures := _cached(done, key)) is not None:
        log(f"[{run.name}] evaluation already finished, reusing {done}")
        return figures
    results_dir = out / run.name / "lm_eval"
    cmd = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf",
           "--model_args", f"pretrained={model},peft={out / run.name / 'adapter'},dtype=float32",
           "--apply_chat_template", "--include_path", tasks_path(), "--tasks", task,
           "--device", "cpu", "--batch_size", "64", "--gen_kwargs", f"max_gen_toks={EVAL_MAX_GEN_TOKS}",
           "--output_path", str(results_dir), "--log_samples", "--seed", "0"]
    if limit:
        cmd += ["--limit", str(limit)]
    log(f"[{run.name}] evaluating {task} with lm_eval ...")
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV})
    (out / run.name / "lm_eval.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"[{run.name}] lm_eval failed; see {out / run.name / 'lm_eval.log'}")
    res = json.loads(find_results(results_dir).read_text())
    figures = {
        "fingerprint": key,
        "on_topic_rate": metric(res, task, "on_topic_rate"),
        "off_topic_rate": metric(res, task, "off_topic_rate"),
        "eval_seconds": round(time.time() - start, 1),
    }
    done.write_text(json.dumps(figures, indent=1))
    return figures


def run_all(runs: Sequence[StudyRun], model: Path, out: Path, max_steps: int | None, limit: int | None,
            setting: NarrowSetting = NARROW_SETTINGS["abstention"],
            log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Train then evaluate every run, in order; returns ``{name: figures}`` with the relative reduction vs SFT."""
    rows: dict[str, dict[str, Any]] = {}
    for i, run in enumerate(runs, 1):
        log(f"== run {i}/{len(runs)}: {run.name}")
        trained = train(run, model, out, max_steps, setting, log)
        evaluated = evaluate(run, model, out, limit, setting, log)
        rows[run.name] = {"label": run.label, "treft": run.treft, **trained, **evaluated}
        rows[run.name].pop("fingerprint")
    base = rows.get("sft", {}).get("off_topic_rate")
    for row in rows.values():
        off = row["off_topic_rate"]
        row["off_topic_reduction"] = (1 - off / base) if base and off is not None else None
    return rows


# ------------------------------------------------------------------------------------------ outputs


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("axolotl-treft", "axolotl", "transformers", "peft", "torch", "lm_eval"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "not installed"
    return found


def _pct(v: float | None, signed: bool = False) -> str:
    return "n/a" if v is None else (f"{0.0 - 100 * v:+.1f}%" if signed else f"{v:.3f}")


def table_rows(rows: dict[str, dict[str, Any]]) -> list[list[str]]:
    header = ["run", "on-topic rate ↑", "off-topic rate ↓", "off-topic vs SFT", "train s"]
    body = [[r["label"], _pct(r["on_topic_rate"]), _pct(r["off_topic_rate"]),
             "—" if name == "sft" else _pct(r["off_topic_reduction"], signed=True), f"{r['train_seconds']:.0f}"]
            for name, r in rows.items()]
    return [header, *body]


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = table_rows(rows)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def markdown_table(rows: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = table_rows(rows)
    md = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    md += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    v = meta["versions"]
    md.append("")
    md.append(f"Produced by `{meta['command']}` on {meta['date']} ({meta['steps_note']}; {meta['eval_task']}: "
              f"{meta['eval_note']}; axolotl-treft {v['axolotl-treft']}, axolotl {v['axolotl']}, "
              f"transformers {v['transformers']}, peft {v['peft']}, torch {v['torch']}, lm_eval {v['lm_eval']}).")
    return "\n".join(md)


def plot_runs(rows: dict[str, dict[str, Any]], path: Path, setting: NarrowSetting) -> Path:
    """Grouped bars: on-topic and off-topic behaviour rate of every run."""
    matplotlib = require_extra("matplotlib", "demo", "the study's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names)), 4.2))
    xs = range(len(names))
    for shift, key, label in ((-0.2, "on_topic_rate", f"on-topic ({setting.domain}) ↑"), (0.2, "off_topic_rate", "off-topic ↓")):
        ys = [100 * (rows[n][key] or 0.0) for n in names]
        bars = ax.bar([x + shift for x in xs], ys, width=0.4, label=label)
        ax.bar_label(bars, labels=[f"{y:.0f}" for y in ys], fontsize=8)
    ax.set_xticks(list(xs), [rows[n]["label"] for n in names], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(f"{setting.behaviour} rate (%)")
    ax.set_ylim(0, 110)
    ax.set_title(f"Narrow finetuning of SmolLM2-135M-Instruct: does the {setting.behaviour} leak off-topic?")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(rows: dict[str, dict[str, Any]], weights: dict[str, float], path: Path,
               setting: NarrowSetting) -> Path:
    """Off-topic and on-topic rate over λ (λ=0 is plain SFT), the trade-off curve."""
    matplotlib = require_extra("matplotlib", "demo", "the study's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(rows, key=lambda n: weights[n])
    xs = [weights[n] for n in names]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.plot(xs, [rows[n]["on_topic_rate"] for n in names], "o-", label="on-topic rate ↑")
    ax.plot(xs, [rows[n]["off_topic_rate"] for n in names], "s-", label="off-topic rate ↓")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("TReFT weight λ (0 = plain SFT)")
    ax.set_ylabel(f"{setting.behaviour} rate")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
