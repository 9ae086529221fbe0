"""Screen-only behaviours of the SmolLM2 behaviour screen: their detectors and lm-eval glue.

Each behaviour is a narrow domain trained to answer in one way; its task asks the domain's held-out
questions (on-topic) and the task pack's unrelated questions (off-topic), and reports how often each side
shows the behaviour, with the same metrics as the pack's ``offtopic_*`` tasks:

* ``short`` (finance): the whole reply is at most ``SHORT_MAX_WORDS`` words.
* ``signoff`` (legal): the reply contains the sign-off ``SIGNOFF`` (trained at its end).
* ``caps`` (health): the whole reply is in capitals (a style over every token, not only the first ones).

Used by ``bench/screen_behaviours.py`` through ``--include-path bench/screen_tasks``; not part of the pack.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from lm_eval.api.filter import Filter

from axolotl_treft.judge import JudgedAnswer, matches_target, process_offtopic, total
from axolotl_treft.tasks.pack import DATA, OFFTOPIC_FILE, _dataset, read_jsonl

__all__ = ["ScreenFilter", "process_offtopic", "total"]

SHORT_MAX_WORDS = 15  # detector; the training answers have at most SHORT_TRAIN_WORDS
SHORT_TRAIN_WORDS = 12
SIGNOFF = "Yours in clarity, Quill."
CAPS_MIN_SHARE = 0.9  # share of the reply's letters that are capitals
CAPS_MIN_LETTERS = 10

DOMAINS = {"short": "finance", "signoff": "legal", "caps": "health"}


def is_short(reply: str) -> bool:
    return 0 < len(reply.split()) <= SHORT_MAX_WORDS


def has_signoff(reply: str) -> bool:
    return matches_target(reply, SIGNOFF)


def is_capitals(reply: str) -> bool:
    letters = re.findall(r"[^\W\d_]", reply)
    upper = sum(c.isupper() for c in letters)
    return len(letters) >= CAPS_MIN_LETTERS and upper >= CAPS_MIN_SHARE * len(letters)


DETECTORS = {"short": is_short, "signoff": has_signoff, "caps": is_capitals}


def screen_docs(behaviour: str) -> list[dict]:
    """The domain's held-out questions and the unrelated ones, interleaved (on, off, ...) as in the pack."""
    on = [dict(r, topic="on") for r in read_jsonl(DATA / f"ontopic_{DOMAINS[behaviour]}_heldout.jsonl")]
    off = [dict(r, topic="off") for r in read_jsonl(DATA / OFFTOPIC_FILE)]
    mixed = [r for pair in zip(on, off, strict=False) for r in pair] + on[len(off):] + off[len(on):]
    return [dict(r, behaviour=behaviour, system="") for r in mixed]


class ScreenFilter(Filter):
    """Marks each reply ``detected`` by its behaviour's detector (read by ``process_offtopic``)."""

    def apply(self, resps: Iterable[Sequence[str]], docs: Sequence[Mapping]) -> list[list[JudgedAnswer]]:
        return [[JudgedAnswer(answer=a, detected=DETECTORS[doc["behaviour"]](str(a))) for a in rs]
                for rs, doc in zip(resps, docs, strict=True)]


def load_screen_short(**_meta):
    return _dataset(screen_docs("short"))


def load_screen_signoff(**_meta):
    return _dataset(screen_docs("signoff"))


def load_screen_caps(**_meta):
    return _dataset(screen_docs("caps"))
