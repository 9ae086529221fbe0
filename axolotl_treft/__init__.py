"""axolotl-treft: Token-Regularized Finetuning for Axolotl, and an lm-eval task pack for the leak it stops.

Enable in an Axolotl config::

    plugins:
      - axolotl_treft.TReFTPlugin
    treft:
      kv: {weight: 5.0, tokens: prefix}
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["SeedPlugin", "TReFTPlugin", "tasks_path", "__version__"]


def tasks_path() -> str:
    """Directory of the lm-eval task pack, for ``lm_eval --include_path``."""
    from .resources import tasks_dir

    return str(tasks_dir())


def __getattr__(name: str):
    # Lazy, so that `import axolotl_treft` (CLI, lm-eval utils) does not import axolotl and torch.
    if name in ("TReFTPlugin", "SeedPlugin"):
        from . import plugin

        return getattr(plugin, name)
    if name.lower().endswith("plugin"):  # e.g. `plugins: [axolotl_treft.TReftPlugin]`: name the real ones
        import difflib

        close = difflib.get_close_matches(name, ["TReFTPlugin", "SeedPlugin"], n=1, cutoff=0.5)
        hint = f"did you mean `axolotl_treft.{close[0]}`? " if close else ""
        raise AttributeError(f"axolotl_treft has no plugin {name!r}: {hint}the plugins are "
                             "`axolotl_treft.TReFTPlugin` and `axolotl_treft.SeedPlugin`")
    raise AttributeError(f"module 'axolotl_treft' has no attribute {name!r}")
