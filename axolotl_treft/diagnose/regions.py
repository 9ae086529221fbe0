"""Template regions of generation prompts: which tokens are prefix, query, postfix (any chat template)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

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


def row_key(ids: Sequence[int]) -> str:
    return hashlib.sha1(torch.as_tensor(list(ids), dtype=torch.int64).numpy().tobytes()).hexdigest()


@dataclass
class PromptBatch:
    """Left-padded prompts, each token's segment (``-1`` on padding) and the conversations they render.

    ``in_front``: per row, the tokens the tokenizer added in front of the rendering (BOS), part of the prefix.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    segments: torch.Tensor
    messages: list[list[dict]]
    template_kwargs: dict = field(default_factory=dict)
    in_front: list[list[int]] = field(default_factory=list)

    @classmethod
    def build(cls, tokenizer, messages_rows: Sequence[Sequence[dict]], input_ids: torch.Tensor,
              attention_mask: torch.Tensor, spans: Sequence[ConversationSpans] | None = None,
              **template_kwargs: Any) -> PromptBatch:
        """Align each row's template segments to its tokens (tokens the tokenizer added in front: prefix)."""
        if spans is None:
            spans = [prompt_regions(tokenizer, m, **template_kwargs) for m in messages_rows]
        segments = torch.full(input_ids.shape, PAD_SEGMENT, dtype=torch.int8)
        in_front = []
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
            in_front.append(ids[:len(ids) - n])
        return cls(input_ids, attention_mask, segments, [list(m) for m in messages_rows], dict(template_kwargs),
                   in_front)

    @property
    def key(self) -> str:
        """Identity of the batch's tokens (the cache key of the initial model's states)."""
        return row_key(self.input_ids.flatten().tolist()) + row_key(self.attention_mask.flatten().tolist())

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
