"""What a finished step of a study is keyed by: every input of the run, so a changed input is never reused.

A run's training key covers its derived config, the command-line overrides, the content of every local file
the config names (datasets, retain pools, DeepSpeed JSON, a Jinja template …), the identity of every local
directory it names (the base model, ``lora_model_dir``: file names, sizes and modification times) and the
key of the run it depends on (Interleaving+ scores its retain pool with the SFT run). Which weights that
upstream run produced is recorded at the end of training (``upstream`` in ``train.json``) and checked when
the run would be reused: an upstream run trained again since makes the dependent run train again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..defenses.retain_select import model_digest

# keys whose paths are where the run writes, not what it reads (the study passes its own as overrides)
OUTPUT_KEYS = frozenset({"output_dir", "dataset_prepared_path"})


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """Every ``(key, string value)`` in a nested config (the key is the innermost mapping key)."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            if str(k) not in OUTPUT_KEYS:
                yield from _strings(v, str(k))
    elif isinstance(node, list | tuple):
        for v in node:
            yield from _strings(v, key)
    elif isinstance(node, str):
        yield key, node


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _dir_identity(path: Path) -> str:
    """Names, sizes and modification times of the files in ``path`` (a model directory can be many GB)."""
    entries = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in path.rglob("*") if p.is_file())
    return fingerprint(entries)


def input_digests(cfg: Mapping, cwd: Path, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """A digest of every local file (content) and directory (identity) that ``cfg`` names, by the string
    that names it; ``skip``: values left out (a path the study itself fills in, keyed otherwise)."""
    found = {}
    for _, value in _strings(cfg):
        if value in skip or value in found or "\n" in value or len(value) > 4096:
            continue
        path = Path(value).expanduser()
        path = path if path.is_absolute() else cwd / path
        try:
            if path.is_file():
                found[value] = _file_digest(path)
            elif path.is_dir() and path.resolve() != cwd.resolve():
                found[value] = "dir:" + _dir_identity(path)
        except OSError:  # unreadable: Axolotl will say so when it loads it
            continue
    return found


def trained_digest(model_dirs: list[Path]) -> str | None:
    """The weights a finished run produced (content of its weight and config files)."""
    digests = [model_digest(str(d)) for d in model_dirs if d.is_dir()]
    return fingerprint(digests) if digests else None


def eval_key(train: str, cmd: list[str]) -> str:
    return fingerprint({"train": train, "eval": list(cmd[1:])})
