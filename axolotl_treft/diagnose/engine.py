"""Interventions on a finetuned causal LM's generation: does the learned behaviour ride on the template?

The paper's diagnostics (§4.1–4.2), in-process, for any Hugging Face causal LM and any chat template
(regions come from :func:`axolotl_treft.spans.conversation_spans`, no per-model code). The *initial*
model is the model before finetuning: the base with the PEFT adapter disabled, or a separately loaded
base model for a full finetune.

Public API (stable names; the behaviour screen and ``axolotl-treft diagnose`` build on it):

``REGIONS``
    region name → segment codes: ``prefix``, ``postfix``, ``postfix_empty``, ``prefix_postfix``, ``query``.
    ``postfix_empty`` selects the postfix, but its reference K/V come from the prompt re-rendered with
    every user query empty (the paper's choice: nothing about the test query leaks into the reference).
``prompt_regions(tokenizer, messages, **template_kwargs)``
    the segment of every token of a generation prompt (``ConversationSpans``); ``check_regions(spans,
    regions)`` and ``empty_query_regions(...)`` refuse prompts a region cannot be applied to.
``PromptBatch.build(tokenizer, messages_rows, input_ids, attention_mask, **template_kwargs)``
    a left-padded batch of prompts with each token's segment (``-1`` on padding); ``.mask(region)``.
``InitialModel.of_adapter(peft_model)`` / ``InitialModel(base_model)``
    ``.prefill(input_ids, attention_mask, kv=True, residual=False)`` → ``PrefillStates``: the initial
    model's ``k_proj``/``v_proj`` outputs and the residual stream entering every decoder layer, taken
    from its own ``generate`` prefill (so positions and masks are exactly those of generation).
``patch_kv(model, states, mask, layers=None)``
    context manager: during the next prefill, the ``k_proj``/``v_proj`` outputs at ``mask`` positions of
    the chosen layers (default all) are replaced by ``states``'; decode steps are untouched and read the
    patched cache.
``patch_residual(model, hidden, mask, layer)``
    context manager: during the next prefill, the residual stream entering decoder layer ``layer`` is
    set to ``hidden`` at ``mask`` positions.
``NeighbourTable(embeddings, vocab_size, top=5)`` / ``perturb_ids(ids, positions, k, table, rng)``
    token perturbation: ``k`` random positions each get one of the token's ``top`` nearest neighbours by
    cosine in the input-embedding matrix (never the token itself).
``Intervention`` and ``InterventionEngine(model, tokenizer, initial)``
    ``engine.applied(intervention, batch)`` is a context manager that yields the input ids to generate
    from with the intervention active. The initial model's states are computed once per batch (keyed by
    the batch's token ids), kept in CPU memory and reused by every region, layer list and run
    (``engine.kv_states(batch, region)``, ``engine.residual_states(batch)``).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..capture import decoder_layers, projection_modules
from ..spans import (
    PAD_SEGMENT,
    SEG_POSTFIX,
    SEG_PREFIX,
    TOKEN_MODES,
    ConversationSpans,
    TemplateSpanError,
    conversation_spans,
)

REGIONS: dict[str, tuple[int, ...]] = {
    "prefix": TOKEN_MODES["prefix"],
    "postfix": TOKEN_MODES["postfix"],
    "postfix_empty": TOKEN_MODES["postfix"],
    "prefix_postfix": TOKEN_MODES["prefix_postfix"],
    "query": TOKEN_MODES["query"],
}
EMPTY_REFERENCE_REGIONS = frozenset({"postfix_empty"})
KINDS = ("none", "kv", "residual", "perturb")
NEIGHBOURS_TOP = 5


class RegionError(TemplateSpanError):
    """A prompt's template regions cannot be located, or a requested region is empty."""


def check_region(region: str) -> None:
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; choose from {', '.join(REGIONS)}")


def prompt_regions(tokenizer, messages: Sequence[dict], **template_kwargs: Any) -> ConversationSpans:
    """Segment codes of a generation prompt (the conversation rendered with the generation prompt)."""
    return conversation_spans(tokenizer, messages, add_generation_prompt=True, **template_kwargs)


