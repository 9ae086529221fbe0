"""``python -m tests.axolotl_cli train CFG``: the ``axolotl`` console script's body (``axolotl.cli.main:main``), run
as a package's ``__main__``.

The difference is in the start-up of spawned workers, not in what runs: ``datasets`` saves every prepared
dataset through a ``spawn`` pool (also with ``num_proc=1``), and a spawned worker re-imports the parent's main
script (for the console script, all of Axolotl: ~6 s per dataset here) unless the main module is a package's
``__main__``. Measured on one family run (2 datasets): 79 s with the console script, 63 s with this. The tests of
the commands users type (the wheel, ``study``, ``demo``, DeepSpeed) keep the console script.
"""

import sys

from axolotl.cli.main import main

sys.exit(main())
