"""Argument checks shared by the commands (argparse types and an output-directory check)."""

from __future__ import annotations

import argparse
from pathlib import Path


def out_dir_error(path: str | None, flag: str = "--out") -> str | None:
    """A message if ``path`` names an existing file where a directory is expected (else None)."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        return f"{flag} {path} is a file; it must be a directory (new or existing)"
    return None


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value
