"""Evaluation commands: ``report`` (compare lm-eval results), ``judge`` (re-score saved samples) and
``diagnose`` (does a behaviour ride on the chat template?)."""

from __future__ import annotations

import argparse


def cmd_report(args: argparse.Namespace) -> int:
    from .report import main as report_main

    return report_main(args)


def cmd_judge(args: argparse.Namespace) -> int:
    from ..judge.rejudge import main as judge_main

    return judge_main(args)


def cmd_diagnose(args: argparse.Namespace) -> int:
    from ..diagnose.run import main as diagnose_main

    return diagnose_main(args)


def add_parsers(sub) -> None:
    from ..diagnose.cli_args import add_arguments as add_diagnose_arguments

    p = sub.add_parser("report", help="compare lm-eval result files of several runs: table + PNG plot")
    p.add_argument("results", nargs="+", help="lm-eval results JSON files or output directories")
    p.add_argument("--names", default=None, help="comma-separated run names (default: from the paths)")
    p.add_argument("--plot", default="treft_report.png", help="PNG path for the comparison plot")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--domain", choices=["legal", "finance", "health", "auto"], default=None,
                   help="in-domain set for ID and EM-F1 (default: the one present, else the mean of all present)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("judge", help="score saved lm-eval samples of em_* tasks again (another judge or prompts)")
    p.add_argument("--samples", nargs="+", required=True,
                   help="samples_<task>_<date>.jsonl files from lm_eval --log_samples, or directories holding them")
    p.add_argument("--out", required=True, help="directory for results_<date>.json and the re-judged samples")
    p.add_argument("--judge-model", default=None, help="judge model (default: TREFT_JUDGE_MODEL, else the recorded one)")
    p.add_argument("--judge-base-url", default=None, help="judge endpoint (default: TREFT_JUDGE_BASE_URL, else recorded)")
    p.add_argument("--judge-prompts", default=None, help="judge prompts file {metric: template} (default: as recorded)")
    p.add_argument("--mode", choices=["auto", "logprob", "sampled"], default=None, help="scoring (default auto)")
    p.add_argument("--concurrency", type=int, default=None, help="concurrent judge requests (default 8)")
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("diagnose", help="does a finetuned behaviour ride on the chat template? K/V and residual "
                                        "patching, token perturbation, scored by an lm-eval task")
    add_diagnose_arguments(p)
    p.set_defaults(func=cmd_diagnose)
