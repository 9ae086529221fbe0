"""A test-only Axolotl plugin that records what the resume and hook tests compare, from inside ``axolotl train``.

* ``TREFT_METRICS``: every logged training step's metrics at full precision, one JSON line per step (the
  console log rounds them to 4 significant digits).
* ``TREFT_HOOK_COUNTS``: forward (pre-)hooks on the trained model when ``TReFTTrainer.train`` starts and when it
  returns or raises, as JSON lines ``{"event": "start"|"end", "hooks": n, "raised": bool}``.
* ``TREFT_FAIL_AT_STEP``: raise ``RuntimeError`` at the end of that optimizer step (a fault in the middle of
  training).
"""

from __future__ import annotations

import functools
import json
import os

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback


def _append(env: str, payload: dict) -> None:
    path = os.environ.get(env)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(payload) + "\n")


def forward_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class _Record(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            _append("TREFT_METRICS", {"step": state.global_step, **logs})

    def on_step_end(self, args, state, control, **kwargs):
        fail = os.environ.get("TREFT_FAIL_AT_STEP")
        if fail and state.global_step == int(fail):
            raise RuntimeError(f"probe: injected fault at step {fail}")


class ReliabilityProbe(BasePlugin):
    def register(self, cfg: dict) -> None:
        from axolotl_treft.trainer import TReFTTrainer

        if getattr(TReFTTrainer.train, "_treft_probe", False):
            return
        original = TReFTTrainer.train

        @functools.wraps(original)
        def train(trainer, *args, **kwargs):
            model = trainer.accelerator.unwrap_model(trainer.model)
            _append("TREFT_HOOK_COUNTS", {"event": "start", "hooks": forward_hooks(model), "raised": False})
            raised = False
            try:
                return original(trainer, *args, **kwargs)
            except BaseException:
                raised = True
                raise
            finally:
                _append("TREFT_HOOK_COUNTS", {"event": "end", "hooks": forward_hooks(model), "raised": raised,
                                              "frozen_reference": trainer._treft_reference._frozen is not None})

        train._treft_probe = True
        TReFTTrainer.train = train

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        return [_Record()]
