"""Scoring interventions through lm-eval: every metric of a task, with the intervention active during generation.

``DiagnoseLM`` is lm-eval's own ``HFLM`` around the already-loaded model. It records which conversation
each chat-template rendering came from (``apply_chat_template``), locates the template regions of every
request before generating anything, and wraps each batched ``generate`` in the engine's intervention.
``run_task`` is one ``lm_eval.simple_evaluate`` call per intervention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lm_eval.models.huggingface import HFLM

from ..spans import ConversationSpans
from .engine import (
    EMPTY_REFERENCE_REGIONS,
    Intervention,
    InterventionEngine,
    RegionError,
    check_regions,
    empty_query_regions,
    prompt_regions,
)

RESULT_INFO_KEYS = ("alias", "name", "sample_len", "sample_count")
MEAN_AGGREGATIONS = ("mean", "nanmean")


class TaskError(ValueError):
    """The task cannot be diagnosed: unknown, or not a generation task."""


def task_manager(include_paths: Sequence[str]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths), include_defaults=False)


def check_task(task: str, manager) -> list[str]:
    """Build the task (its dataset and judge checks run now); its leaf task names. Generation tasks only."""
    if task not in manager.all_tasks:
        known = ", ".join(t for t in manager.all_tasks if not t.startswith("_"))
        raise TaskError(f"unknown task {task!r}: not in the task pack or --include-path (known: {known})")
    leaves = load_leaf_tasks([task], manager)
    wrong = {name: t.OUTPUT_TYPE for name, t in leaves.items() if t.OUTPUT_TYPE != "generate_until"}
    if wrong:
        raise TaskError(f"task {task!r} has non-generation subtasks {wrong}; the interventions act on generation, "
                        "so only generate_until tasks can be diagnosed")
    return sorted(leaves)


def load_leaf_tasks(names: Sequence[str], manager) -> dict[str, Any]:
    """{task name: task} for ``names``, groups expanded: ``TaskManager.load`` (lm-eval 0.4.12+, where
    ``get_task_dict`` is deprecated) or ``get_task_dict`` (0.4.11)."""
    if hasattr(manager, "load"):
        return dict(manager.load(list(names))["tasks"])
    from lm_eval.tasks import get_task_dict

    return leaf_tasks(get_task_dict(list(names), manager))


def leaf_tasks(task_dict: Mapping) -> dict[str, Any]:
    """lm-eval's nested task dict (groups inside) flattened to {task name: task}."""
    leaves: dict[str, Any] = {}
    for key, value in task_dict.items():
        if isinstance(value, Mapping):
            leaves.update(leaf_tasks(value))
        else:
            leaves[key if isinstance(key, str) else key.group] = value
    return leaves


class DiagnoseLM(HFLM):
    """``HFLM`` that generates with ``self.intervention`` applied through an ``InterventionEngine``."""

    def __init__(self, engine: InterventionEngine, batch_size: int = 16, **kwargs: Any):
        super().__init__(pretrained=engine.model, tokenizer=engine.tokenizer, backend="causal",
                         batch_size=batch_size, **kwargs)
        self.engine = engine
        engine.template_kwargs = {**self.chat_template_args, **engine.template_kwargs}
        self.intervention = Intervention()
        self._messages: dict[str, list[dict]] = {}  # chat-template rendering → the conversation it renders
        self._spans: dict[str, ConversationSpans] = {}
        self._encoded: list[str] | None = None
        self.required_regions: list[str] = []  # checked on every request before generation

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = super().apply_chat_template(chat_history, add_generation_prompt)
        self._messages[text] = [dict(m) for m in chat_history]
        return text

    def regions(self, text: str) -> ConversationSpans:
        """The template regions of one request's prompt (cached)."""
        if text not in self._spans:
            messages = self._messages.get(text)
            if messages is None:
                raise RegionError("a request's prompt was not rendered through the chat template, so its template "
                                  f"regions are unknown: {text[:200]!r}")
            spans = prompt_regions(self.tokenizer, messages, **self.engine.template_kwargs)
            if spans.text != text:
                raise RegionError(f"re-rendering a request's conversation gives other text than lm-eval's prompt "
                                  f"({spans.text[:200]!r} vs {text[:200]!r}); its template regions cannot be located")
            check_regions(spans, self.required_regions)
            if EMPTY_REFERENCE_REGIONS & set(self.required_regions):
                empty_query_regions(self.tokenizer, messages, spans, **self.engine.template_kwargs)
            self._spans[text] = spans
        return self._spans[text]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        for request in requests:  # every prompt's regions, before anything is generated
            self.regions(request.args[0])
        return super().generate_until(requests, disable_tqdm)

    def tok_batch_encode(self, strings: list[str], *args: Any, **kwargs: Any):
        self._encoded = list(strings)
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs: Any):
        strings, self._encoded = self._encoded, None
        if self.intervention.kind == "none":
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        if strings is None or len(strings) != context.shape[0]:
            raise RuntimeError("lost track of the batch's prompts (lm-eval's generate_until changed?)")
        mask = generation_kwargs.pop("attention_mask")
        batch = self.engine.batch([self._messages[s] for s in strings], context, mask,
                                  spans=[self.regions(s) for s in strings])
        with self.engine.applied(self.intervention, batch) as ids:
            return super()._model_generate(ids, max_length, stop, attention_mask=mask, **generation_kwargs)


