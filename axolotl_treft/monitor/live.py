"""Running lm-eval tasks on a live model object: the monitor's cached tasks and ``treft.eval``'s full run."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .checks import needs_builtin_tasks


@contextmanager
def _eval_mode(model):
    """``model.eval()``, no gradient, and every RNG (python, numpy, torch, CUDA) left as it was, so training
    computes exactly what it would without the evaluation."""
    import numpy as np
    import torch

    was_training = model.training
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            model.train(was_training)
            random.setstate(py_state)
            np.random.set_state(np_state)


def _chat_kwargs(cfg: Any) -> dict[str, Any]:
    thinking = ((cfg.get("chat_template_kwargs") if cfg else None) or {}).get("enable_thinking")
    return {} if thinking is None else {"enable_thinking": thinking}


def _autocast_dtype(cfg: Any) -> str | None:
    if not cfg:
        return None
    return "bfloat16" if cfg.get("bf16") is True else "float16" if cfg.get("fp16") is True else None


def _task_manager(block: Any):
    from lm_eval.tasks import TaskManager

    from ..resources import tasks_dir

    include = [str(tasks_dir()), *[str(Path(p).expanduser()) for p in block.include_path or []]]
    return TaskManager(include_path=include, include_defaults=needs_builtin_tasks(block.tasks, include[1:]),
                       metadata=dict(block.metadata or {}))


def _hflm(model, tokenizer, block: Any, cfg: Any):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=block.batch_size,
                mixed_precision_dtype=_autocast_dtype(cfg), **_chat_kwargs(cfg))


def _gen_kwargs(block: Any, greedy: bool) -> dict[str, Any] | None:
    kwargs: dict[str, Any] = {"max_gen_toks": block.max_gen_toks} if block.max_gen_toks else {}
    if greedy:
        kwargs.update(do_sample=False, temperature=0.0)
    return kwargs or None


class LiveTasks:
    """The monitor's tasks, built once (task index, datasets, prompts) and evaluated on the live model at every
    monitored step through ``lm_eval.evaluator.evaluate``: greedy, no stderr bootstrap, no sample log."""

    def __init__(self, block: Any, cfg: Any, tokenizer) -> None:
        from lm_eval.tasks import get_task_dict

        self.block, self.cfg, self.tokenizer = block, cfg, tokenizer
        self.task_dict = get_task_dict(list(block.tasks), _task_manager(block))
        self._adjust(self.task_dict, _gen_kwargs(block, greedy=True))

    def _adjust(self, task_dict: Mapping, gen_kwargs: dict[str, Any] | None) -> None:
        """What ``simple_evaluate`` does to each leaf task: generation overrides, 0-shot default, fewshot seed."""
        for task in task_dict.values():
            if isinstance(task, Mapping):
                self._adjust(task, gen_kwargs)
                continue
            if gen_kwargs and task.get_config("output_type") == "generate_until":
                task.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)

    def __call__(self, model) -> dict[str, Any]:
        from lm_eval.evaluator import evaluate

        with _eval_mode(model):  # HFLM() calls model.eval(): the mode to restore is read before it
            lm = _hflm(model, self.tokenizer, self.block, self.cfg)
            return evaluate(lm=lm, task_dict=self.task_dict, limit=self.block.limit, bootstrap_iters=0,
                            log_samples=False, apply_chat_template=True, verbosity="WARNING")


def run_tasks(model, tokenizer, block: Any, cfg: Any, output: Path, model_name: str) -> dict[str, Any]:
    """``treft.eval``: lm-eval's results for ``block.tasks`` on ``model``, written with the samples under
    ``output`` as ``lm_eval --output_path --log_samples`` writes them (each task's own decoding)."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(output))
    with _eval_mode(model):
        results = simple_evaluate(
            model=_hflm(model, tokenizer, block, cfg), model_args={"pretrained": model_name},
            tasks=list(block.tasks), task_manager=_task_manager(block), apply_chat_template=True,
            limit=block.limit, gen_kwargs=_gen_kwargs(block, greedy=False), bootstrap_iters=block.bootstrap_iters,
            log_samples=True, evaluation_tracker=tracker, random_seed=0, numpy_random_seed=1234,
            torch_random_seed=1234, fewshot_random_seed=1234,
        )
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    return results


def task_metrics(results: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{task: {metric: value}}`` from lm-eval results: numeric metrics without stderrs, the filter name
    dropped (``on_topic_rate,detected`` → ``on_topic_rate``); NaN becomes None."""
    out: dict[str, dict[str, float | None]] = {}
    for task, entry in (results.get("results") or {}).items():
        metrics = {}
        for name, value in entry.items():
            if "," not in name or "_stderr" in name or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric = name.split(",", 1)[0]
            metrics[metric] = None if math.isnan(value) else float(value)
        if metrics:
            out[task] = metrics
    return out


def flat(metrics: Mapping[str, Mapping[str, float | None]], prefix: str) -> dict[str, float]:
    """``{"<prefix>/<task>/<metric>": value}`` for the trackers (None values left out)."""
    return {f"{prefix}/{task}/{m}": v for task, ms in metrics.items() for m, v in ms.items() if v is not None}
