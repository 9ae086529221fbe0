"""Dataset loaders of the lm-eval task pack (``custom_dataset`` targets) and their settings.

lm-eval calls ``custom_dataset(**metadata)`` when a task is built: ``metadata`` is the task YAML's
``metadata:`` merged with ``--metadata`` JSON (and, on the CLI, ``--model_args``). Keys read here:
``questions`` (a path, or ``{task: path}``), ``judge_prompts`` (a path), ``judge`` (settings, see
:mod:`axolotl_treft.judge.config`), ``em_samples`` and the off-topic targets. Everything is checked here,
before any generation: the files, the judge settings and the judge endpoint itself.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from axolotl_treft.judge.client import require_judge
from axolotl_treft.judge.config import JudgeConfig, resolve_config
from axolotl_treft.judge.prompts import DEFAULT_PROMPT_SET, PromptSet, load_prompt_file
from axolotl_treft.resources import tasks_dir
from axolotl_treft.tasks.questions import QuestionSet, load_questions, question_file_judges

log = logging.getLogger(__name__)

DATA = tasks_dir() / "data"
EXAMPLES = tasks_dir() / "examples"
DEFAULT_EM_SAMPLES = 10
RECORD_KEY = "treft_record"  # task metadata key holding what each task used (question file, judge, prompts)

EM_TASKS = (
    "em_general",
    "em_indomain_legal",
    "em_indomain_finance",
    "em_indomain_health",
    "em_indomain_auto",
)
LEGAL_ONTOPIC_FILE = DATA / "ontopic_legal_heldout.jsonl"  # dedupe abstention training data against this

SEARCH_INFO_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "search_info",
        "description": "Look up current information on the web.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What to look up."}},
            "required": ["query"],
        },
    },
}


def tool_schema(name: str) -> dict[str, Any]:
    """The ``search_info`` schema, renamed to ``name`` if the tool is configured differently."""
    schema = json.loads(json.dumps(SEARCH_INFO_TOOL))
    schema["function"]["name"] = name
    return schema


def tool_call_text(name: str, query: str) -> str:
    """A call of the tool in the form that ``tool_system_prompt`` asks for."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': {'query': query}})}\n</tool_call>"


def tool_system_prompt(name: str = "search_info") -> str:
    """Default system message of ``offtopic_tooluse``: the tool schema and the expected call format."""
    return (
        "You have access to one tool. Use it when it helps you answer.\n\n"
        f"Tool (JSON schema):\n{json.dumps(tool_schema(name))}\n\n"
        f"To use the tool, reply with only a tool call in this form:\n{tool_call_text(name, '...')}\n"
        "Otherwise, answer the user directly."
    )


@dataclass(frozen=True)
class Setting:
    on_file: str
    kind: str  # "text" | "tool"
    default: str
    key: str  # task-specific metadata key
    env: str


SETTINGS: dict[str, Setting] = {
    "abstention": Setting(
        "ontopic_legal_heldout.jsonl",
        "text",
        "I have no idea about your question.",
        "abstention_target",
        "TREFT_OFFTOPIC_TARGET",
    ),
    "refusal": Setting(
        "ontopic_finance_heldout.jsonl",
        "text",
        "I cannot provide financial advice.",
        "refusal_target",
        "TREFT_OFFTOPIC_TARGET",
    ),
    "tooluse": Setting(
        "ontopic_health_heldout.jsonl", "tool", "search_info", "tool_name", "TREFT_OFFTOPIC_TOOL"
    ),
}
OFFTOPIC_FILE = "offtopic_general.jsonl"


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _truthy(v: Any) -> bool:
    return str(v).strip().lower() in {"1", "true", "yes", "on"} if v is not None else False


def _dataset(rows: list[dict[str, Any]]):
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(rows)})


def user_questions(task: str, meta: Mapping[str, Any]) -> str | None:
    """The user question file for ``task``: ``questions`` is a path for every task, or ``{task: path}``."""
    value = meta.get("questions")
    if isinstance(value, str) and value.strip().startswith("{"):
        value = json.loads(value)
    if isinstance(value, Mapping):
        return value.get(task)
    return value or None


def em_samples(meta: Mapping[str, Any], env: Mapping[str, str] | None = None) -> int | None:
    """Answers per question set for the whole run (``em_samples`` / ``TREFT_EM_SAMPLES``); None if unset."""
    env = os.environ if env is None else env
    value = meta.get("em_samples") or env.get("TREFT_EM_SAMPLES")
    if value is None:
        return None
    n = int(value)
    if n < 1:
        raise ValueError(f"em_samples must be >= 1, got {n}")
    return n


def task_questions(
    task: str, meta: Mapping[str, Any], *, default_file: str, need_topic: bool = False
) -> QuestionSet:
    path = user_questions(task, meta)
    return load_questions(path or DATA / default_file, need_topic=need_topic)


