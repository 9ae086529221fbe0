"""axolotl-treft: Token-Regularized Finetuning for Axolotl — train with the plugin, measure the off-topic leak.

Commands for the plugin's users: the embedded model and shipped files, the piggyback study, the lm-eval task
pack's path and reports, and SafeLoRA. The same commands run as ``axolotl treft …`` inside Axolotl's CLI.
"""

from __future__ import annotations

import argparse

from . import defenses, evaluation, files, study


def build_parser(prog: str = "axolotl-treft") -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"axolotl-treft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (files, defenses, evaluation, study):
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None, prog: str = "axolotl-treft") -> int:
    args = build_parser(prog).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
