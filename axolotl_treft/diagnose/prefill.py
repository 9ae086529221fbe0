"""The initial model's prefill states, and hooks that patch them into the next prefill of a ``generate``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import decoder_layers, projection_modules, registered


class UncachedGenerationError(RuntimeError):
    """``generate`` ran without the KV cache: its decode steps would recompute the prompt unpatched."""


@dataclass
class PrefillStates:
    """Per-layer outputs of one prefill: ``keys``/``values`` [B, W, kv] and ``hidden`` [B, W, H] (layer inputs)."""

    keys: list[torch.Tensor] | None = None
    values: list[torch.Tensor] | None = None
    hidden: list[torch.Tensor] | None = None

    def to(self, device: torch.device) -> PrefillStates:
        def move(ts):
            return None if ts is None else [t.to(device) for t in ts]

        return PrefillStates(move(self.keys), move(self.values), move(self.hidden))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in (self.keys, self.values, self.hidden) for t in ts or [])


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _FirstCall:
    """Hooks that act only on the first call of each module (the prefill of one ``generate``).

    Every later call must be a one-token decode step that reads the (patched) KV cache: a longer one is
    ``generate`` without the cache, recomputing the prompt unpatched, and is refused.
    """

    def __init__(self, width: int):
        self.width = width
        self.seen: set[int] = set()

    def first(self, slot: int, length: int) -> bool:
        if slot in self.seen:
            if length != 1:
                raise UncachedGenerationError(
                    f"a forward after the prefill ran over {length} positions: `generate` is running without the KV "
                    "cache (use_cache=False), so every decode step would recompute the prompt without the "
                    "intervention; generate with use_cache=True")
            return False
        self.seen.add(slot)
        if length != self.width:
            raise RuntimeError(f"the prefill ran over {length} positions, not the prompt's {self.width} "
                               "(chunked prefill?); the diagnostics need the whole prompt in one forward")
        return True


@contextmanager
def _capture_prefill(model: nn.Module, width: int, kv: bool, residual: bool) -> Iterator[PrefillStates]:
    states = PrefillStates()
    first = _FirstCall(width)
    handles = []
    if kv:
        modules = projection_modules(model, "k_proj") + projection_modules(model, "v_proj")
        outs: list[torch.Tensor | None] = [None] * len(modules)

        def keep(slot):
            def hook(_m, _i, out):
                if first.first(slot, out.shape[1]):
                    outs[slot] = out.detach()
            return hook

        handles += [m.register_forward_hook(keep(i)) for i, m in enumerate(modules)]
    if residual:
        layers = decoder_layers(model)
        hidden: list[torch.Tensor | None] = [None] * len(layers)
        offset = 2 * len(layers) if kv else 0

        def keep_hidden(slot):
            def hook(_m, args, kwargs):
                h = _hidden_arg(args, kwargs)
                if first.first(offset + slot, h.shape[1]):
                    hidden[slot] = h.detach()
            return hook

        handles += [m.register_forward_pre_hook(keep_hidden(i), with_kwargs=True) for i, m in enumerate(layers)]
    with registered(handles):
        yield states
    if kv:
        n = len(outs) // 2
        states.keys, states.values = outs[:n], outs[n:]
    if residual:
        states.hidden = hidden


class InitialModel:
    """The model before finetuning; its prefill states are what the interventions patch in."""

    def __init__(self, model: nn.Module, peft_model: nn.Module | None = None):
        self.model = model
        self._peft = peft_model

    @classmethod
    def of_adapter(cls, peft_model: nn.Module) -> InitialModel:
        """The base model under a PEFT adapter: the same modules with the adapter disabled."""
        return cls(peft_model, peft_model=peft_model)

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        if self._peft is None:
            yield self.model
        else:
            with self._peft.disable_adapter():
                yield self._peft

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, kv: bool = True,
                residual: bool = False, pad_token_id: int | None = None) -> PrefillStates:
        """The initial model's states over the prompt, from the prefill of its own ``generate``."""
        with self.active() as model, _capture_prefill(model, input_ids.shape[1], kv, residual) as states:
            model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=1, do_sample=False,
                           pad_token_id=pad_token_id)
        return states


@contextmanager
def patch_kv(model: nn.Module, states: PrefillStates, mask: torch.Tensor,
             layers: Sequence[int] | None = None) -> Iterator[None]:
    """During the next prefill, ``k_proj``/``v_proj`` outputs at ``mask`` become ``states``' (chosen layers)."""
    keys, values = projection_modules(model, "k_proj"), projection_modules(model, "v_proj")
    chosen = list(range(len(keys))) if layers is None else list(layers)
    first = _FirstCall(mask.shape[1])
    where = mask.unsqueeze(-1)

    def make(slot: int, reference: torch.Tensor):
        def hook(_m, _i, out):
            if not first.first(slot, out.shape[1]):
                return None  # a decode step: it reads the patched cache
            return torch.where(where, reference.to(out.dtype), out)
        return hook

    slots = [(keys[layer], 2 * layer, states.keys[layer]) for layer in chosen]
    slots += [(values[layer], 2 * layer + 1, states.values[layer]) for layer in chosen]
    with registered(module.register_forward_hook(make(slot, ref)) for module, slot, ref in slots):
        yield


@contextmanager
def patch_residual(model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, layer: int) -> Iterator[None]:
    """During the next prefill, the residual stream entering decoder ``layer`` is ``hidden`` at ``mask``."""
    first = _FirstCall(mask.shape[1])
    where = mask.unsqueeze(-1)

    def hook(_m, args, kwargs):
        h = _hidden_arg(args, kwargs)
        if not first.first(0, h.shape[1]):
            return None
        return _with_hidden(args, kwargs, torch.where(where, hidden.to(h.dtype), h))

    with registered([decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)]):
        yield
