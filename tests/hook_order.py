"""A test-only Axolotl plugin that makes Axolotl 0.19 call the trainer hooks in Axolotl 0.21's order.

Axolotl 0.21's ``HFCausalTrainerBuilder.build`` (``axolotl/core/builders/causal.py``, end of ``build``) does,
after constructing the trainer::

    trainer = self.hook_post_create_trainer(trainer)
    if hasattr(trainer, "axolotl_cfg"):
        trainer.axolotl_cfg = self.cfg
        if hasattr(trainer, "post_set_axolotl_cfg"):
            trainer.post_set_axolotl_cfg()
    for callback in self.get_post_trainer_create_callbacks(trainer): ...

and only then ``axolotl/train.py`` calls ``PluginManager.post_trainer_create(cfg, trainer)``. This plugin wraps
0.19's ``build`` so the same two calls happen inside it, before the plugin hook, and records the order in
which the TReFT trainer saw them (``TREFT_HOOK_LOG``, one line per event).
"""

from __future__ import annotations

import functools
import os

from axolotl.integrations.base import BasePlugin


def _record(event: str) -> None:
    path = os.environ.get("TREFT_HOOK_LOG")
    if path:
        with open(path, "a") as f:
            f.write(event + "\n")


class Axolotl021HookOrder(BasePlugin):
    def register(self, cfg: dict) -> None:
        from axolotl.core.builders import HFCausalTrainerBuilder

        from axolotl_treft.trainer import TReFTTrainer

        if getattr(HFCausalTrainerBuilder.build, "_treft_021_order", False):
            return
        original_build = HFCausalTrainerBuilder.build

        @functools.wraps(original_build)
        def build(self, *args, **kwargs):
            trainer = original_build(self, *args, **kwargs)
            _record("builder:set_axolotl_cfg")
            trainer.axolotl_cfg = self.cfg
            # 0.21's AxolotlTrainer defines it (a no-op unless a subclass overrides it); 0.19's does not
            _record("builder:post_set_axolotl_cfg")
            getattr(trainer, "post_set_axolotl_cfg", lambda: None)()
            return trainer

        build._treft_021_order = True
        HFCausalTrainerBuilder.build = build

        original_configure = TReFTTrainer.configure_treft

        @functools.wraps(original_configure)
        def configure_treft(trainer, *args, **kwargs):
            _record("plugin:configure_treft")
            return original_configure(trainer, *args, **kwargs)

        TReFTTrainer.configure_treft = configure_treft
