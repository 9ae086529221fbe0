"""Test-only Axolotl plugin: seed torch right before the model loads.

Axolotl seeds only when the trainer is built, after the LoRA weights are initialized, and torch's global
RNG differs between processes at that point; two runs can only be compared bit for bit when the
initialization is pinned. Both runs of a comparison use this plugin.
"""

import torch
from axolotl.integrations.base import BasePlugin


class SeedModelLoad(BasePlugin):
    def pre_model_load(self, cfg):
        torch.manual_seed(int(cfg.seed or 0))
