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
    patched cache (``generate`` without the cache is refused: ``UncachedGenerationError``).
``patch_residual(model, hidden, mask, layer)``
    context manager: during the next prefill, the residual stream entering decoder layer ``layer`` is
    set to ``hidden`` at ``mask`` positions.
``NeighbourTable(embeddings, vocab_size, top=5, exclude=())`` / ``perturb_ids(ids, positions, k, table, rng, keep)``
    token perturbation: ``k`` random positions each get one of the token's ``top`` nearest neighbours by
    cosine in the input-embedding matrix (never the token itself; BOS and special tokens are never replaced
    nor chosen).
``Intervention`` and ``InterventionEngine(model, tokenizer, initial)``
    ``engine.applied(intervention, batch)`` is a context manager that yields the input ids to generate
    from with the intervention active. The initial model's states are computed once per batch (keyed by
    the batch's token ids), kept in CPU memory up to ``cache_bytes`` (least recently used dropped first) and
    reused by every region, layer list and run (``engine.kv_states(batch, region)``,
    ``engine.residual_states(batch)``).

The pieces live in :mod:`.regions`, :mod:`.prefill` and :mod:`.perturb`; this module re-exports them.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..spans import SEG_POSTFIX, ConversationSpans
from .perturb import NEIGHBOURS_TOP, NeighbourTable, perturb_ids, special_ids
from .prefill import (
    InitialModel,
    PrefillStates,
    UncachedGenerationError,
    patch_kv,
    patch_residual,
)
from .regions import (
    EMPTY_REFERENCE_REGIONS,
    REGIONS,
    PromptBatch,
    RegionError,
    check_region,
    check_regions,
    empty_query_regions,
    prompt_regions,
    row_key,
)

__all__ = [
    "EMPTY_REFERENCE_REGIONS", "KINDS", "NEIGHBOURS_TOP", "REGIONS", "InitialModel", "Intervention",
    "InterventionEngine", "NeighbourTable", "PrefillStates", "PromptBatch", "RegionError", "UncachedGenerationError",
    "check_region", "check_regions", "empty_query_regions", "patch_kv", "patch_residual", "perturb_ids",
    "prompt_regions",
]

KINDS = ("none", "kv", "residual", "perturb")
CACHE_BYTES = 2**30  # initial-model states kept in CPU memory (least recently used batches dropped first)


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

    def __init__(self, model: nn.Module, tokenizer, initial: InitialModel, template_kwargs: dict | None = None,
                 cache_bytes: int = CACHE_BYTES):
        self.model = model
        self.tokenizer = tokenizer
        self.initial = initial
        self.template_kwargs = dict(template_kwargs or {})
        self.cache_bytes = cache_bytes
        self._states: OrderedDict[tuple[str, str], PrefillStates] = OrderedDict()
        self._special = special_ids(tokenizer)
        self._table: NeighbourTable | None = None
        self.perturbations: dict[str, list[tuple[int, int, int]]] = {}  # last run: prompt key → changes

    def batch(self, messages_rows: Sequence[Sequence[dict]], input_ids: torch.Tensor,
              attention_mask: torch.Tensor, spans: Sequence[ConversationSpans] | None = None) -> PromptBatch:
        return PromptBatch.build(self.tokenizer, messages_rows, input_ids, attention_mask, spans,
                                 **self.template_kwargs)

    def clear_cache(self) -> None:
        self._states.clear()

    def _cached(self, batch: PromptBatch, what: str) -> PrefillStates:
        """The initial model's states of a batch, kept in CPU memory up to ``cache_bytes`` (a whole task's worth
        would grow with its size × layers): the least recently used are dropped, and recomputed if asked again."""
        key = (batch.key, what)
        if key in self._states:
            self._states.move_to_end(key)
            return self._states[key]
        if what == "empty":
            states = self._empty_query_states(batch)
        else:
            states = self.initial.prefill(batch.input_ids, batch.attention_mask, kv=what == "kv",
                                          residual=what == "residual", pad_token_id=self.tokenizer.pad_token_id)
        self._states[key] = states = states.to(torch.device("cpu"))
        while len(self._states) > 1 and self.cached_bytes > self.cache_bytes:
            self._states.popitem(last=False)
        return states

    @property
    def cached_bytes(self) -> int:
        return sum(states.nbytes for states in self._states.values())

    def kv_states(self, batch: PromptBatch, region: str) -> PrefillStates:
        """The reference K/V of a region: the same prompt's (``postfix_empty``: the empty-query prompt's)."""
        return self._cached(batch, "empty" if region in EMPTY_REFERENCE_REGIONS else "kv")

    def residual_states(self, batch: PromptBatch) -> PrefillStates:
        """The residual stream entering every decoder layer of the initial model, over the batch's prompts."""
        return self._cached(batch, "residual")

    def _empty_query_states(self, batch: PromptBatch) -> PrefillStates:
        """Initial K/V of each prompt re-rendered with empty user queries (after the same tokens the tokenizer
        added in front of the real prompt, BOS), moved onto the real postfix positions."""
        rows = []
        for r, messages in enumerate(batch.messages):
            real = batch.attention_mask[r].bool().cpu()
            ids = batch.input_ids[r].cpu()[real].tolist()
            spans = ConversationSpans(ids, batch.segments[r][real].tolist(), "")
            empty = empty_query_regions(self.tokenizer, messages, spans, **self.template_kwargs)
            front = batch.in_front[r] if batch.in_front else []
            at = torch.tensor([False] * len(front) + [s == SEG_POSTFIX for s in empty.segments])
            rows.append((torch.tensor(front + empty.input_ids), at, batch.segments[r] == SEG_POSTFIX))
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
            self._table = NeighbourTable(self.model.get_input_embeddings().weight, len(self.tokenizer),
                                         exclude=self._special)
        return self._table

    def perturbed(self, batch: PromptBatch, intervention: Intervention) -> torch.Tensor:
        """The batch's ids with ``k`` region tokens of every prompt replaced (seeded per prompt and trial; BOS and
        special tokens never)."""
        mask = batch.mask(intervention.region).cpu()
        out = batch.input_ids.clone()
        for r in range(out.shape[0]):
            real = batch.attention_mask[r].bool().cpu()
            key = row_key(batch.input_ids[r].cpu()[real].tolist())
            rng = random.Random(f"{intervention.seed}/{intervention.trial}/{key}")
            positions = mask[r].nonzero().flatten().tolist()
            ids, changes = perturb_ids(out[r].tolist(), positions, intervention.k, self.neighbours(), rng,
                                       keep=self._special)
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
