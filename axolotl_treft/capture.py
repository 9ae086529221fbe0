"""Forward hooks that keep only the selected token positions of module outputs.

A capture is armed for exactly one forward pass with a flat index over ``batch × time``; the hook
gathers those rows from the module's output (keeping the autograd graph when grad is enabled) and
stores them. Outside an armed pass, hooks do nothing, so gradient-checkpointing recomputation during
backward, generation, or evaluation never records anything. Hooks never read parameters, so they are
safe under ZeRO-3.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class CaptureError(RuntimeError):
    """The model does not expose the modules a regularizer needs."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a causal LM (also through PEFT and DeepSpeed wrappers)."""
    n_layers = _num_hidden_layers(model)
    for _name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            return list(module)
    raise CaptureError(f"could not find a list of {n_layers} decoder layers in {type(model).__name__}")


def _num_hidden_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is None:
        raise CaptureError(f"{type(model).__name__} has no config")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def projection_modules(model: nn.Module, name: str) -> list[nn.Module]:
    """The ``name`` projection (``k_proj``/``v_proj``) of every decoder layer, in layer order.

    PEFT wraps a targeted projection in a LoRA layer whose output includes the adapter; that wrapper is
    the module named ``...k_proj`` and is the one returned (its inner ``base_layer`` is skipped).
    """
    found: dict[int, nn.Module] = {}
    suffix = "." + name
    for full, module in model.named_modules():
        if not full.endswith(suffix):
            continue
        match = _LAYER_RE.search(full)
        if match is None:
            continue
        found.setdefault(int(match.group(1)), module)
    n_layers = _num_hidden_layers(model)
    if sorted(found) != list(range(n_layers)):
        raise CaptureError(
            f"expected a `{name}` module in each of the {n_layers} decoder layers, found it in {len(found)}; "
            "TReFT needs separate key/value projections (fused qkv projections are not supported)"
        )
    return [found[i] for i in range(n_layers)]


class ActivationCapture:
    """Records selected rows of the outputs of a list of modules during one armed forward pass."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        self._index: torch.Tensor | None = None
        self._outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles = [m.register_forward_hook(self._make_hook(i)) for i, m in enumerate(self.modules)]

    def _make_hook(self, slot: int):
        def hook(_module, _inputs, output):
            if self._index is None:
                return
            hidden = output[0] if isinstance(output, tuple) else output
            flat = hidden.reshape(-1, hidden.shape[-1])
            self._outputs[slot] = flat.index_select(0, self._index.to(flat.device))

        return hook

    @contextmanager
    def armed(self, index: torch.Tensor) -> Iterator[list[torch.Tensor | None]]:
        """Capture rows ``index`` (flat over batch × time) of every module's output in this block."""
        self._outputs = [None] * len(self.modules)
        self._index = index
        try:
            yield self._outputs
        finally:
            self._index = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
