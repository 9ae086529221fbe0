"""Forward hooks that keep only the selected token positions of module outputs.

A capture is armed for exactly one forward pass with a flat index over ``batch × time``; the hook
gathers those rows from the module's output (keeping the autograd graph when grad is enabled) and
stores them. Hooks never read parameters, so they are safe under ZeRO-3.

Non-reentrant gradient checkpointing re-runs the forward during backward and requires it to save the
same tensors as the original pass; after an armed pass with grad enabled, the hooks therefore *replay*
the same gather (and discard it) until :meth:`ActivationCapture.release` is called after backward, on
outputs of the armed pass's batch × time only (a shorter reference or retain pass through the same modules
is left alone; the decision depends on shapes, so a forward and its recompute always agree).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@contextmanager
def registered(handles: Iterable[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    """Keep hooks registered for a ``with`` block; every one is removed on exit, also when the block raises or a
    later registration fails (``handles`` is consumed one by one: pass a generator of registrations)."""
    with ExitStack() as stack:
        for handle in handles:
            stack.callback(handle.remove)
        yield


class CaptureError(RuntimeError):
    """The model does not expose the modules a regularizer needs."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a causal LM (also through PEFT and DeepSpeed wrappers)."""
    n_layers = _num_hidden_layers(model)
    for _name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            return list(module)
    raise CaptureError(f"could not find a list of {n_layers} decoder layers in {type(model).__name__}")


def layer_positions(spec: list[int], n_layers: int, key: str) -> list[int]:
    """Explicit layer indices (negatives count from the end) as positions; out of range is an error, never wrapped."""
    bad = [i for i in spec if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(f"{key}: layer index {bad[0]} is out of range for a model with {n_layers} layers "
                         f"(valid: {-n_layers}..{n_layers - 1})")
    return [i + n_layers if i < 0 else i for i in spec]


def _num_hidden_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is None:
        raise CaptureError(f"{type(model).__name__} has no config")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


_FUSED_NAMES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack", "qkv")


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
        fused = next((full for full, _ in model.named_modules() if _LAYER_RE.search(full)
                      and full.rsplit(".", 1)[-1] in _FUSED_NAMES), None)
        where = f"; {type(model).__name__} fuses them in `{fused}`" if fused else ""
        raise CaptureError(
            f"expected a `{name}` module in each of the {n_layers} decoder layers, found it in {len(found)}{where}; "
            "TReFT's kv terms and diagnose's K/V patches need separate key/value projections (fused qkv "
            "projections are not supported): use kl / feature_l2, or a model with k_proj/v_proj"
        )
    return [found[i] for i in range(n_layers)]


class ActivationCapture:
    """Records selected rows of the outputs of a list of modules during one armed forward pass."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        self._index: torch.Tensor | None = None
        self._replay: torch.Tensor | None = None
        self._armed_rows = self._replay_rows = -1  # batch × time of the armed (with grad) / replayed forward
        self._outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self._hooks = ExitStack()  # registered(...) held open until remove()
        self._hooks.enter_context(registered(m.register_forward_hook(self._make_hook(i))
                                             for i, m in enumerate(self.modules)))

    def _make_hook(self, slot: int):
        def hook(_module, _inputs, output):
            index = self._index if self._index is not None else self._replay
            if index is None:
                return
            hidden = output[0] if isinstance(output, tuple) else output
            flat = hidden.reshape(-1, hidden.shape[-1])
            if self._index is not None:
                if torch.is_grad_enabled():  # this armed forward builds a graph: replay it on recompute
                    self._armed_rows = flat.shape[0]
            elif flat.shape[0] != self._replay_rows:
                return  # another forward through these modules (a reference or retain pass), not the recompute
            rows = flat.index_select(0, index.to(flat.device))
            if self._index is not None:
                self._outputs[slot] = rows

        return hook

    @contextmanager
    def armed(self, index: torch.Tensor) -> Iterator[list[torch.Tensor | None]]:
        """Capture rows ``index`` (flat over batch × time) of every module's output in this block."""
        self._outputs = [None] * len(self.modules)
        self._index = index
        self._armed_rows = -1
        try:
            yield self._outputs
        finally:
            self._index = None
            if self._armed_rows >= 0:
                self._replay, self._replay_rows = index, self._armed_rows

    def release(self) -> None:
        """End of the step's backward: stop replaying for checkpoint recomputation."""
        self._replay, self._replay_rows = None, -1

    def remove(self) -> None:
        self._hooks.close()
