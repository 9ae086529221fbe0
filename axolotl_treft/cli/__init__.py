"""The ``axolotl-treft`` command line: the parser in :mod:`.main`, one module per command group
(:mod:`.files`, :mod:`.defenses`, :mod:`.evaluation`, :mod:`.study`), and the libraries behind two of them
(:mod:`.report`, :mod:`.model`). Nothing is imported here, so the libraries load without the CLI."""
