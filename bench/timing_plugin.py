"""Bench-only Axolotl plugin: per-step wall time and peak training memory, written as JSON.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` reset at train start; on CPU, the peak resident set
size sampled every 5 ms during training minus the RSS at train start (what training adds on top of the
loaded model).
"""

from __future__ import annotations

import json
import os
import threading
import time

import psutil
import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback


class _Timer(TrainerCallback):
    def __init__(self, path: str):
        self.path = path
        self.steps: list[float] = []
        self._t0 = 0.0
        self._proc = psutil.Process()
        self._peak = 0
        self._base = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.005)

    def on_train_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._peak = self._proc.memory_info().rss
            threading.Thread(target=self._sample, daemon=True).start()

    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.steps.append(time.perf_counter() - self._t0)

    def on_train_end(self, args, state, control, **kw):
        self._stop.set()
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else self._peak
        with open(self.path, "w") as f:
            json.dump({"step_s": self.steps, "peak_mib": (peak - self._base) / 2**20,
                       "device": "cuda" if torch.cuda.is_available() else "cpu"}, f)


class StepTimer(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer):
        return [_Timer(os.environ["TREFT_BENCH_OUT"])]
