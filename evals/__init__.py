"""The lm-eval task pack (``lm_eval --include_path evals``), shipped in the wheel as ``axolotl_treft.evals``.

YAML tasks, their data and the thin ``utils.py`` of ``!function`` targets; the logic lives in
:mod:`axolotl_treft.tasks`.
"""
