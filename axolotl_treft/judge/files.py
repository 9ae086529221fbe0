"""Reading user files (question sets, judge prompts) with errors that name the file and the line."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

YAML_SUFFIXES = (".yaml", ".yml")
JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl",)


class UserFileError(ValueError):
    """A user-supplied file is missing or malformed; the message starts with ``path:line:``."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None):
        self.path, self.line = str(path), line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


def sha256_file(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` expanded and resolved; a clear error if it is not a readable file."""
    p = Path(os.path.expanduser(str(path))).resolve()
    if not p.is_file():
        raise UserFileError(p, f"{what} file does not exist" if not p.exists() else f"{what} is not a file")
    if p.stat().st_size == 0 or not p.read_text(encoding="utf-8").strip():
        raise UserFileError(p, f"{what} file is empty", line=1)
    return p


def load_jsonl_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``[(line number, object)]`` of a JSONL file; blank lines skipped, the rest must be objects."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserFileError(path, f"not valid JSON ({e.msg})", line=n) from e
        if not isinstance(obj, dict):
            raise UserFileError(path, f"expected a JSON object, got {type(obj).__name__}", line=n)
        rows.append((n, obj))
    return rows


def load_yaml_with_lines(path: Path) -> tuple[Any, yaml.Node]:
    """The parsed YAML (or JSON) document and its node tree, whose ``start_mark.line`` gives line numbers."""
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserFileError(
            path, f"not valid YAML ({getattr(e, 'problem', e)})", line=mark.line + 1 if mark else None
        ) from e
    if node is None:
        raise UserFileError(path, "file is empty", line=1)
    return data, node


def line_of(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def mapping_lines(node: yaml.Node) -> dict[str, int]:
    """Line of each key of a YAML mapping node."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): line_of(k) for k, _ in node.value}


def sequence_item_nodes(node: yaml.Node) -> list[yaml.Node]:
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []
