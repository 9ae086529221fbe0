"""Question sets of the task pack: ours, or a user file in one of two layouts.

* JSONL, one question per line: ``{"question_id": "...", "question": "...", "category": ..., "system": ...,
  "samples": N, "judge_prompts": {metric: template}, "topic": "on"|"off"}`` (``question_id`` and
  ``question`` required; ``topic`` required for the ``offtopic_*`` tasks).
* YAML, the layout of the public emergent-misalignment question files: a list of
  ``{id, paraphrases: [...], type: free_form_judge_0_100, samples_per_paraphrase, judge, judge_prompts,
  system}``; every paraphrase becomes a question.

Every problem is reported with the file and the line before anything is generated.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from axolotl_treft.judge.files import (
    JSONL_SUFFIXES,
    YAML_SUFFIXES,
    UserFileError,
    existing_file,
    line_of,
    load_jsonl_rows,
    load_yaml_with_lines,
    mapping_lines,
    sequence_item_nodes,
    sha256_file,
)
from axolotl_treft.judge.prompts import check_prompt_mapping

log = logging.getLogger(__name__)

JSONL_FIELDS = {"question_id", "id", "question", "category", "system", "samples", "judge_prompts", "topic"}
YAML_FIELDS = {
    "id",
    "type",
    "paraphrases",
    "samples_per_paraphrase",
    "judge",
    "judge_prompts",
    "system",
    "category",
    "topic",
}
SCORED_TYPES = {"free_form_judge_0_100"}
TOPICS = {"on", "off"}


@dataclass(frozen=True)
class Question:
    question_id: str
    question: str
    line: int
    paraphrase: int = 0
    category: str = ""
    system: str = ""
    samples: int | None = None
    judge_prompts: Mapping[str, str] | None = None
    topic: str | None = None

    def doc(self) -> dict[str, Any]:
        """The lm-eval doc fields (per-question judge prompts as a JSON string, ``""`` when none)."""
        d = asdict(self)
        d.pop("line")
        d.pop("samples")
        d["judge_prompts"] = json.dumps(dict(self.judge_prompts)) if self.judge_prompts else ""
        if self.topic is None:
            d.pop("topic")
        return d


@dataclass(frozen=True)
class QuestionSet:
    path: str
    sha256: str
    layout: str  # "jsonl" | "yaml"
    questions: list[Question]

    def record(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "layout": self.layout,
            "questions": len(self.questions),
        }


def _str_field(path: Path, line: int, row: Mapping[str, Any], key: str, required: bool = False) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise UserFileError(path, f"missing field {key!r}", line)
        return ""
    if not isinstance(value, (str, int)) or (isinstance(value, str) and required and not value.strip()):
        raise UserFileError(path, f"field {key!r} must be a non-empty string, got {value!r}", line)
    return str(value)


def _samples(path: Path, line: int, value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserFileError(path, f"{key} must be a positive integer, got {value!r}", line)
    return value


def _topic(path: Path, line: int, value: Any, need_topic: bool) -> str | None:
    if value is None:
        if need_topic:
            raise UserFileError(
                path, 'missing field \'topic\' ("on" or "off"): the offtopic_* tasks need both kinds', line
            )
        return None
    if value not in TOPICS:
        raise UserFileError(path, f'topic must be "on" or "off", got {value!r}', line)
    return value


def _jsonl_questions(path: Path, need_topic: bool) -> list[Question]:
    out = []
    for line, row in load_jsonl_rows(path):
        unknown = sorted(set(row) - JSONL_FIELDS)
        if unknown:
            raise UserFileError(path, f"unknown field(s) {unknown}; known: {sorted(JSONL_FIELDS)}", line)
        if "question_id" not in row and "id" not in row:
            raise UserFileError(path, "missing field 'question_id' (or 'id')", line)
        qid = _str_field(path, line, row, "question_id" if "question_id" in row else "id", required=True)
        prompts = row.get("judge_prompts")
        out.append(
            Question(
                question_id=qid,
                question=_str_field(path, line, row, "question", required=True),
                line=line,
                category=_str_field(path, line, row, "category"),
                system=_str_field(path, line, row, "system"),
                samples=_samples(path, line, row.get("samples"), "samples"),
                judge_prompts=None
                if prompts is None
                else check_prompt_mapping(prompts, path=path, line=line),
                topic=_topic(path, line, row.get("topic"), need_topic),
            )
        )
    return out


def _yaml_questions(path: Path, need_topic: bool) -> list[Question]:
    data, root = load_yaml_with_lines(path)
    if not isinstance(data, list):
        raise UserFileError(
            path, "expected a list of questions (- id: ..., paraphrases: [...])", line_of(root)
        )
    out, ignored = [], set()
    for entry, node in zip(data, sequence_item_nodes(root), strict=True):
        line = line_of(node)
        if not isinstance(entry, Mapping):
            raise UserFileError(path, f"expected a mapping with id and paraphrases, got {entry!r}", line)
        ignored |= set(entry) - YAML_FIELDS
        lines = mapping_lines(node)
        qid = _str_field(path, line, entry, "id", required=True)
        kind = entry.get("type", "free_form_judge_0_100")
        if kind not in SCORED_TYPES:
            raise UserFileError(
                path,
                f"question {qid!r}: type {kind!r} is not supported (supported: {sorted(SCORED_TYPES)})",
                lines.get("type", line),
            )
        paraphrases = entry.get("paraphrases")
        if paraphrases is None:
            raise UserFileError(path, f"question {qid!r}: missing field 'paraphrases'", line)
        if not isinstance(paraphrases, list) or not paraphrases:
            raise UserFileError(
                path,
                f"question {qid!r}: paraphrases must be a non-empty list",
                lines.get("paraphrases", line),
            )
        prompts = entry.get("judge_prompts")
        if prompts is not None:
            prompt_node = next(v for k, v in node.value if k.value == "judge_prompts")
            prompts = check_prompt_mapping(
                prompts, path=path, line=lines["judge_prompts"], lines=mapping_lines(prompt_node)
            )
        system = entry.get("system")
        if system is not None and not isinstance(system, str):
            raise UserFileError(path, f"question {qid!r}: system must be a string", lines.get("system", line))
        para_nodes = sequence_item_nodes(next(v for k, v in node.value if k.value == "paraphrases"))
        for k, (text, pnode) in enumerate(zip(paraphrases, para_nodes, strict=True)):
            if not isinstance(text, str) or not text.strip():
                raise UserFileError(
                    path, f"question {qid!r}: paraphrase {k} must be a non-empty string", line_of(pnode)
                )
            out.append(
                Question(
                    question_id=qid,
                    question=text,
                    line=line_of(pnode),
                    paraphrase=k,
                    category=str(entry.get("category") or ""),
                    system=system or "",
                    samples=_samples(
                        path,
                        lines.get("samples_per_paraphrase", line),
                        entry.get("samples_per_paraphrase"),
                        "samples_per_paraphrase",
                    ),
                    judge_prompts=prompts,
                    topic=_topic(path, line, entry.get("topic"), need_topic),
                )
            )
    if ignored:
        log.warning("%s: ignoring field(s) %s (not used by this task pack)", path, sorted(ignored))
    return out


def load_questions(path: str | os.PathLike, *, need_topic: bool = False) -> QuestionSet:
    """A validated question set from a JSONL or YAML file (layout chosen by the suffix)."""
    p = existing_file(path, "questions")
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        questions, layout = _jsonl_questions(p, need_topic), "jsonl"
    elif suffix in YAML_SUFFIXES:
        questions, layout = _yaml_questions(p, need_topic), "yaml"
    else:
        raise UserFileError(p, f"unknown question file type {suffix!r}: use .jsonl, .yaml or .yml")
    if not questions:
        raise UserFileError(p, "no questions in the file", 1)
    seen: dict[tuple[str, int], int] = {}
    for q in questions:
        if (q.question_id, q.paraphrase) in seen:
            raise UserFileError(
                p, f"question id {q.question_id!r} repeats line {seen[q.question_id, q.paraphrase]}", q.line
            )
        seen[q.question_id, q.paraphrase] = q.line
    return QuestionSet(str(p), sha256_file(p), layout, questions)


def question_file_judges(path: str | os.PathLike) -> set[str]:
    """The ``judge:`` models a YAML question file names (the judge its numbers were scored with)."""
    p = Path(path)
    if p.suffix.lower() not in YAML_SUFFIXES:
        return set()
    data = yaml.safe_load(p.read_text(encoding="utf-8"))
    return {str(e["judge"]) for e in data if isinstance(e, Mapping) and e.get("judge")}
