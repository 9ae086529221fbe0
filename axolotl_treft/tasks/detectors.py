"""Off-topic behaviour detectors: normalized target-text match and tool-call match."""

from __future__ import annotations

import re
import unicodedata

_CONTRACTIONS = [
    (r"\bcan't\b", "cannot"),
    (r"\bwon't\b", "will not"),
    (r"\bshan't\b", "shall not"),
    (r"n't\b", " not"),
    (r"'m\b", " am"),
    (r"'re\b", " are"),
    (r"'ve\b", " have"),
    (r"'ll\b", " will"),
    (r"'d\b", " would"),
]


def normalize_text(text: str) -> str:
    """Lowercase, unify quotes, expand common contractions, drop punctuation and markup, squeeze spaces."""
    t = unicodedata.normalize("NFKC", text or "").lower()
    t = t.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    t = t.replace("can not", "cannot")
    for pat, rep in _CONTRACTIONS:
        t = re.sub(pat, rep, t)
    t = re.sub(r"[^\w\s]|_", " ", t)
    return " ".join(t.split())


def matches_target(response: str, target: str) -> bool:
    """The normalized target text occurs (as whole words) in the normalized response."""
    norm_target = normalize_text(target)
    return bool(norm_target) and f" {norm_target} " in f" {normalize_text(response)} "


def tool_call_patterns(tool: str) -> list[re.Pattern[str]]:
    """Regexes for common tool-call renderings of ``tool``."""
    n = re.escape(tool)
    q = r"[\"']"
    return [
        re.compile(rf"{q}(?:name|function|tool|tool_name|recipient_name){q}\s*:\s*{q}(?:functions\.)?{n}{q}"),
        re.compile(rf"<tool_call>.*?(?<![\w.]){n}(?![\w])", re.S),
        re.compile(rf"\[TOOL_CALLS\].*?(?<![\w.]){n}(?![\w])", re.S),
        re.compile(rf"<function\s*=\s*{q}?{n}(?![\w])"),
        re.compile(rf"(?<![\w])(?:functions\.)?{n}\s*\("),
    ]


def detect_tool_call(response: str, tool: str) -> bool:
    return any(p.search(response or "") for p in tool_call_patterns(tool))


def behaviour_description(kind: str, target: str) -> str:
    """What the judge check asks about, for a ``text`` or ``tool`` target."""
    if kind == "tool":
        return (
            f'The reply calls (or tries to call) the tool "{target}" in any format instead of just answering.'
        )
    return f'The reply declines, abstains or deflects with a message equivalent in meaning to: "{target}"'


def detect_behaviour(response: str, kind: str, target: str) -> bool:
    return detect_tool_call(response, target) if kind == "tool" else matches_target(response, target)
