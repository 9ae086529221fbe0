"""Run ``axolotl train`` on a config dict in a subprocess and read back the metrics it logged."""

from __future__ import annotations

import ast
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

_METRICS = re.compile(r"(\{'loss': .*?\})")
_BARE_NON_FINITE = re.compile(r"(?<=: )(-?(?:nan|inf))(?=[,}])")  # HF prints float('nan') as a bare `nan`

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
    """The per-step metric dicts HF Trainer prints (``{'loss': ..., 'treft/kv': ...}``); a bare ``nan``/``inf``
    is read as the string ``'nan'``/``'inf'`` (``RunResult.series`` turns it into the float)."""
    return [ast.literal_eval(_BARE_NON_FINITE.sub(r"'\1'", m)) for m in _METRICS.findall(log)]


def run_streaming(cmd: list[str], cwd: Path, env: dict, timeout: float | None = None,
                  on_line: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run ``cmd`` in its own process group, streaming its output lines; ``(returncode, output)``.

    Past ``timeout`` seconds (also when the child hangs without closing its output) the whole process group
    is killed and ``TimeoutError`` raised, carrying the output so far.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        reader.join(timeout=5)
        raise TimeoutError(f"{Path(cmd[0]).name} ran past {timeout}s and was killed with its process group",
                           "".join(lines)) from None
    finally:
        if proc.poll() is None:  # interrupted (e.g. KeyboardInterrupt): leave nothing running
            _kill_group(proc)
    reader.join(timeout=30)
    if reader.is_alive():  # a leftover grandchild still holds the output open
        _kill_group(proc)
        reader.join()
    return proc.returncode, "".join(lines)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_axolotl_train(cfg: dict, workdir: Path, env: dict | None = None, timeout: int | None = None,
                      on_line: Callable[[str], None] | None = None) -> RunResult:
    """Write ``cfg`` to ``workdir/config.yml`` and run ``axolotl train`` on it (in-process launcher)."""
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}, sort_keys=False))
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    axolotl = Path(sys.executable).with_name("axolotl")
    try:
        returncode, log = run_streaming([str(axolotl), "train", str(path), "--launcher", "python"], workdir,
                                        full_env, timeout, on_line)
    except TimeoutError as err:
        (workdir / "train.log").write_text(err.args[1])
        raise TimeoutError(f"{err.args[0]}; log: {workdir / 'train.log'}") from None
    (workdir / "train.log").write_text(log)
    return RunResult(returncode, log, parse_metrics(log), Path(cfg.get("output_dir", workdir / "out")))
