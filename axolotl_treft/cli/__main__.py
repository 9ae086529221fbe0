"""``python -m axolotl_treft.cli``: the ``axolotl-treft`` command."""

from .main import main

raise SystemExit(main())
