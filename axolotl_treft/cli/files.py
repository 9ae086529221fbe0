"""File commands: ``model`` (the embedded model), ``tasks-path``, ``path`` and ``example`` (shipped files)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_model(args: argparse.Namespace) -> int:
    from .model import materialize_smollm2

    if args.name != "smollm2":
        print(f"unknown model {args.name!r}; available: smollm2", file=sys.stderr)
        return 2
    try:
        print(materialize_smollm2(args.out_dir, force=args.force))
    except (FileExistsError, NotADirectoryError, ImportError, FileNotFoundError) as err:
        print(f"axolotl-treft model: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_tasks_path(args: argparse.Namespace) -> int:
    from .. import tasks_path

    print(tasks_path())
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    from .. import resources

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


def cmd_example(args: argparse.Namespace) -> int:
    from ..resources import example_path, resolved_example

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


def add_parsers(sub) -> None:
    p = sub.add_parser("model", help="materialize the embedded default model as a Hugging Face directory")
    p.add_argument("name", choices=["smollm2"], help="embedded model")
    p.add_argument("out_dir", nargs="?", default=None, help="target directory (default: the user cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("tasks-path", help="print the lm-eval task pack directory (for --include_path)")
    p.set_defaults(func=cmd_tasks_path)

    p = sub.add_parser("path", help="print the installed path of a shipped example config or data file")
    p.add_argument("kind", choices=["example", "data"], help="example (Axolotl YAML / DeepSpeed JSON) or data (JSONL)")
    p.add_argument("name", nargs="?", default=None,
                   help="a name or unique prefix (`smollm2`, `deepspeed/zero2`, `retain_general.jsonl`); "
                        "omit to list them")
    p.set_defaults(func=cmd_path)

    p = sub.add_parser("example", help="write a shipped example config, its data paths pointing at the installed files")
    p.add_argument("name", help="example name or unique prefix (see `axolotl-treft path example`)")
    p.add_argument("--out", default=None, help="write here instead of standard output")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=cmd_example)