def empty_query_regions(tokenizer, messages: Sequence[dict], spans: ConversationSpans,
                        **template_kwargs: Any) -> ConversationSpans:
    """The prompt re-rendered with every user query empty; its postfix must tokenize like ``spans``'."""
    emptied = [dict(m, content="") if m.get("role") == "user" else dict(m) for m in messages]
    empty = prompt_regions(tokenizer, emptied, **template_kwargs)
    if empty.tokens(SEG_POSTFIX) != spans.tokens(SEG_POSTFIX):
        raise RegionError("the postfix of the prompt rendered with an empty user query tokenizes differently from "
                          f"the real prompt's ({empty.text!r}); use region 'postfix' instead of 'postfix_empty'")
    return empty


def check_regions(spans: ConversationSpans, regions: Sequence[str]) -> None:
    """Every region must select at least one token of the prompt."""
    for region in regions:
        check_region(region)
        if not any(s in REGIONS[region] for s in spans.segments):
            raise RegionError(f"region {region!r} selects no token of this prompt under its chat template "
                              f"({spans.text[:300]!r}); choose other regions")


def _row_key(ids: Sequence[int]) -> str:
    return hashlib.sha1(torch.as_tensor(list(ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


@dataclass
class PromptBatch:
    """Left-padded prompts, each token's segment (``-1`` on padding) and the conversations they render."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    segments: torch.Tensor
    messages: list[list[dict]]
    template_kwargs: dict = field(default_factory=dict)

    @classmethod
    def build(cls, tokenizer, messages_rows: Sequence[Sequence[dict]], input_ids: torch.Tensor,
              attention_mask: torch.Tensor, spans: Sequence[ConversationSpans] | None = None,
              **template_kwargs: Any) -> PromptBatch:
        """Align each row's template segments to its tokens (tokens the tokenizer added in front: prefix)."""
        if spans is None:
            spans = [prompt_regions(tokenizer, m, **template_kwargs) for m in messages_rows]
        segments = torch.full(input_ids.shape, PAD_SEGMENT, dtype=torch.int8)
        for r, row_spans in enumerate(spans):
            real = attention_mask[r].bool().cpu()
            ids = input_ids[r].cpu()[real].tolist()
            n = len(row_spans.input_ids)
            if len(ids) < n or ids[len(ids) - n:] != row_spans.input_ids:
                raise RegionError(
                    "a tokenized prompt does not match its chat-template rendering, so its template regions "
                    f"cannot be located (rendered: {row_spans.text!r}); was it truncated, or rendered with "
                    "another template?")
            seg = [SEG_PREFIX] * (len(ids) - n) + list(row_spans.segments)
            segments[r, real] = torch.tensor(seg, dtype=torch.int8)
        return cls(input_ids, attention_mask, segments, [list(m) for m in messages_rows], dict(template_kwargs))

    @property
    def key(self) -> str:
        """Identity of the batch's tokens (the cache key of the initial model's states)."""
        return _row_key(self.input_ids.flatten().tolist()) + _row_key(self.attention_mask.flatten().tolist())

    def mask(self, region: str) -> torch.Tensor:
        """[B, W] bool: the positions of ``region``; every row must have at least one."""
        check_region(region)
        codes = torch.tensor(REGIONS[region], dtype=torch.int8)
        mask = torch.isin(self.segments, codes)
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise RegionError(f"region {region!r} selects no token of prompt(s) {empty} of this batch under this "
                              f"chat template; choose another region")
        return mask.to(self.input_ids.device)


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


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _FirstCall:
    """Hooks that act only on the first call of each module (the prefill of one ``generate``)."""

    def __init__(self, width: int):
        self.width = width
        self.seen: set[int] = set()

    def first(self, slot: int, length: int) -> bool:
        if slot in self.seen:
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
    try:
        yield states
    finally:
        for h in handles:
            h.remove()
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

    handles = []
    for layer in chosen:
        handles.append(keys[layer].register_forward_hook(make(2 * layer, states.keys[layer])))
        handles.append(values[layer].register_forward_hook(make(2 * layer + 1, states.values[layer])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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

    handle = decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class NeighbourTable:
    """Top-``top`` nearest neighbours of a token by cosine in an input-embedding matrix (itself excluded)."""

    def __init__(self, embeddings: torch.Tensor, vocab_size: int | None = None, top: int = NEIGHBOURS_TOP):
        self.embeddings = embeddings.detach()[: vocab_size or embeddings.shape[0]]
        self.norms = self.embeddings.float().norm(dim=-1).clamp_min(1e-12)
        self.top = top
        self._cache: dict[int, list[int]] = {}

    def __call__(self, token: int) -> list[int]:
        if token not in self._cache:
            with torch.no_grad():
                scores = (self.embeddings.float() @ self.embeddings[token].float()) / self.norms
                scores[token] = -float("inf")
                self._cache[token] = scores.topk(self.top).indices.tolist()
        return self._cache[token]


def perturb_ids(ids: Sequence[int], positions: Sequence[int], k: int, table: NeighbourTable,
                rng: random.Random) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Replace ``k`` random ``positions`` (all if fewer) by a random top neighbour: (ids, [(pos, old, new)])."""
    out = list(ids)
    chosen = sorted(rng.sample(list(positions), min(k, len(positions))))
    changes = []
    for pos in chosen:
        new = rng.choice(table(out[pos]))
        changes.append((pos, out[pos], new))
        out[pos] = new
    return out, changes


@dataclass(frozen=True)
class Intervention:
    """What to change while generating: nothing, K/V, the residual stream, or the prompt's tokens.

    ``layers``: K/V patching → the layers to patch (None: all); residual patching → exactly one layer.
    ``trial``/``k``/``seed``: token perturbation (``trial`` and ``seed`` pick the positions/neighbours).
    """

    kind: str = "none"
    region: str | None = None
    layers: tuple[int, ...] | None = None
    trial: int = 0
    k: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown intervention kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.kind != "none":
            if self.region is None:
                raise ValueError(f"a {self.kind} intervention needs a region")
            check_region(self.region)
        if self.kind == "residual" and (self.layers is None or len(self.layers) != 1):
            raise ValueError("residual patching takes exactly one layer")

    @property
    def name(self) -> str:
        if self.kind == "none":
            return "unpatched"
        name = f"{self.kind}:{self.region}"
        if self.kind == "kv" and self.layers is not None:
            name += "@" + ",".join(map(str, self.layers))
        if self.kind == "residual":
            name += f"@{self.layers[0]}"
        if self.kind == "perturb":
            name += f"#{self.trial}"
        return name


class InterventionEngine:
    """Applies an ``Intervention`` to the generation of a ``PromptBatch`` (initial states cached per batch)."""

    def __init__(self, model: nn.Module, tokenizer, initial: InitialModel, template_kwargs: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.initial = initial
        self.template_kwargs = dict(template_kwargs or {})
        self._states: dict[tuple[str, str], PrefillStates] = {}
        self._table: NeighbourTable | None = None
        self.perturbations: dict[str, list[tuple[int, int, int]]] = {}  # last run: prompt key → changes

    def batch(self, messages_rows: Sequence[Sequence[dict]], input_ids: torch.Tensor,
              attention_mask: torch.Tensor, spans: Sequence[ConversationSpans] | None = None) -> PromptBatch:
        return PromptBatch.build(self.tokenizer, messages_rows, input_ids, attention_mask, spans,
                                 **self.template_kwargs)

    def clear_cache(self) -> None:
        self._states.clear()

    def _cached(self, batch: PromptBatch, what: str) -> PrefillStates:
        """The initial model's states of a batch, kept in CPU memory (a whole task's worth can be large)."""
        key = (batch.key, what)
        if key not in self._states:
            if what == "empty":
                states = self._empty_query_states(batch)
            else:
                states = self.initial.prefill(batch.input_ids, batch.attention_mask, kv=what == "kv",
                                              residual=what == "residual", pad_token_id=self.tokenizer.pad_token_id)
            self._states[key] = states.to(torch.device("cpu"))
        return self._states[key]

    def kv_states(self, batch: PromptBatch, region: str) -> PrefillStates:
        """The reference K/V of a region: the same prompt's (``postfix_empty``: the empty-query prompt's)."""
        return self._cached(batch, "empty" if region in EMPTY_REFERENCE_REGIONS else "kv")

    def residual_states(self, batch: PromptBatch) -> PrefillStates:
        """The residual stream entering every decoder layer of the initial model, over the batch's prompts."""
        return self._cached(batch, "residual")

    def _empty_query_states(self, batch: PromptBatch) -> PrefillStates:
        """Initial K/V of each prompt re-rendered with empty user queries, moved onto the real postfix positions."""
        rows = []
        for r, messages in enumerate(batch.messages):
            real = batch.attention_mask[r].bool().cpu()
            ids = batch.input_ids[r].cpu()[real].tolist()
            spans = ConversationSpans(ids, batch.segments[r][real].tolist(), "")
            empty = empty_query_regions(self.tokenizer, messages, spans, **self.template_kwargs)
            at = torch.tensor(empty.segments) == SEG_POSTFIX
            rows.append((torch.tensor(empty.input_ids), at, batch.segments[r] == SEG_POSTFIX))
        width = max(len(ids) for ids, _, _ in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = batch.input_ids.device
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, _, _) in enumerate(rows):
            input_ids[r, width - len(ids):] = ids
            attention[r, width - len(ids):] = 1
        empty = self.initial.prefill(input_ids.to(device), attention.to(device), pad_token_id=pad)

        def move(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            moved = []
            for t in tensors:
                out = torch.zeros((*batch.input_ids.shape, t.shape[-1]), dtype=t.dtype, device=t.device)
                for r, (ids, at, real_at) in enumerate(rows):
                    src = torch.zeros(width, dtype=torch.bool)
                    src[width - len(ids):] = at
                    out[r, real_at.to(t.device)] = t[r, src.to(t.device)]
                moved.append(out)
            return moved

        return PrefillStates(keys=move(empty.keys), values=move(empty.values))

    def neighbours(self) -> NeighbourTable:
        if self._table is None:
            self._table = NeighbourTable(self.model.get_input_embeddings().weight, len(self.tokenizer))
        return self._table

    def perturbed(self, batch: PromptBatch, intervention: Intervention) -> torch.Tensor:
        """The batch's ids with ``k`` region tokens of every prompt replaced (seeded per prompt and trial)."""
        mask = batch.mask(intervention.region).cpu()
        out = batch.input_ids.clone()
        for r in range(out.shape[0]):
            real = batch.attention_mask[r].bool().cpu()
            key = _row_key(batch.input_ids[r].cpu()[real].tolist())
            rng = random.Random(f"{intervention.seed}/{intervention.trial}/{key}")
            positions = mask[r].nonzero().flatten().tolist()
            ids, changes = perturb_ids(out[r].tolist(), positions, intervention.k, self.neighbours(), rng)
            out[r] = torch.tensor(ids, dtype=out.dtype)
            self.perturbations[key] = changes
        return out.to(batch.input_ids.device)

    @contextmanager
    def applied(self, intervention: Intervention, batch: PromptBatch) -> Iterator[torch.Tensor]:
        """Yield the input ids to generate from, with ``intervention`` active for the next ``generate``."""
        with ExitStack() as stack:
            ids = batch.input_ids
            if intervention.kind == "kv":
                mask = batch.mask(intervention.region)
                states = self.kv_states(batch, intervention.region).to(ids.device)
                stack.enter_context(patch_kv(self.model, states, mask, intervention.layers))
            elif intervention.kind == "residual":
                mask = batch.mask(intervention.region)
                layer = intervention.layers[0]
                hidden = self.residual_states(batch).hidden[layer].to(ids.device)
                stack.enter_context(patch_residual(self.model, hidden, mask, layer))
            elif intervention.kind == "perturb":
                ids = self.perturbed(batch, intervention)
            yield ids
