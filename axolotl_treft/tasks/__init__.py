"""The task pack's logic: question loading, off-topic detectors, lm-eval filters and metrics, judge glue.

The task files themselves (YAML, data, the thin ``utils.py``) are in ``evals/`` (``axolotl_treft.evals`` when
installed).
"""
