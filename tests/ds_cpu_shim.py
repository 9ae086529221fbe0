"""Test-only Axolotl plugin: let ``axolotl train --launcher torchrun`` run DeepSpeed on CPU processes.

accelerate 1.13 only recognizes a multi-process run without an accelerator when ``cpu=True``, and
``cpu=True`` also turns DeepSpeed off (the model is then never wrapped by the engine). With ``cpu=False``
and no CUDA, ``PartialState`` picks no backend and reports one process, although DeepSpeed has already
joined the 2-process group: the HF side then sizes batches for world size 1.

Two fixes. (1) Importing this module (Axolotl imports plugins in ``load_cfg``, before ``prepare_optim_env`` creates the
first ``PartialState``) patches ``PartialState._prepare_backend`` so that, under a launcher
(``LOCAL_RANK`` set) with no CUDA, the backend is ``gloo`` and the type ``MULTI_CPU``. accelerate then
initializes DeepSpeed's communication with gloo, counts every process, uses the CPU device, and still
switches to ``DistributedType.DEEPSPEED``. (2) ``normalize_config`` sets ``device_map = {"": LOCAL_RANK}``
(a CUDA index) for multi-process runs; ZeRO-3 drops it but ZeRO-2 passes it to ``from_pretrained``, which
fails with "Cannot access accelerator device when none is available". The plugin's ``load_datasets`` hook
(the first hook after ``normalize_config``, before the model loads) sets it to the CPU. Nothing changes on
a machine with CUDA. (3) ZeRO-1/2 gather the updated weights after the optimizer step with
``all_gather_into_tensor`` into a flat buffer that autograd tracks (it was flattened from parameters);
gloo implements that collective by writing into ``split`` views of the output, which autograd rejects in
grad mode ("Output 0 of Split is a view and is being modified inplace"; plain ``deepspeed.initialize``
ZeRO-2 on CPU fails the same way). The shim runs that gather under ``no_grad`` (NCCL writes the buffer
directly, so GPU runs never hit this).

Use it as the first entry of ``plugins:``, with ``DS_ACCELERATOR=cpu`` in the environment.

The plugin also adds a probe callback that prints one ``TREFT_DS_PROBE {json}`` line per rank and step:
what wraps the model (engine class, ZeRO stage, world size), how many policy / frozen-reference parameters
are partitioned, how many tokens the KV regularizer selected on this rank, and a checksum of the cached
prefix reference, so that tests can check what actually ran on every rank; and a ``TREFT_DS_LOG {json}``
line with each logged metrics dict at full precision (rank 0). Without a launcher it only probes.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

_original = PartialState._prepare_backend


def _multi_cpu() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _prepare_backend(self, cpu: bool = False, sagemaker_dp=False, backend: str | None = None):
    found, kind = _original(self, cpu, sagemaker_dp, backend)
    if kind == DistributedType.NO and int(os.environ.get("LOCAL_RANK", -1)) != -1 and _multi_cpu():
        return backend or "gloo", DistributedType.MULTI_CPU
    return found, kind


def _no_grad(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    wrapper._treft_cpu_shim = True
    return wrapper


if not getattr(PartialState._prepare_backend, "_treft_cpu_shim", False):
    _prepare_backend._treft_cpu_shim = True
    PartialState._prepare_backend = _prepare_backend
    from deepspeed.runtime import bf16_optimizer
    from deepspeed.runtime.zero import stage_1_and_2

    for _module in (stage_1_and_2, bf16_optimizer):
        _module.all_gather_dp_groups = _no_grad(_module.all_gather_dp_groups)


def _partitioned(module) -> list[int]:
    """[partitioned, total] parameter tensors (ZeRO-3 leaves a 0-size stub in ``param.data``)."""
    if module is None:
        return [0, 0]
    params = list(module.parameters())
    return [sum(1 for p in params if hasattr(p, "ds_tensor") and p.numel() == 0), len(params)]


def _probe(trainer, step: int) -> dict:
    plugin = trainer.accelerator.state.deepspeed_plugin
    reference = getattr(trainer, "_treft_reference", None)
    frozen = getattr(reference, "_frozen", None)
    line = {
        "rank": trainer.accelerator.process_index,
        "world": trainer.accelerator.num_processes,
        "step": step,
        "engine": type(trainer.model_wrapped).__name__,
        "zero_stage": plugin.zero_stage if plugin is not None else None,
        "policy_partitioned": _partitioned(trainer.model),
        "frozen_reference": type(reference._frozen_engine).__name__ if frozen is not None else None,
        "frozen_partitioned": _partitioned(frozen),
    }
    for reg in getattr(trainer, "treft_regularizers", []):
        if hasattr(reg, "last_selected"):
            line[f"{reg.key}_selected"] = reg.last_selected
        cache = getattr(reg, "_cache", None)
        if cache is not None:
            line[f"{reg.key}_cache"] = [len(cache), int(cache[0].shape[0]),
                                        float(sum(c.double().sum() for c in cache)),
                                        float(sum(c.double().abs().sum() for c in cache))]
    return line


def _emit(tag: str, payload: dict) -> None:
    # one write (< PIPE_BUF), so lines of different ranks never interleave inside a payload
    sys.stdout.write(f"\n{tag} {json.dumps(payload, default=float)}\n")
    sys.stdout.flush()


class _Probe(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        _emit("TREFT_DS_PROBE", _probe(self.trainer, state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:  # full precision, rank 0
            _emit("TREFT_DS_LOG", {"step": state.global_step, **logs})


class CPUDeepSpeed(BasePlugin):
    """Applies the patch above on import; adds the probe callback."""

    def load_datasets(self, cfg, preprocess: bool = False):
        # normalize_config sets device_map = {"": LOCAL_RANK} for multi-process runs, i.e. a CUDA index;
        # ZeRO-3 drops it, ZeRO-2 passes it to from_pretrained ("Cannot access accelerator device").
        # This is the first hook after normalize_config and before the model loads.
        if _multi_cpu():
            cfg.device_map = {"": "cpu"}
        return None

    def add_callbacks_post_trainer(self, cfg, trainer):
        return [_Probe(trainer)]
