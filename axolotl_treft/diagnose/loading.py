"""Load the model to diagnose and its initial model, refusing an adapter or finetune that does not fit the base."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .engine import InitialModel

ADAPTER_CONFIG = "adapter_config.json"


class ModelMismatchError(ValueError):
    """The adapter or finetuned model does not fit the base model."""


@dataclass
class LoadedModels:
    model: nn.Module
    tokenizer: object
    initial: InitialModel
    tokenizer_source: str


def check_adapter_dir(adapter: str | Path) -> Path:
    path = Path(adapter)
    if not (path / ADAPTER_CONFIG).is_file():
        raise ModelMismatchError(f"--adapter {adapter}: no {ADAPTER_CONFIG} there; pass a PEFT adapter directory "
                                 "(an Axolotl output_dir)")
    return path


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def _load_lm(path: str, dtype: torch.dtype, device: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def attach_adapter(base: nn.Module, adapter: str | Path) -> nn.Module:
    """``PeftModel`` of ``base`` with the adapter loaded; every saved tensor must find its module and shape."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    path = check_adapter_dir(adapter)
    try:
        model = PeftModel.from_pretrained(base, str(path))
    except (ValueError, RuntimeError, KeyError) as err:
        raise ModelMismatchError(f"--adapter {adapter} does not fit --base-model: {err}") from err
    saved = load_peft_weights(str(path), device="cpu")
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    unknown = sorted(set(saved) - set(expected))
    missing = sorted(set(expected) - set(saved))
    shapes = sorted(k for k in set(saved) & set(expected) if tuple(saved[k].shape) != expected[k])
    if unknown or missing or shapes:
        parts = [f"{len(unknown)} saved tensors have no module in the base model (e.g. {unknown[:2]})" if unknown else "",
                 f"{len(missing)} adapter tensors are not in the file (e.g. {missing[:2]})" if missing else "",
                 f"{len(shapes)} tensors differ in shape (e.g. {shapes[:2]})" if shapes else ""]
        raise ModelMismatchError(f"--adapter {adapter} does not fit --base-model (another architecture or size?): "
                                 + "; ".join(p for p in parts if p))
    return model.eval()


def check_same_architecture(finetuned: nn.Module, initial: nn.Module) -> None:
    """A full finetune must have its initial model's parameters, name for name and shape for shape."""
    a = {k: tuple(v.shape) for k, v in finetuned.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in initial.state_dict().items()}
    if a != b:
        only = sorted(set(a) ^ set(b))[:3]
        shapes = sorted(k for k in set(a) & set(b) if a[k] != b[k])[:3]
        raise ModelMismatchError(f"--model is not a finetune of --base-model: parameters differ (names {only}, "
                                 f"shapes {shapes})")


def tokenizer_dir(candidates: list[str]) -> str:
    for c in candidates:
        if (Path(c) / "tokenizer_config.json").is_file():
            return c
    return candidates[-1]


def load_models(base_model: str, adapter: str | None = None, model: str | None = None, dtype: str = "auto",
                device: str = "cpu") -> LoadedModels:
    """The model to diagnose (base + adapter, or a full finetune) and its initial model.

    The tokenizer (and chat template) is the adapter's or the finetune's when it ships one, else the base's.
    """
    from transformers import AutoTokenizer

    torch_dtype = resolve_dtype(dtype, device)
    if adapter is not None:
        tok_dir = tokenizer_dir([str(adapter), base_model])
        peft_model = attach_adapter(_load_lm(base_model, torch_dtype, device), adapter)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        return LoadedModels(peft_model, tokenizer, InitialModel.of_adapter(peft_model), tok_dir)
    if model is None:
        raise ValueError("pass --adapter (a PEFT adapter of --base-model) or --model (a full finetune of it)")
    tok_dir = tokenizer_dir([model, base_model])
    finetuned = _load_lm(model, torch_dtype, device)
    initial = _load_lm(base_model, torch_dtype, device)
    check_same_architecture(finetuned, initial)
    return LoadedModels(finetuned, AutoTokenizer.from_pretrained(tok_dir), InitialModel(initial), tok_dir)
