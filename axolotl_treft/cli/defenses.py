"""Defense commands: ``safelora`` (projection after training) and ``select-retain`` (Interleaving+ data)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import out_dir_error, share


def _local(text: str) -> Path | None:
    """``text`` as a local path when it names one (it exists, or reads as a path rather than a hub id)."""
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        return path
    return None


def model_path(text: str) -> str:
    """A model: a hub id, or a local model directory that exists."""
    path = _local(text)
    if path is not None and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory (a local model directory or a hub id)")
    return text


def adapter_path(text: str) -> str:
    """A PEFT adapter: a hub id, or a local directory with ``adapter_config.json``."""
    path = _local(text)
    if path is not None and not (path / "adapter_config.json").is_file():
        what = "does not exist" if not path.exists() else "has no adapter_config.json"
        raise argparse.ArgumentTypeError(f"{text} {what} (a PEFT adapter directory, such as a LoRA run's "
                                         "output_dir, or a hub id)")
    return text


def cmd_safelora(args: argparse.Namespace) -> int:
    from ..defenses.safelora import main as safelora_main

    if error := out_dir_error(args.out):
        print(f"axolotl-treft safelora: error: {error}", file=sys.stderr)
        return 2
    return safelora_main(args)


def cmd_select_retain(args: argparse.Namespace) -> int:
    from ..defenses.retain_select import main as select_main

    return select_main(args)


def add_parsers(sub) -> None:
    p = sub.add_parser("safelora", help="project a trained LoRA adapter onto the alignment subspace (SafeLoRA)")
    p.add_argument("--adapter", required=True, help="trained PEFT LoRA adapter directory")
    p.add_argument("--base-model", required=True, help="unaligned base model (path or hub id)")
    p.add_argument("--aligned-model", required=True, help="aligned (instruct) model (path or hub id)")
    p.add_argument("--out", required=True, help="output adapter directory")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--top-k", type=int, default=None, help="project the k modules least aligned (default 10)")
    group.add_argument("--threshold", type=float, default=None, help="project modules with cosine <= threshold")
    p.set_defaults(func=cmd_safelora)

    p = sub.add_parser("select-retain", help="perplexity-gap retain selection (Interleaving+): write the kept rows")
    p.add_argument("--pool", required=True, help="candidate retain conversations (JSONL/JSON, `messages` lists)")
    narrow = p.add_mutually_exclusive_group(required=True)
    narrow.add_argument("--narrow-model", type=model_path, default=None,
                        help="a model finetuned on the narrow task (path or hub id)")
    narrow.add_argument("--narrow-adapter", type=adapter_path, default=None,
                        help="or a PEFT adapter of --base-model trained on it")
    p.add_argument("--base-model", type=model_path, required=True,
                   help="the aligned model (the one the narrow model started from)")
    p.add_argument("--top", type=share, required=True, help="share of the scored pool to keep, in (0, 1]")
    p.add_argument("--out", required=True, help="JSONL file for the kept rows (a .scores.json report goes next to it)")
    p.add_argument("--drop-refusals", action="store_true",
                   help="Interleaving++: first drop rows whose answer has a refusal word among its first ten words")
    p.add_argument("--epsilon", type=float, default=1e-3, help="ε in (L_narrow − L_aligned) / (L_aligned + ε)")
    p.add_argument("--field-messages", default="messages", help="the rows' conversation field")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=cmd_select_retain)
