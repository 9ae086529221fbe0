"""``axolotl-treft demo``: the study on the embedded model (the README's main job).

It is ``axolotl-treft study`` on the shipped example config (SmolLM2-135M-Instruct, LoRA) and the shipped
training data of one narrow setting (legal questions → abstention by default), evaluated on that setting's
off-topic task with greedy decoding: the same runs, table, JSON, Markdown and plots, plus the template check
of the SFT run (``axolotl-treft diagnose``) under the table.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..cli.options import out_dir_error
from ..resources import data_path, example_path, resolved_example
from .command import MONITOR_EVERY, MONITOR_LIMIT, monitor_settings, run_study
from .execute import Settings
from .runner import OFFLINE_ENV
from .runs import StudyError, Trait, catalogue, parse_sweep, select

EXAMPLE = "smollm2-135m-abstention-treft"
EVAL_MAX_GEN_TOKS = 32  # the target answers are about 10 tokens and start the reply; enough to detect them
EVAL_BATCH_SIZE = "64"
STEERING_LAYER = 15  # the middle of SmolLM2-135M's 30 layers
QUICK_STEPS = 3  # per training run
QUICK_LIMIT = 4  # documents per eval (on/off-topic interleaved, so 2 + 2)
# `axolotl-treft demo` without --runs (docs/study.md, "Which runs the demo trains"): postfix TReFT with the exact
# and the fixed reference side by side, and the two defenses that see other data. Selectable, not default:
# treft_prefix_postfix (the example's own mode: the same figures as postfix here, plus a reference forward),
# steering (no effect here: SFT's figures), inoculation (removes the in-domain behaviour too), ldifs,
# interleave_plus and treft_prefix.
DEFAULT_RUNS = ("sft", "treft_postfix", "treft_postfix_fixed", "interleave", "kl")


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


def example_config(model: str | Path, setting: NarrowSetting) -> dict:
    """The shipped example with the embedded model and the setting's shipped training file."""
    cfg = yaml.safe_load(resolved_example(example_path(EXAMPLE)))
    cfg["base_model"] = str(model)
    cfg["datasets"] = [{**cfg["datasets"][0], "path": str(data_path(setting.train_file))}]
    return cfg


def demo_trait(setting: NarrowSetting) -> Trait:
    return Trait(setting.trait_prompt, STEERING_LAYER)


def sweep_arg(text: str, cfg: dict) -> str:
    """``--sweep 3,300`` (numbers only) sweeps λ of the shipped TReFT setting; anything else is RUN.PARAM=…"""
    if "=" in text:
        return text
    return f"treft_{cfg['treft']['kv']['tokens']}.weight={text}"


def main(args: argparse.Namespace) -> int:
    from ..cli.model import materialize_smollm2

    setting = NARROW_SETTINGS[args.setting]
    out = Path(args.out or ("runs/demo" if args.setting == "abstention" else f"runs/demo-{args.setting}"))
    try:
        if error := out_dir_error(str(out)):
            raise StudyError(error)
        model = materialize_smollm2()
        cfg = example_config(model, setting)
        if args.learning_rate is not None:
            cfg["learning_rate"] = args.learning_rate
        runs = catalogue(cfg, demo_trait(setting), args.ptst_prompt)
        sweeps = [parse_sweep(sweep_arg(s, cfg)) for s in args.sweep or []]
        chosen, notes = select(runs, args.runs.split(",") if args.runs else (["sft"] if sweeps else None), sweeps,
                               DEFAULT_RUNS)
        settings = Settings(tasks=(setting.task,), launcher="python", max_steps=QUICK_STEPS if args.quick else args.max_steps,
                            limit=QUICK_LIMIT if args.quick else args.limit, max_gen_toks=EVAL_MAX_GEN_TOKS,
                            eval_batch_size=EVAL_BATCH_SIZE, device="cpu", env=OFFLINE_ENV, cwd=Path.cwd(),
                            **monitor_settings(args, 1 if args.quick else MONITOR_EVERY,
                                               QUICK_LIMIT if args.quick else MONITOR_LIMIT))
        lr_note = "" if args.learning_rate is None else f" (lr {args.learning_rate:g})"
        command = shlex.join(["axolotl-treft", "demo", *(sys.argv[2:] if sys.argv[1:2] == ["demo"] else [])])
        return run_study(cfg, chosen, out, settings, command=command, diagnose=not args.dry_run, dry=args.dry_run,
                         notes=notes, title=f"Narrow finetuning of SmolLM2-135M-Instruct{lr_note}: does the "
                                            f"{setting.behaviour} leak off-topic?")
    except StudyError as err:
        print(f"axolotl-treft demo: error: {err}", file=sys.stderr)
        return 2
