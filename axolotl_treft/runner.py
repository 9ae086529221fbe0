"""Run ``axolotl train`` on a config dict in a subprocess and read back the metrics it logged."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

_METRICS = re.compile(r"(\{'loss': .*?\})")

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1",
               "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class RunResult:
    returncode: int
    log: str
    steps: list[dict]
    output_dir: Path

    def series(self, key: str) -> list[float]:
        return [float(s[key]) for s in self.steps if key in s]


def parse_metrics(log: str) -> list[dict]:
    """The per-step metric dicts HF Trainer prints (``{'loss': ..., 'treft/kv': ...}``)."""
    return [ast.literal_eval(m) for m in _METRICS.findall(log)]


def run_axolotl_train(cfg: dict, workdir: Path, env: dict | None = None, timeout: int | None = None,
                      on_line: Callable[[str], None] | None = None) -> RunResult:
    """Write ``cfg`` to ``workdir/config.yml`` and run ``axolotl train`` on it (in-process launcher)."""
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}, sort_keys=False))
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    axolotl = Path(sys.executable).with_name("axolotl")
    proc = subprocess.Popen([str(axolotl), "train", str(path), "--launcher", "python"], cwd=workdir, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    (workdir / "train.log").write_text(log)
    return RunResult(proc.returncode, log, parse_metrics(log), Path(cfg.get("output_dir", workdir / "out")))
