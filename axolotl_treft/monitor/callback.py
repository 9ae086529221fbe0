"""``treft.monitor``: the callback that evaluates the live model every N steps."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..distributed import is_main_process
from ..log import get_logger
from .live import LiveTasks, flat, task_metrics

LOG = get_logger(__name__)

MONITOR_FILE = "treft_monitor.jsonl"


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MonitorCallback:
    """Evaluates ``treft.monitor.tasks`` at step 0 (unless ``initial`` is false), every ``every`` optimizer steps
    and at the last step.

    Built by :func:`monitor_callback` (a ``transformers.TrainerCallback`` subclass, so this module imports
    without transformers). Resuming from a checkpoint at step N keeps the file's rows up to N (step N's row, if
    due, was written before that checkpoint was saved), drops later ones (those steps train again) and continues;
    a fresh run (step 0) replaces an old file.
    """

    def __init__(self, cfg: Any, trainer: Any, block: Any) -> None:
        self.cfg = cfg
        self.block = block  # the typed treft.monitor settings
        self.trainer = trainer
        self.path = Path(str(cfg.output_dir)) / MONITOR_FILE
        self.tasks: LiveTasks | None = None  # built at the first evaluation (rank 0 only)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._resume(state.global_step)
        # A resumed run's step was monitored (or not due) before its checkpoint was saved: never evaluated twice.
        self._maybe_evaluate(state, control, model, due=state.global_step == 0 and self.block.initial)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        self._maybe_evaluate(state, control, model, due=step % self.block.every == 0 or step >= state.max_steps)

    def _resume(self, step: int) -> None:
        if not is_main_process():
            return
        rows = read_rows(self.path)
        kept = [r for r in rows if step > 0 and r["step"] <= step]
        if len(kept) != len(rows):
            LOG.warning("treft.monitor: %s: %s %d row(s) %s", self.path, "replacing" if step == 0 else "dropping",
                        len(rows) - len(kept), "of an earlier run" if step == 0 else f"after step {step} (resumed "
                        "from that checkpoint; those steps are trained and monitored again)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def _maybe_evaluate(self, state, control, model, due: bool) -> None:
        """Rank 0 evaluates; the others wait at a barrier (the same decision on every rank)."""
        if not due:
            return
        if is_main_process():
            should_log = control.should_log  # trainer.log() clears it: the step's loss would not be logged
            self._evaluate(state.global_step, model)
            control.should_log = should_log
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            accelerator.wait_for_everyone()

    def _evaluate(self, step: int, model) -> None:
        start = time.perf_counter()
        if self.tasks is None:
            self.tasks = LiveTasks(self.block, self.cfg, self.trainer.processing_class)
        results = self.tasks(model)
        seconds = time.perf_counter() - start
        metrics = task_metrics(results)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for task, values in metrics.items():
                f.write(json.dumps({"step": step, "task": task, "metrics": values, "seconds": round(seconds, 3)})
                        + "\n")
        LOG.info("treft.monitor: step %d (%.1f s): %s", step, seconds, headline(metrics))
        self.trainer.log({**flat(metrics, "monitor"), "monitor/seconds": round(seconds, 3)})


def monitor_callback(cfg: Any, trainer: Any, block: Any):
    """The monitor as a ``transformers.TrainerCallback`` for ``add_callbacks_post_trainer``."""
    from transformers import TrainerCallback

    cls = type("TReFTMonitorCallback", (MonitorCallback, TrainerCallback), {})
    return cls(cfg, trainer, block)


def headline(metrics: Mapping[str, Mapping[str, float | None]]) -> str:
    return "; ".join(f"{task}: " + ", ".join(f"{m}={'-' if v is None else f'{v:.3f}'}" for m, v in ms.items())
                     for task, ms in metrics.items())