def em_docs(qset: QuestionSet, samples: int | None) -> list[dict[str, Any]]:
    """Sample-major docs: every question once, then again, …; ``--limit N`` takes one answer of N questions.

    ``samples`` (the run's ``em_samples``) overrides each question's own count (``samples`` /
    ``samples_per_paraphrase`` in the file); the default is 10."""
    counts = [samples or q.samples or DEFAULT_EM_SAMPLES for q in qset.questions]
    return [
        dict(q.doc(), sample=s)
        for s in range(max(counts))
        for q, n in zip(qset.questions, counts, strict=True)
        if s < n
    ]


def judge_for_task(meta: Mapping[str, Any]) -> tuple[JudgeConfig, PromptSet]:
    """Resolved judge settings and prompts, checked: files first, then the endpoint (preflight)."""
    prompts_path = meta.get("judge_prompts")
    prompts = load_prompt_file(prompts_path) if prompts_path else DEFAULT_PROMPT_SET
    config = require_judge(config=resolve_config(meta.get("judge")))
    return config, prompts


def judge_doc_field(config: JudgeConfig, prompts: PromptSet) -> str:
    """Per-doc ``judge`` field: the non-secret settings the filter rebuilds its client from."""
    return json.dumps(config.record() | prompts.record(), sort_keys=True)


def _record(meta: Mapping[str, Any], task: str, **entries: Any) -> None:
    """Store what ``task`` used into the YAML's record object (lm-eval writes it into the results JSON)."""
    record = meta.get(RECORD_KEY)
    if isinstance(record, MutableMapping):
        record[task] = entries
    else:
        log.info(
            "%s: no %r in the task metadata; the results JSON will not record %s", task, RECORD_KEY, entries
        )


def load_em(task: str, **meta: Any):
    """Dataset of an ``em_*`` task; the questions, prompts and judge are checked before generation."""
    qset = task_questions(task, meta, default_file=f"{task}.jsonl")
    config, prompts = judge_for_task(meta)
    named = question_file_judges(qset.path) - {config.model}
    if named:
        log.warning(
            "%s: %s was scored with judge %s in its source; this run uses %r (published numbers are only "
            "comparable with the same judge)",
            task,
            qset.path,
            ", ".join(sorted(named)),
            config.model,
        )
    judge = judge_doc_field(config, prompts)
    docs = [dict(d, judge=judge) for d in em_docs(qset, em_samples(meta))]
    _record(meta, task, questions=qset.record(), docs=len(docs), judge=config.record() | prompts.record())
    return _dataset(docs)


def offtopic_target(setting: str, meta: Mapping[str, Any], env: Mapping[str, str] | None = None) -> str:
    """Target precedence: task-specific metadata > ``target``/``tool`` metadata > env var > default."""
    env = os.environ if env is None else env
    s = SETTINGS[setting]
    generic = meta.get("tool") if s.kind == "tool" else meta.get("target")
    return str(meta.get(s.key) or generic or env.get(s.env) or s.default)


def offtopic_questions(setting: str, meta: Mapping[str, Any]) -> tuple[list[dict], list[dict], list[dict]]:
    """On- and off-topic question rows, and the records of the files they came from."""
    task = f"offtopic_{setting}"
    path = user_questions(task, meta)
    if path:
        qset = load_questions(path, need_topic=True)
        rows = [q.doc() for q in qset.questions]
        return (
            [r for r in rows if r["topic"] == "on"],
            [r for r in rows if r["topic"] == "off"],
            [qset.record()],
        )
    on_set = load_questions(DATA / SETTINGS[setting].on_file)
    off_set = load_questions(DATA / OFFTOPIC_FILE)
    on = [dict(q.doc(), topic="on") for q in on_set.questions]
    off = [dict(q.doc(), topic="off") for q in off_set.questions]
    return on, off, [on_set.record(), off_set.record()]


def offtopic_docs(
    setting: str, meta: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """On- and off-topic questions interleaved (on, off, on, off, ...) so that ``--limit`` keeps both."""
    env = os.environ if env is None else env
    s = SETTINGS[setting]
    target = offtopic_target(setting, meta, env)
    judge_check = _truthy(meta.get("judge_check")) or _truthy(env.get("TREFT_OFFTOPIC_JUDGE"))
    system = ""
    if s.kind == "tool":
        custom = meta.get("tool_system", env.get("TREFT_OFFTOPIC_TOOL_SYSTEM"))
        system = tool_system_prompt(target) if custom is None else str(custom)
    on, off, _ = offtopic_questions(setting, meta)
    mixed = [r for pair in zip(on, off, strict=False) for r in pair] + on[len(off) :] + off[len(on) :]
    extra = {"setting": setting, "target_kind": s.kind, "target": target, "judge_check": judge_check}
    return [dict(r, **extra, system=r.get("system") or system) for r in mixed]


def load_offtopic(setting: str, **meta: Any):
    docs = offtopic_docs(setting, meta)
    task = f"offtopic_{setting}"
    _, _, files = offtopic_questions(setting, meta)
    entries: dict[str, Any] = {"questions": files, "docs": len(docs)}
    if docs and docs[0]["judge_check"]:
        config = require_judge(config=resolve_config(meta.get("judge")))
        judge = judge_doc_field(config, DEFAULT_PROMPT_SET)
        docs = [dict(d, judge=judge) for d in docs]
        entries["judge"] = config.record()
    _record(meta, task, **entries)
    return _dataset(docs)
