"""``axolotl treft …``: the project's commands inside Axolotl's CLI (entry point group ``axolotl.cli_commands``)."""

from __future__ import annotations

import click

from .main import main


@click.command(
    name="treft",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
    short_help="TReFT: template-token regularization tools (demo, study, report, ...)",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def treft(args: tuple[str, ...]) -> None:
    """Token-Regularized Finetuning: the axolotl-treft commands (`axolotl treft --help`)."""
    raise SystemExit(main(list(args), prog="axolotl treft"))
