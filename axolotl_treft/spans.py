"""Locate the chat-template token spans of a conversation: prefix, query, postfix.

Works for any Jinja chat template, with no per-model code. Each message's content is located in the
rendered text by rendering the conversation twice more with that content replaced by two different
sentinels: the text before and after the content is the same in every render, so the common prefix and
common suffix of the renders bound the content exactly, also when the template trims or re-wraps it.
Character spans then map to tokens through the fast tokenizer's offset mapping.

Definitions (per conversation, multi-turn included):

* ``PREFIX``   every token before the first user content: BOS, the system block (the template's
  default system prompt or the conversation's own, also when the template folds it into the first
  user turn), and the first user header.
* ``QUERY``    the content of every user turn.
* ``POSTFIX``  the template tokens between the end of a user turn's content and the start of the
  assistant content that answers it: the end-of-turn marker plus the assistant header (and, e.g.,
  Qwen3's empty think block). Every assistant turn has one.
* ``TEMPLATE`` every other template token: end-of-turn markers after assistant turns, later headers.
* ``RESPONSE`` assistant content (and anything not template), the trained tokens.

A conversation whose spans cannot be used gets one code on every token, so the start-up audit can count it
by cause: ``UNLOCATED`` (the template hides the user content) or ``MISMATCH`` (re-rendering the conversation
does not reproduce Axolotl's tokens). No token mode selects either code.

A token that straddles a boundary belongs to the content it overlaps (sentencepiece merges the space
after ``[INST]`` into the first word, for instance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SEGMENTS_KEY = "treft_segments"  # the dataset / batch column holding the segment codes

SEG_RESPONSE = 0
SEG_PREFIX = 1
SEG_QUERY = 2
SEG_POSTFIX = 3
SEG_TEMPLATE = 4
SEG_UNLOCATED = 5
SEG_MISMATCH = 6
PAD_SEGMENT = -1  # batch padding (never a token of a conversation)

# Axolotl dataset types: the plugin switches `chat_template` datasets to the same type plus template segments.
CHAT_TEMPLATE_TYPE = "chat_template"
SEGMENTED_TYPE = "axolotl_treft.chat_template"

TOKEN_MODES: dict[str, tuple[int, ...]] = {
    "prefix": (SEG_PREFIX,),
    "postfix": (SEG_POSTFIX,),
    "prefix_postfix": (SEG_PREFIX, SEG_POSTFIX),
    "query": (SEG_QUERY,),
    "all": (SEG_PREFIX, SEG_QUERY, SEG_POSTFIX, SEG_TEMPLATE),
}

_SENTINELS = ("Xq7TREFTsentinelAq", "Yz3treftSENTINELbz")


class TemplateSpanError(ValueError):
    """The chat template does not let us locate the user turn."""


@dataclass(frozen=True)
class ConversationSpans:
    """Token ids of a rendered conversation and a segment code per token."""

    input_ids: list[int]
    segments: list[int]
    text: str

    def positions(self, segment: int) -> list[int]:
        return [i for i, s in enumerate(self.segments) if s == segment]

    def tokens(self, segment: int) -> list[int]:
        return [self.input_ids[i] for i in self.positions(segment)]


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _common_suffix_len(a: str, b: str, limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[-1 - i] == b[-1 - i]:
        i += 1
    return i


def _content_text(content: Any) -> str | None:
    if content is None:
        return None
    if isinstance(content, str):
        return content
    return None


def _render(tokenizer, messages: Sequence[dict], chat_template: str | None, add_generation_prompt: bool,
            tools: list | None, template_kwargs: dict) -> str:
    kwargs = dict(template_kwargs)
    if tools:
        kwargs["tools"] = tools
    return tokenizer.apply_chat_template(
        list(messages),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
        **kwargs,
    )


def _locate_content(text: str, renders: tuple[str, str]) -> tuple[int, int] | None:
    """Character span of a message's content in ``text`` given two sentinel renders."""
    start = min(_common_prefix_len(text, r) for r in renders)
    # The suffix after the content must not overlap the prefix before it.
    tail = min(_common_suffix_len(text, r, len(text) - start) for r in renders)
    end = len(text) - tail
    if any(r[start:start + len(s)] != s for r, s in zip(renders, _SENTINELS, strict=True)):
        return None  # the template did not insert the content verbatim where we expect it
    return start, max(start, end)


def locate_message_contents(tokenizer, messages: Sequence[dict], chat_template: str | None = None,
                            add_generation_prompt: bool = False, tools: list | None = None,
                            **template_kwargs) -> tuple[str, list[tuple[int, int] | None]]:
    """Render ``messages`` and return the text and each message's content character span."""
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise TemplateSpanError(
            "the tokenizer has no chat template: set `chat_template:` in the Axolotl config (for example "
            "`chat_template: chatml`, or `chat_template: jinja` with `chat_template_jinja:`), or use a "
            "tokenizer that ships one"
        )
    text = _render(tokenizer, messages, chat_template, add_generation_prompt, tools, template_kwargs)
    spans: list[tuple[int, int] | None] = []
    for i, msg in enumerate(messages):
        if _content_text(msg.get("content")) is None or msg.get("role") not in ("user", "assistant"):
            spans.append(None)
            continue
        renders = []
        for sentinel in _SENTINELS:
            probe = [dict(m) for m in messages]
            probe[i]["content"] = sentinel
            renders.append(_render(tokenizer, probe, chat_template, add_generation_prompt, tools, template_kwargs))
        spans.append(_locate_content(text, (renders[0], renders[1])))
    return text, spans


