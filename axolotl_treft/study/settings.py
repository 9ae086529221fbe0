"""The settings every run of one study shares (from the `study` and `demo` flags)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """What every run of one study shares."""

    tasks: tuple[str, ...]
    launcher: str = "python"
    launcher_args: tuple[str, ...] = ()
    max_steps: int | None = None
    limit: int | None = None
    max_gen_toks: int | None = None
    eval_batch_size: str = "auto"
    device: str | None = None  # lm_eval --device; None: lm-eval's choice (cuda when there is one)
    env: Mapping[str, str] = field(default_factory=dict)  # added to the environment of every subprocess
    cwd: Path = field(default_factory=Path.cwd)  # relative paths of the config resolve here, as with `axolotl train`
    monitor_every: int | None = None  # treft.monitor in every trained run (the leak curves); None: off
    monitor_limit: int | None = None  # documents per task at each monitored step
