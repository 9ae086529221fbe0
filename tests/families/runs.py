"""Readable span views: the rendered text of each run of same-segment tokens (for hand-written expectations)."""

from __future__ import annotations

from axolotl_treft.spans import TOKEN_MODES, ConversationSpans


def runs(tokenizer, spans: ConversationSpans, codes: tuple[int, ...]) -> list[str]:
    """The rendered text of each maximal run of tokens whose segment is in ``codes``."""
    enc = tokenizer(spans.text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(enc["input_ids"]) == spans.input_ids
    out, start, end = [], None, None
    for (a, b), seg in zip(enc["offset_mapping"], spans.segments, strict=True):
        if seg in codes:
            start = a if start is None else start
            end = b
        elif start is not None:
            out.append(spans.text[start:end])
            start = None
    if start is not None:
        out.append(spans.text[start:end])
    return out


def mode_runs(tokenizer, spans: ConversationSpans) -> dict[str, list[str]]:
    return {mode: runs(tokenizer, spans, codes) for mode, codes in TOKEN_MODES.items()}
