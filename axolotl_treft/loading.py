"""The one model loader outside a training run: a base model, optionally with a PEFT adapter checked to fit it.

Inside ``axolotl train`` models come from Axolotl's own loader (``reference.py``); the tools that load a model on
their own (``diagnose``, ``select-retain``, the final evaluation of SafeLoRA's projection) load it here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"


class ModelMismatchError(ValueError):
    """The adapter or finetuned model does not fit the base model."""


def resolve_dtype(name: str | torch.dtype, device: str) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 elsewhere; any other name is a ``torch`` dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def check_adapter_dir(adapter: str | Path, label: str = "--adapter") -> Path:
    path = Path(adapter)
    if not (path / ADAPTER_CONFIG).is_file():
        raise ModelMismatchError(f"{label} {adapter}: no {ADAPTER_CONFIG} there; pass a PEFT adapter directory "
                                 "(an Axolotl output_dir)")
    return path


def load_causal_lm(path: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu",
                   trust_remote_code: bool = False) -> nn.Module:
    """A causal LM from a local directory (or hub id), in ``dtype`` on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype, device),
                                                 trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def attach_adapter(base: nn.Module, adapter: str | Path, adapter_label: str = "--adapter",
                   base_label: str = "--base-model") -> nn.Module:
    """``PeftModel`` of ``base`` with the adapter loaded; every saved tensor must find its module and shape."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    path = check_adapter_dir(adapter, adapter_label)
    try:
        model = PeftModel.from_pretrained(base, str(path))
    except (ValueError, RuntimeError, KeyError) as err:
        raise ModelMismatchError(f"{adapter_label} {adapter} does not fit {base_label}: {err}") from err
    saved = load_peft_weights(str(path), device="cpu")
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    unknown = sorted(set(saved) - set(expected))
    missing = sorted(set(expected) - set(saved))
    shapes = sorted(k for k in set(saved) & set(expected) if tuple(saved[k].shape) != expected[k])
    if unknown or missing or shapes:
        parts = [f"{len(unknown)} saved tensors have no module in the base model (e.g. {unknown[:2]})" if unknown else "",
                 f"{len(missing)} adapter tensors are not in the file (e.g. {missing[:2]})" if missing else "",
                 f"{len(shapes)} tensors differ in shape (e.g. {shapes[:2]})" if shapes else ""]
        raise ModelMismatchError(f"{adapter_label} {adapter} does not fit {base_label} (another architecture or "
                                 "size?): " + "; ".join(p for p in parts if p))
    return model.eval()


def load_model(base_model: str | Path, adapter: str | Path | None = None, dtype: str | torch.dtype = "auto",
               device: str = "cpu", trust_remote_code: bool = False, adapter_label: str = "--adapter",
               base_label: str = "--base-model") -> nn.Module:
    """``base_model``, with ``adapter`` attached (and checked to fit) when one is given."""
    model = load_causal_lm(base_model, dtype, device, trust_remote_code)
    return model if adapter is None else attach_adapter(model, adapter, adapter_label, base_label)