def run_task(lm: DiagnoseLM, intervention: Intervention, tasks: Sequence[str], manager, limit: int | None = None,
             gen_kwargs: Mapping[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """One ``lm_eval.simple_evaluate`` of ``tasks`` with ``intervention`` active; the raw results dict."""
    from lm_eval import simple_evaluate

    lm.intervention = intervention
    try:
        return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, apply_chat_template=True,
                               limit=limit, gen_kwargs=dict(gen_kwargs) if gen_kwargs else None, bootstrap_iters=0,
                               log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                               fewshot_random_seed=seed)
    finally:
        lm.intervention = Intervention()


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def task_metrics(results: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{task: {"metric,filter": value}}`` from an lm-eval results dict (stderr and info keys dropped)."""
    out: dict[str, dict[str, float | None]] = {}
    for task, entry in results["results"].items():
        out[task] = {k: _number(v) for k, v in entry.items()
                     if "," in k and "_stderr" not in k and k not in RESULT_INFO_KEYS}
    return out


def higher_is_better(results: Mapping[str, Any]) -> dict[str, dict[str, bool | None]]:
    return {task: dict(v) for task, v in (results.get("higher_is_better") or {}).items()}


def _aggregation_name(results: Mapping[str, Any], task: str, metric: str) -> str | None:
    for item in (results.get("configs", {}).get(task, {}) or {}).get("metric_list") or []:
        if item.get("metric") == metric:
            agg = item.get("aggregation")
            return agg if isinstance(agg, str) else None
    return None


def best_of_trials(trials: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per task and mean-aggregated metric: the mean over documents of each document's best trial value."""
    first = trials[0]
    better = higher_is_better(first)
    best: dict[str, dict[str, float | None]] = {}
    for task, metrics in task_metrics(first).items():
        if task not in first.get("samples", {}):
            continue  # a group's aggregate
        best[task] = {}
        for key in metrics:
            metric, filt = key.split(",", 1)
            if _aggregation_name(first, task, metric) not in MEAN_AGGREGATIONS:
                continue
            sign = 1.0 if better.get(task, {}).get(metric, True) else -1.0
            per_doc: dict[int, float] = {}
            for result in trials:
                for sample in result["samples"][task]:
                    v = _number(sample.get(metric)) if sample.get("filter") == filt else None
                    if v is not None:
                        doc = sample["doc_id"]
                        per_doc[doc] = v if doc not in per_doc else sign * max(sign * per_doc[doc], sign * v)
            best[task][key] = sum(per_doc.values()) / len(per_doc) if per_doc else None
    return best


def mean_of_trials(trials: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per task and metric: the mean over trials of the task's aggregated value."""
    per_trial = [task_metrics(t) for t in trials]
    out: dict[str, dict[str, float | None]] = {}
    for task, metrics in per_trial[0].items():
        out[task] = {}
        for key in metrics:
            values = [m[task][key] for m in per_trial if m[task].get(key) is not None]
            out[task][key] = sum(values) / len(values) if values else None
    return out
