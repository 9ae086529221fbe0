"""``treft.monitor`` and ``treft.eval``: the lm-eval task pack on the live model during training, and on the
final model after it.

Both run inside the training process through lm-eval's own task and metric code (``simple_evaluate`` with an
``HFLM`` wrapping the model object being trained, the chat template applied as ``lm_eval
--apply_chat_template`` does). The monitor decodes greedily with ``bootstrap_iters=0`` and appends
``{"step", "task", "metrics", "seconds"}`` rows to ``OUTPUT_DIR/treft_monitor.jsonl``; every metric is logged
as ``monitor/<task>/<metric>`` through the trainer's ``log`` (trainer_state.json, W&B, trackio, TensorBoard).
``treft.eval`` keeps each task's own decoding and writes lm-eval's results JSON and samples under
``OUTPUT_DIR/eval/`` (the ``--output_path --log_samples`` layout), then logs ``eval/<task>/<metric>``.

Multi-process (DeepSpeed ZeRO-1/2, DDP): parameters are replicated, so rank 0 evaluates its copy while the
other ranks wait at a barrier; ZeRO-3 and FSDP shard the parameters and are refused at validation.
"""

from __future__ import annotations

from .callback import MONITOR_FILE, MonitorCallback, monitor_callback, read_rows
from .checks import check_block, check_parallelism, deepspeed_stage
from .final import EVAL_DIR, final_eval, run_after_training
from .live import LiveTasks, flat, run_tasks, task_metrics

__all__ = ["EVAL_DIR", "MONITOR_FILE", "LiveTasks", "MonitorCallback", "check_block", "check_parallelism",
           "deepspeed_stage", "final_eval", "flat", "monitor_callback", "read_rows", "run_after_training",
           "run_tasks", "task_metrics"]
