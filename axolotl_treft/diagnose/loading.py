"""Load the model to diagnose and its initial model, refusing an adapter or finetune that does not fit the base."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..loading import ModelMismatchError, attach_adapter, check_adapter_dir, load_causal_lm, resolve_dtype
from .engine import InitialModel

__all__ = ["LoadedModels", "ModelMismatchError", "attach_adapter", "check_adapter_dir", "load_models",
           "tokenizer_dir"]


@dataclass
class LoadedModels:
    model: nn.Module
    tokenizer: object
    initial: InitialModel
    tokenizer_source: str


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
        peft_model = attach_adapter(load_causal_lm(base_model, torch_dtype, device), adapter)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        return LoadedModels(peft_model, tokenizer, InitialModel.of_adapter(peft_model), tok_dir)
    if model is None:
        raise ValueError("pass --adapter (a PEFT adapter of --base-model) or --model (a full finetune of it)")
    tok_dir = tokenizer_dir([model, base_model])
    finetuned = load_causal_lm(model, torch_dtype, device)
    initial = load_causal_lm(base_model, torch_dtype, device)
    check_same_architecture(finetuned, initial)
    return LoadedModels(finetuned, AutoTokenizer.from_pretrained(tok_dir), InitialModel(initial), tok_dir)
