"""The ``axolotl-treft`` command line: one module per command group (:mod:`.files`, :mod:`.defenses`,
:mod:`.evaluation`, :mod:`.study`), the parser in :mod:`.main`."""

from .main import main

__all__ = ["main"]
