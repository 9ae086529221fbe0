"""Thin lm-eval glue: ``!function utils.<name>`` targets. The real code lives in ``axolotl_treft``."""

from axolotl_treft.tasks.metrics import BehaviourFilter, JudgeFilter, process_em, process_offtopic, total
from axolotl_treft.tasks.pack import load_em, load_offtopic

__all__ = ["BehaviourFilter", "JudgeFilter", "RECORD", "process_em", "process_offtopic", "total"]

# Filled by the dataset loaders when a task is built: per task, the question file (path, sha256), the judge
# settings and prompts. Task metadata holds this object, so lm-eval writes it into the results JSON.
RECORD: dict = {}


def load_em_general(**meta):
    return load_em("em_general", **meta)


def load_em_indomain_legal(**meta):
    return load_em("em_indomain_legal", **meta)


def load_em_indomain_finance(**meta):
    return load_em("em_indomain_finance", **meta)


def load_em_indomain_health(**meta):
    return load_em("em_indomain_health", **meta)


def load_em_indomain_auto(**meta):
    return load_em("em_indomain_auto", **meta)


def load_offtopic_abstention(**meta):
    return load_offtopic("abstention", **meta)


def load_offtopic_refusal(**meta):
    return load_offtopic("refusal", **meta)


def load_offtopic_tooluse(**meta):
    return load_offtopic("tooluse", **meta)