def conversation_spans(tokenizer, messages: Sequence[dict], chat_template: str | None = None,
                       add_generation_prompt: bool = False, tools: list | None = None,
                       **template_kwargs) -> ConversationSpans:
    """Render and tokenize a conversation and label every token with its segment.

    With ``add_generation_prompt=True`` the conversation may end with a user turn: the generation
    prompt after it is that turn's postfix (what inference-time diagnostics need).
    """
    text, spans = locate_message_contents(
        tokenizer, messages, chat_template, add_generation_prompt, tools, **template_kwargs
    )
    roles = [m.get("role") for m in messages]
    user_idx = [i for i, r in enumerate(roles) if r == "user"]
    if not user_idx:
        raise TemplateSpanError("the conversation has no user turn")
    for i in user_idx:
        if spans[i] is None:
            raise TemplateSpanError(
                "could not locate the user turn in the rendered chat template: the template does not insert "
                "user content verbatim; pick another `chat_template:`"
            )
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateSpanError("a fast (Rust) tokenizer is required to map template text to tokens")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]

    # Character intervals per segment; later assignments win (content over template).
    first_user_start = spans[user_idx[0]][0]
    intervals: list[tuple[int, int, int]] = []  # (start, end, segment), template intervals
    contents: list[tuple[int, int, int]] = []  # content intervals
    for pos, i in enumerate(user_idx):
        u_start, u_end = spans[i]
        contents.append((u_start, u_end, SEG_QUERY))
        next_user = user_idx[pos + 1] if pos + 1 < len(user_idx) else len(messages)
        answer = next((j for j in range(i + 1, next_user) if roles[j] == "assistant" and spans[j]), None)
        if answer is not None:
            intervals.append((u_end, spans[answer][0], SEG_POSTFIX))
        elif next_user == len(messages) and add_generation_prompt:
            intervals.append((u_end, len(text), SEG_POSTFIX))
    for j, r in enumerate(roles):
        if r == "assistant" and spans[j] is not None:
            contents.append((spans[j][0], spans[j][1], SEG_RESPONSE))

    segments: list[int] = []
    for s, e in offsets:
        seg = SEG_TEMPLATE
        if e <= first_user_start and not (s == e == first_user_start and s > 0):
            seg = SEG_PREFIX
        for a, b, code in intervals:
            if s >= a and e <= b:
                seg = code
        for a, b, code in contents:
            if s < b and e > a:  # overlaps the content
                seg = code
        segments.append(seg)
    return ConversationSpans(input_ids=ids, segments=segments, text=text)


def probe_template(tokenizer, chat_template: str | None = None, modes: Sequence[str] = ("prefix",),
                   **template_kwargs) -> ConversationSpans:
    """Check at start-up that the template exposes the spans the configured modes need."""
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    spans = conversation_spans(tokenizer, messages, chat_template, **template_kwargs)
    for mode in modes:
        if not any(s in TOKEN_MODES[mode] for s in spans.segments):
            raise TemplateSpanError(
                f"treft token mode {mode!r} selects no token under this chat template "
                f"(rendered: {spans.text!r}); choose another `tokens:` mode or `chat_template:`"
            )
    return spans


EMPTY_QUERY_CONVERSATION = [{"role": "user", "content": ""}, {"role": "assistant", "content": "."}]


def empty_query_spans(tokenizer, chat_template: str | None = None, **template_kwargs) -> ConversationSpans:
    """The template rendered around an empty user query, with its segments: what the fixed postfix
    reference is computed on (the template's default system prompt, no query, then the postfix)."""
    spans = conversation_spans(tokenizer, EMPTY_QUERY_CONVERSATION, chat_template, **template_kwargs)
    if SEG_POSTFIX not in spans.segments:
        raise TemplateSpanError(f"the chat template has no postfix tokens around an empty user query (rendered: "
                                f"{spans.text!r}); use `fixed_from: first_example` or `reference: exact`")
    return spans


def describe(tokenizer, spans: ConversationSpans) -> str:
    """Human-readable rendering of the segments, for debugging templates."""
    names = {SEG_RESPONSE: "R", SEG_PREFIX: "P", SEG_QUERY: "Q", SEG_POSTFIX: "F", SEG_TEMPLATE: "T",
             SEG_UNLOCATED: "?", SEG_MISMATCH: "!"}
    parts = []
    for tok, seg in zip(spans.input_ids, spans.segments, strict=True):
        parts.append(f"{names[seg]}:{tokenizer.decode([tok])!r}")
    return " ".join(parts)


def default_system_prompt(tokenizer, chat_template: str | None = None, **template_kwargs) -> str:
    """The system prompt the template renders when a conversation has none ("" if it renders none).

    The conversation is rendered without a system message and with two sentinel system messages; the text
    the sentinels replace in the latter is located, and whatever the template put in its place when there
    was no system message is its default.
    """
    user = {"role": "user", "content": "What is the capital of France?"}
    try:
        plain = _render(tokenizer, [user], chat_template, False, None, template_kwargs)
        renders = [_render(tokenizer, [{"role": "system", "content": s}, user], chat_template, False, None,
                           template_kwargs) for s in _SENTINELS]
    except Exception as err:  # Jinja raises its own errors (e.g. "System role not supported")
        raise TemplateSpanError(f"the chat template does not accept a system message: {err}") from err
    start = _common_prefix_len(renders[0], renders[1])
    if renders[0][start:start + len(_SENTINELS[0])] != _SENTINELS[0]:
        raise TemplateSpanError("the chat template does not insert the system message verbatim")
    before, after = renders[0][:start], renders[0][start + len(_SENTINELS[0]):]
    if plain.startswith(before) and plain.endswith(after) and len(plain) >= len(before) + len(after):
        return plain[len(before):len(plain) - len(after)]
    return ""
