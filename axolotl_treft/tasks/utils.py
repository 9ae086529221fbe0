"""Thin lm-eval glue: ``!function utils.<name>`` targets. The real code lives in ``axolotl_treft``."""

from axolotl_treft.judge import BehaviourFilter, JudgeFilter, judge_info, process_em, process_offtopic, total
from axolotl_treft.tasks.pack import load_em, load_offtopic

__all__ = ["BehaviourFilter", "JudgeFilter", "process_em", "process_offtopic", "total", "JUDGE_INFO"]

JUDGE_INFO = judge_info()  # judge model / endpoint / prompt hash -> task metadata -> results JSON "configs"


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
