"""Study commands: ``study`` (SFT vs TReFT vs defenses on your config) and ``demo`` (the same on the embedded
model)."""

from __future__ import annotations

import argparse

from .options import positive_float


def cmd_demo(args: argparse.Namespace) -> int:
    from ..study.demo import main as demo_main

    return demo_main(args)


def cmd_study(args: argparse.Namespace) -> int:
    from ..study.command import main as study_main

    return study_main(args)


def add_parsers(sub) -> None:
    from ..study.command import add_arguments as add_study_arguments
    from ..study.command import add_common as add_study_common

    p = sub.add_parser("study", help="SFT vs TReFT vs defenses on your own Axolotl config: derived configs, "
                                     "training through your launcher, lm-eval, table and plots")
    add_study_arguments(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("demo", help="the study on the embedded model and shipped data (SmolLM2-135M, CPU)")
    p.add_argument("--setting", choices=["abstention", "refusal", "tooluse"], default="abstention",
                   help="narrow behaviour: legal → abstention (default), finance → refusal, or health → a "
                        "search_info tool call")
    p.add_argument("--learning-rate", type=positive_float, default=None, metavar="LR",
                   help="learning rate of every run (default: the example's, 3e-4; at 1e-4 the abstention is "
                        "carried by the template, docs/study.md)")
    add_study_common(p)
    p.add_argument("--quick", action="store_true", help="a few steps per run and a 4-document eval (CI)")
    p.set_defaults(func=cmd_demo)
