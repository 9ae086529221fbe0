"""Dataset loaders and defaults of the lm-eval task pack (``custom_dataset`` targets).

lm-eval calls ``custom_dataset(**metadata)`` when a task is built: ``metadata`` is the YAML metadata merged
with the CLI ``--metadata`` JSON and ``--model_args``. Unknown keys are ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axolotl_treft.judge import require_judge

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_EM_SAMPLES = 10

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


def em_samples(meta: Mapping[str, Any], env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    n = int(meta.get("em_samples") or env.get("TREFT_EM_SAMPLES") or DEFAULT_EM_SAMPLES)
    if n < 1:
        raise ValueError(f"em_samples must be >= 1, got {n}")
    return n


def em_docs(task: str, samples: int) -> list[dict[str, Any]]:
    """Each question ``samples`` times, sample-major: ``--limit N`` takes one answer of each of N questions."""
    rows = read_jsonl(DATA / f"{task}.jsonl")
    return [dict(r, sample=s) for s in range(samples) for r in rows]


def load_em(task: str, **meta: Any):
    """Dataset of an ``em_*`` task; checks the judge first (a missing judge fails before generation)."""
    require_judge()
    return _dataset(em_docs(task, em_samples(meta)))


def offtopic_target(setting: str, meta: Mapping[str, Any], env: Mapping[str, str] | None = None) -> str:
    """Target precedence: task-specific metadata > ``target``/``tool`` metadata > env var > default."""
    env = os.environ if env is None else env
    s = SETTINGS[setting]
    generic = meta.get("tool") if s.kind == "tool" else meta.get("target")
    return str(meta.get(s.key) or generic or env.get(s.env) or s.default)


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
    on = [dict(r, topic="on") for r in read_jsonl(DATA / s.on_file)]
    off = [dict(r, topic="off") for r in read_jsonl(DATA / OFFTOPIC_FILE)]
    mixed = [r for pair in zip(on, off, strict=False) for r in pair] + on[len(off) :] + off[len(on) :]
    extra = {
        "setting": setting,
        "target_kind": s.kind,
        "target": target,
        "judge_check": judge_check,
        "system": system,
    }
    return [dict(r, **extra) for r in mixed]


def load_offtopic(setting: str, **meta: Any):
    docs = offtopic_docs(setting, meta)
    if docs and docs[0]["judge_check"]:
        require_judge()
    return _dataset(docs)
