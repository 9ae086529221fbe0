"""axolotl-treft: Token-Regularized Finetuning for Axolotl — train with the plugin, measure the off-topic leak.

Commands for the plugin's users: the embedded model and shipped files, the piggyback study, the lm-eval task
pack's path and reports, and SafeLoRA. The same commands run as ``axolotl treft …`` inside Axolotl's CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_model(args: argparse.Namespace) -> int:
    from .models import materialize_smollm2

    if args.name != "smollm2":
        print(f"unknown model {args.name!r}; available: smollm2", file=sys.stderr)
        return 2
    try:
        print(materialize_smollm2(args.out_dir, force=args.force))
    except (FileExistsError, NotADirectoryError, ImportError, FileNotFoundError) as err:
        print(f"axolotl-treft model: {err}", file=sys.stderr)
        return 2
    return 0


def out_dir_error(path: str | None, flag: str = "--out") -> str | None:
    """A message if ``path`` names an existing file where a directory is expected (else None)."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        return f"{flag} {path} is a file; it must be a directory (new or existing)"
    return None


def _cmd_tasks_path(args: argparse.Namespace) -> int:
    from . import tasks_path

    print(tasks_path())
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    from . import resources

    lookup = {"example": resources.example_path, "data": resources.data_path}
    listing = {"example": resources.list_examples, "data": resources.list_data}
    if args.name is None:
        print("\n".join(listing[args.kind]()))
        return 0
    try:
        print(lookup[args.kind](args.name))
    except FileNotFoundError as err:
        print(f"axolotl-treft path: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_example(args: argparse.Namespace) -> int:
    from .resources import example_path, resolved_example

    try:
        text = resolved_example(example_path(args.name))
    except FileNotFoundError as err:
        print(f"axolotl-treft example: {err}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"axolotl-treft example: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    if out.parent != Path("") and not out.parent.is_dir():
        print(f"axolotl-treft example: directory {out.parent} does not exist", file=sys.stderr)
        return 2
    out.write_text(text)
    print(out)
    return 0


def _cmd_safelora(args: argparse.Namespace) -> int:
    from .safelora import main as safelora_main

    if error := out_dir_error(args.out):
        print(f"axolotl-treft safelora: error: {error}", file=sys.stderr)
        return 2
    return safelora_main(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import main as report_main

    return report_main(args)


def _cmd_judge(args: argparse.Namespace) -> int:
    from .judge.rejudge import main as judge_main

    return judge_main(args)


def _cmd_select_retain(args: argparse.Namespace) -> int:
    from .retain_select import main as select_main

    return select_main(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .study.demo import main as demo_main

    return demo_main(args)


def _cmd_study(args: argparse.Namespace) -> int:
    from .study.command import main as study_main

    return study_main(args)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from .diagnose.run import main as diagnose_main

    return diagnose_main(args)


def build_parser(prog: str = "axolotl-treft") -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"axolotl-treft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("model", help="materialize the embedded default model as a Hugging Face directory")
    p.add_argument("name", choices=["smollm2"], help="embedded model")
    p.add_argument("out_dir", nargs="?", default=None, help="target directory (default: the user cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_cmd_model)

    p = sub.add_parser("tasks-path", help="print the lm-eval task pack directory (for --include_path)")
    p.set_defaults(func=_cmd_tasks_path)

    p = sub.add_parser("path", help="print the installed path of a shipped example config or data file")
    p.add_argument("kind", choices=["example", "data"], help="example (Axolotl YAML / DeepSpeed JSON) or data (JSONL)")
    p.add_argument("name", nargs="?", default=None,
                   help="a name or unique prefix (`smollm2`, `deepspeed/zero2`, `retain_general.jsonl`); "
                        "omit to list them")
    p.set_defaults(func=_cmd_path)

    p = sub.add_parser("example", help="write a shipped example config, its data paths pointing at the installed files")
    p.add_argument("name", help="example name or unique prefix (see `axolotl-treft path example`)")
    p.add_argument("--out", default=None, help="write here instead of standard output")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=_cmd_example)

    p = sub.add_parser("safelora", help="project a trained LoRA adapter onto the alignment subspace (SafeLoRA)")
    p.add_argument("--adapter", required=True, help="trained PEFT LoRA adapter directory")
    p.add_argument("--base-model", required=True, help="unaligned base model (path or hub id)")
    p.add_argument("--aligned-model", required=True, help="aligned (instruct) model (path or hub id)")
    p.add_argument("--out", required=True, help="output adapter directory")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--top-k", type=int, default=None, help="project the k modules least aligned (default 10)")
    group.add_argument("--threshold", type=float, default=None, help="project modules with cosine <= threshold")
    p.set_defaults(func=_cmd_safelora)

    p = sub.add_parser("select-retain", help="perplexity-gap retain selection (Interleaving+): write the kept rows")
    p.add_argument("--pool", required=True, help="candidate retain conversations (JSONL/JSON, `messages` lists)")
    narrow = p.add_mutually_exclusive_group(required=True)
    narrow.add_argument("--narrow-model", default=None, help="a model finetuned on the narrow task (path or hub id)")
    narrow.add_argument("--narrow-adapter", default=None, help="or a PEFT adapter of --base-model trained on it")
    p.add_argument("--base-model", required=True, help="the aligned model (the one the narrow model started from)")
    p.add_argument("--top", type=_share, required=True, help="share of the scored pool to keep, in (0, 1]")
    p.add_argument("--out", required=True, help="JSONL file for the kept rows (a .scores.json report goes next to it)")
    p.add_argument("--drop-refusals", action="store_true",
                   help="Interleaving++: first drop rows whose answer has a refusal word among its first ten words")
    p.add_argument("--epsilon", type=float, default=1e-3, help="ε in (L_narrow − L_aligned) / (L_aligned + ε)")
    p.add_argument("--field-messages", default="messages", help="the rows' conversation field")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=_cmd_select_retain)

    p = sub.add_parser("report", help="compare lm-eval result files of several runs: table + PNG plot")
    p.add_argument("results", nargs="+", help="lm-eval results JSON files or output directories")
    p.add_argument("--names", default=None, help="comma-separated run names (default: from the paths)")
    p.add_argument("--plot", default="treft_report.png", help="PNG path for the comparison plot")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--domain", choices=["legal", "finance", "health", "auto"], default=None,
                   help="in-domain set for ID and EM-F1 (default: the one present, else the mean of all present)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("judge", help="score saved lm-eval samples of em_* tasks again (another judge or prompts)")
    p.add_argument("--samples", nargs="+", required=True,
                   help="samples_<task>_<date>.jsonl files from lm_eval --log_samples, or directories holding them")
    p.add_argument("--out", required=True, help="directory for results_<date>.json and the re-judged samples")
    p.add_argument("--judge-model", default=None, help="judge model (default: TREFT_JUDGE_MODEL, else the recorded one)")
    p.add_argument("--judge-base-url", default=None, help="judge endpoint (default: TREFT_JUDGE_BASE_URL, else recorded)")
    p.add_argument("--judge-prompts", default=None, help="judge prompts file {metric: template} (default: as recorded)")
    p.add_argument("--mode", choices=["auto", "logprob", "sampled"], default=None, help="scoring (default auto)")
    p.add_argument("--concurrency", type=int, default=None, help="concurrent judge requests (default 8)")
    p.set_defaults(func=_cmd_judge)
    from .study.command import add_arguments as add_study_arguments
    from .study.command import add_common as add_study_common

    p = sub.add_parser("study", help="SFT vs TReFT vs defenses on your own Axolotl config: derived configs, "
                                     "training through your launcher, lm-eval, table and plots")
    add_study_arguments(p)
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("demo", help="the study on the embedded model and shipped data (SmolLM2-135M, CPU)")
    p.add_argument("--setting", choices=["abstention", "refusal", "tooluse"], default="abstention",
                   help="narrow behaviour: legal → abstention (default), finance → refusal, or health → a "
                        "search_info tool call")
    p.add_argument("--learning-rate", type=_positive_float, default=None, metavar="LR",
                   help="learning rate of every run (default: the example's, 3e-4; at 1e-4 the abstention is "
                        "carried by the template, docs/study.md)")
    add_study_common(p)
    p.add_argument("--quick", action="store_true", help="a few steps per run and a 4-document eval (CI)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("diagnose", help="does a finetuned behaviour ride on the chat template? K/V and residual "
                                        "patching, token perturbation, scored by an lm-eval task")
    from .diagnose.cli_args import add_arguments as add_diagnose_arguments

    add_diagnose_arguments(p)
    p.set_defaults(func=_cmd_diagnose)
    return parser


def main(argv: list[str] | None = None, prog: str = "axolotl-treft") -> int:
    args = build_parser(prog).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
