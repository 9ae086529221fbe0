"""Plan, train and evaluate the runs of a study.

Each run lives in ``OUT/<run>/``: ``config.yml`` (the derived config), ``model/`` (Axolotl's output_dir),
``prepared/`` (its tokenized data), ``train.log``, ``lm_eval/`` and the figures of each finished step
(``train.json``, ``eval.json``). A finished step with the same settings is reused; a run directory made
with other settings is refused before anything trains. Per-run paths and ``--max-steps`` are passed to
``axolotl train`` as command-line overrides, so the config files differ from the user's only in the plugin
list and the ``treft:`` block.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..cli.report import find_results, load_results, summarize
from ..monitor.callback import MONITOR_FILE
from ..monitor.curves import read_curves
from ..resources import pack_tasks, tasks_dir
from .keys import eval_key, fingerprint, input_digests, trained_digest
from .leak import add_monitor, keyed_config, monitor_block
from .runner import UNFINISHED, Stopped, mark_unfinished, parse_metrics, run_streaming, write_atomic
from .runs import StudyError, StudyRun, derive_config
from .settings import Settings

LAUNCHERS = ("python", "torchrun", "accelerate")
PEAK_MEMORY_KEY = "memory/max_allocated (GiB)"  # logged by Axolotl's trainer on GPU
BASE_ROW = "base"

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunPlan:
    run: StudyRun
    dir: Path
    config: dict
    overrides: dict[str, Any]
    train_cmd: list[str]
    eval_cmd: list[str]
    upstream: RunPlan | None = None  # the run whose trained model this one's retain selection scores with

    @property
    def model_dir(self) -> Path:
        return Path(self.overrides["output_dir"])


def executable(name: str) -> str:
    """``name`` next to this interpreter (the venv's; bare when PATH finds that one), else as found on PATH."""
    local = Path(sys.executable).with_name(name)
    if not local.exists():
        return name
    found = shutil.which(name)
    return name if found and Path(found).resolve() == local.resolve() else str(local)


def check_tasks(tasks: Sequence[str]) -> None:
    known = pack_tasks()
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise StudyError(f"--tasks: {', '.join(unknown) or 'none given'} not in the task pack; "
                         f"known: {', '.join(known)}")


def is_adapter(cfg: Mapping) -> bool:
    return cfg.get("adapter") in ("lora", "qlora")


def model_args(cfg: Mapping, model: str, adapter: str | None, tokenizer: str | None) -> str:
    """lm-eval ``--model_args`` for a trained run (``adapter`` on the base model, or a full model directory)."""
    args = [f"pretrained={model}"]
    if adapter:
        args.append(f"peft={adapter}")
    if tokenizer:
        args.append(f"tokenizer={tokenizer}")
    args.append("dtype=" + ("bfloat16" if cfg.get("bf16") in (True, "auto") else
                            "float16" if cfg.get("fp16") else "float32"))
    if cfg.get("trust_remote_code"):
        args.append("trust_remote_code=True")
    thinking = (cfg.get("chat_template_kwargs") or {}).get("enable_thinking")
    if thinking is not None:
        args.append(f"enable_thinking={thinking}")
    return ",".join(args)


def eval_command(cfg: Mapping, args: str, output: Path, settings: Settings, system: str | None = None) -> list[str]:
    cmd = [executable("lm_eval"), "--model", "hf", "--model_args", args, "--apply_chat_template",
           "--include_path", str(tasks_dir()), "--tasks", ",".join(settings.tasks), "--batch_size",
           settings.eval_batch_size, "--output_path", str(output), "--log_samples", "--seed", "0"]
    if settings.device:
        cmd += ["--device", settings.device]
    if settings.max_gen_toks:
        cmd += ["--gen_kwargs", f"max_gen_toks={settings.max_gen_toks}"]
    if settings.limit:
        cmd += ["--limit", str(settings.limit)]
    if system:  # PTST: lm-eval puts it before the task's own description, as the system message
        cmd += ["--system_instruction", system]
    return cmd


def _custom_template(cfg: Mapping) -> bool:
    """The config sets a chat template of its own: it is saved with the trained model's tokenizer."""
    return bool(cfg.get("chat_template")) and cfg.get("chat_template") != "tokenizer_default"


def plan_study(cfg: Mapping, runs: Sequence[StudyRun], out: Path, settings: Settings,
               log: Log = print) -> tuple[list[str], list[RunPlan]]:
    """The base model's evaluation command and every run's plan (derived config, commands)."""
    out = out.resolve()
    plans: list[RunPlan] = []
    trained: dict[str, Path] = {}
    monitor, note = monitor_block(cfg, settings)
    log(note)
    first_monitored = True
    for run in runs:
        derived, notes = derive_config(cfg, run)
        for note in notes:
            log(note)
        if monitor and not run.eval_of:
            derived = add_monitor(derived, monitor, initial=first_monitored)
            first_monitored = False
        run_dir = out / run.name
        overrides: dict[str, Any] = {"output_dir": str(run_dir / "model"),
                                     "dataset_prepared_path": str(run_dir / "prepared")}
        if settings.max_steps:
            overrides["max_steps"] = settings.max_steps
        if run.narrow_from:
            if run.narrow_from not in trained:
                raise StudyError(f"run {run.name} scores its retain pool with run {run.narrow_from}, "
                                 "which must be in the study before it")
            select = derived["treft"]["retain"]["select"]
            key = "narrow_adapter" if is_adapter(cfg) else "narrow_model"
            select[key] = str(trained[run.narrow_from])
        if run.eval_of and run.eval_of not in trained:
            raise StudyError(f"run {run.name} evaluates the trained model of run {run.eval_of}, which must be in "
                             "the study before it")
        trained[run.name] = trained[run.eval_of] if run.eval_of else run_dir / "model"
        train_cmd = [executable("axolotl"), "train", str(run_dir / "config.yml"), "--launcher", settings.launcher]
        for key, value in overrides.items():
            train_cmd += [f"--{key.replace('_', '-')}", str(value)]
        if settings.launcher_args:
            train_cmd += ["--", *settings.launcher_args]
        model = trained[run.name]
        tokenizer = str(model) if _custom_template(cfg) else None
        args = model_args(cfg, cfg["base_model"], str(model), tokenizer) if is_adapter(cfg) else \
            model_args(cfg, str(model), None, None)
        upstream = next((p for p in plans if p.run.name == run.narrow_from), None)
        plans.append(RunPlan(run, run_dir, derived, overrides, train_cmd,
                             eval_command(cfg, args, run_dir / "lm_eval", settings, run.system_prompt), upstream))
    check_output_dirs(plans, settings.cwd)
    base_tokenizer = str(plans[0].model_dir) if _custom_template(cfg) and plans else None
    base_cmd = eval_command(cfg, model_args(cfg, cfg["base_model"], None, base_tokenizer), out / BASE_ROW / "lm_eval",
                            settings)
    return base_cmd, plans


def output_dirs(plan: RunPlan, cwd: Path) -> list[Path]:
    """Every directory the run writes a model to: Axolotl's output_dir and SafeLoRA's, if it sets one."""
    dirs = [plan.model_dir]
    safelora = (plan.config.get("treft") or {}).get("safelora") or {}
    if safelora.get("output_dir"):
        dirs.append((cwd / safelora["output_dir"]).resolve())
    return dirs


def check_output_dirs(plans: Sequence[RunPlan], cwd: Path) -> None:
    """Refuse two runs writing to one directory (they would overwrite each other's model)."""
    owner: dict[Path, str] = {}
    for plan in plans:
        for path in output_dirs(plan, cwd):
            if path in owner:
                raise StudyError(f"runs {owner[path]} and {plan.run.name} share the output_dir {path}; "
                                 "give each run its own")
            owner[path] = plan.run.name


# ------------------------------------------------------------------------------------------ fingerprints


def train_key(plan: RunPlan, settings: Settings) -> str:
    """Every input of the run: derived config, overrides, the local files and directories it names, and the
    key of its upstream run (the path of the upstream's model is keyed by that, not by its current files)."""
    skip = frozenset({str(plan.upstream.model_dir)}) if plan.upstream else frozenset()
    return fingerprint({"config": keyed_config(plan.config), "overrides": plan.overrides,
                        "inputs": input_digests(plan.config, settings.cwd, skip),
                        "upstream": train_key(plan.upstream, settings) if plan.upstream else None})


def upstream_weights(plan: RunPlan) -> dict[str, str | None]:
    """The weights the upstream run produced, as its ``train.json`` records them ({} without an upstream)."""
    if plan.upstream is None:
        return {}
    done = plan.upstream.dir / "train.json"
    figures = json.loads(done.read_text()) if done.exists() else {}
    return {plan.upstream.run.name: figures.get("model_digest")}


def _cached(path: Path, key: str) -> dict | None:
    """A finished step's figures if it ran with the same settings; a clear error if with others."""
    if not path.exists():
        return None
    figures = json.loads(path.read_text())
    if figures.get("fingerprint") != key:
        raise StudyError(f"{path.parent} was made with other settings (config, data, steps, tasks or eval "
                         f"limit) than this study; use another --out, or delete {path.parent} to redo it")
    return figures


def check_reusable(plans: Sequence[RunPlan], settings: Settings) -> None:
    """Refuse, before any training, a run directory holding a run made with other settings."""
    for plan in plans:
        key = train_key(plan, settings)
        _cached(plan.dir / "train.json", key)
        if (plan.dir / "train.json").exists():
            _cached(plan.dir / "eval.json", eval_key(key, plan.eval_cmd))


# ------------------------------------------------------------------------------------------ steps


def _env(settings: Settings) -> dict[str, str]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": path, **settings.env}


def evaluation_only(plan: RunPlan, plans: Sequence[RunPlan], settings: Settings) -> dict:
    """What an evaluation-only run (``ptst``) has in place of training: its source run's key (trained before)."""
    source = next(p for p in plans if p.run.name == plan.run.eval_of)
    trained = _cached(source.dir / "train.json", train_key(source, settings))
    # keyed by the weights too: the source run trained again (same settings) makes this evaluation run again
    return {"fingerprint": fingerprint({"train": trained["fingerprint"], "weights": trained.get("model_digest")}),
            "eval_only": f"the model of run {source.run.name}, evaluated with a system prompt"}


def write_config(plan: RunPlan) -> Path:
    plan.dir.mkdir(parents=True, exist_ok=True)
    path = plan.dir / "config.yml"
    path.write_text(yaml.safe_dump(plan.config, sort_keys=False))
    return path


def run_step(cmd: list[str], settings: Settings, log_path: Path, what: str,
             on_line: Log | None = None) -> tuple[int, str]:
    """``cmd`` in its own process group, its output to ``log_path``; stopped with its tree by a stop signal
    (the run directory is then marked unfinished, and the :class:`Stopped` goes on)."""
    try:
        returncode, output = run_streaming(cmd, settings.cwd, _env(settings), on_line=on_line)
    except Stopped as stop:
        log_path.write_text(stop.output)
        mark_unfinished(log_path.parent, f"{what} stopped by {stop.name} at {time.strftime('%Y-%m-%d %H:%M:%S')}; "
                                         "a re-run of the study redoes it")
        raise
    log_path.write_text(output)
    return returncode, output


def _reusable_training(plan: RunPlan, key: str, log: Log) -> dict | None:
    """The finished run's figures, unless its upstream run has trained again since (then: None)."""
    done = plan.dir / "train.json"
    if (figures := _cached(done, key)) is None:
        return None
    if figures.get("upstream", {}) != upstream_weights(plan):
        log(f"[{plan.run.name}] its upstream run {plan.upstream.run.name} was trained again since: training again")
        return None
    log(f"[{plan.run.name}] training already finished, reusing {done}")
    return figures


def _reset(plan: RunPlan, settings: Settings) -> None:
    """Before (re)training: nothing of an earlier attempt is left to be taken for this one's."""
    for name in ("train.json", "eval.json", "diagnose.key"):
        (plan.dir / name).unlink(missing_ok=True)
    for path in output_dirs(plan, settings.cwd):
        if path.is_dir() and path.is_relative_to(plan.dir):
            shutil.rmtree(path)
    mark_unfinished(plan.dir, f"training started at {time.strftime('%Y-%m-%d %H:%M:%S')} and has not finished")


def train(plan: RunPlan, settings: Settings, log: Log) -> dict:
    """``axolotl train`` through the chosen launcher; the figures of the finished run."""
    key = train_key(plan, settings)
    if (figures := _reusable_training(plan, key, log)) is not None:
        return figures
    _reset(plan, settings)
    write_config(plan)
    log(f"[{plan.run.name}] training: {plan.run.label} ...")
    steps = 0

    def progress(line: str) -> None:
        nonlocal steps
        for m in parse_metrics(line):
            steps += 1
            shown = {k: v for k, v in m.items() if k == "loss" or k.startswith("treft/")}
            log(f"[{plan.run.name}] step {steps}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))

    start = time.time()
    returncode, output = run_step(plan.train_cmd, settings, plan.dir / "train.log", "training", progress)
    metrics = parse_metrics(output)
    if returncode != 0 or not metrics:
        raise StudyError(f"[{plan.run.name}] axolotl train failed (exit {returncode}); see {plan.dir / 'train.log'}")
    last = metrics[-1]
    peaks = [float(m[PEAK_MEMORY_KEY]) for m in metrics if PEAK_MEMORY_KEY in m]
    figures = {
        "fingerprint": key,
        "steps": len(metrics),
        "train_seconds": round(time.time() - start, 1),
        "peak_gpu_gib": max(peaks) if peaks and max(peaks) > 0 else None,  # Axolotl logs 0 without a GPU
        "final_sft_loss": float(last.get("treft/sft", last["loss"])),
        "final_terms": {k: float(v) for k, v in last.items() if k.startswith("treft/") and k != "treft/sft"},
        "model_digest": trained_digest(output_dirs(plan, settings.cwd)),
        "upstream": upstream_weights(plan),
        "curves": read_curves(plan.model_dir / MONITOR_FILE),  # {task: [{step, on/off-topic rate}]}
    }
    write_atomic(plan.dir / "train.json", json.dumps(figures, indent=1))
    (plan.dir / UNFINISHED).unlink(missing_ok=True)
    return figures


def evaluate(name: str, cmd: list[str], run_dir: Path, train: str, settings: Settings, log: Log) -> dict:
    """``lm_eval`` on one model; the task pack's summary row of its results."""
    done = run_dir / "eval.json"
    key = eval_key(train, cmd)
    if (figures := _cached(done, key)) is not None:
        log(f"[{name}] evaluation already finished, reusing {done}")
        return figures
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"[{name}] evaluating {','.join(settings.tasks)} with lm_eval (batch size {settings.eval_batch_size}) ...")
    start = time.time()
    returncode, _ = run_step(cmd, settings, run_dir / "lm_eval.log", "evaluation")
    if returncode != 0:
        raise StudyError(f"[{name}] lm_eval failed (exit {returncode}); see {run_dir / 'lm_eval.log'}")
    results = find_results(Path(cmd[cmd.index("--output_path") + 1]))
    row = summarize(load_results(results))
    figures = {"fingerprint": key, "results": str(results), "eval_seconds": round(time.time() - start, 1),
               "metrics": {k: v for k, v in row.items() if v is not None and v != ""}}
    write_atomic(done, json.dumps(figures, indent=1))
    (run_dir / UNFINISHED).unlink(missing_ok=True)
    return figures


def diagnose_sft(plan: RunPlan, cfg: Mapping, settings: Settings, log: Log) -> dict | None:
    """``axolotl-treft diagnose`` of the SFT run: template K/V patched, and the query control. Its JSON."""
    task = next((t for t in settings.tasks if t.startswith("offtopic_")), None)
    if task is None:
        log("template check skipped: it scores an offtopic_* task, and none is in --tasks")
        return None
    where = plan.dir / "diagnose"
    model = ["--adapter", str(plan.model_dir)] if is_adapter(cfg) else ["--model", str(plan.model_dir)]
    cmd = [executable("axolotl-treft"), "diagnose", "--base-model", str(cfg["base_model"]), *model, "--task", task,
           "--patch", "prefix_postfix,query", "--out", str(where), "--force"]
    if settings.limit:
        cmd += ["--limit", str(settings.limit)]
    if settings.max_gen_toks:
        cmd += ["--max-gen-toks", str(settings.max_gen_toks)]
    key = fingerprint({"train": json.loads((plan.dir / "train.json").read_text())["fingerprint"], "cmd": cmd[1:]})
    stamp = plan.dir / "diagnose.key"
    if stamp.exists() and stamp.read_text() == key and (where / "diagnose.json").exists():
        log(f"[{plan.run.name}] template check already finished, reusing {where / 'diagnose.json'}")
    else:
        log(f"[{plan.run.name}] template check: axolotl-treft diagnose --patch prefix_postfix,query ...")
        returncode, _ = run_step(cmd, settings, plan.dir / "diagnose.log", "template check")
        if returncode != 0:
            raise StudyError(f"[{plan.run.name}] axolotl-treft diagnose failed; see {plan.dir / 'diagnose.log'}")
        stamp.write_text(key)
        (plan.dir / UNFINISHED).unlink(missing_ok=True)
    return json.loads((where / "diagnose.json").read_text())


def shell(cmd: Sequence[str]) -> str:
    return shlex.join(cmd)
