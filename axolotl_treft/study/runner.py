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
from collections.abc import Callable, Sequence
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


UNFINISHED = "UNFINISHED"  # in a run directory: the run started and did not finish; a re-run redoes it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_S = 10.0  # after SIGTERM, how long the child's tree may take to exit before SIGKILL


class Stopped(BaseException):  # noqa: N818 - like KeyboardInterrupt: not an error, a request to stop
    """SIGTERM, SIGINT or SIGHUP reached the study; ``output`` is the running child's output so far."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.output = ""

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def stop_on_signals():
    """While the block runs, SIGTERM, SIGINT and SIGHUP raise :class:`Stopped` in the main thread (once: a
    second signal while the child's tree is being stopped is ignored, so the clean-up finishes)."""
    stopping = False

    def handler(signum, frame) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_streaming(cmd: list[str], cwd: Path, env: dict, timeout: float | None = None,
                  on_line: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run ``cmd`` in its own process group, streaming its output lines; ``(returncode, output)``.

    Past ``timeout`` seconds (also when the child hangs without closing its output) the child's whole process
    tree is stopped and ``TimeoutError`` raised, carrying the output so far. On any exception in the waiting
    thread (:class:`Stopped`, ``KeyboardInterrupt``) the tree is stopped too, before the exception goes on.
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
        stop_tree(proc)
        reader.join(timeout=5)
        raise TimeoutError(f"{Path(cmd[0]).name} ran past {timeout}s and was killed with its process group",
                           "".join(lines)) from None
    except Stopped as stop:
        stop_tree(proc)
        reader.join(timeout=5)
        stop.output = "".join(lines)
        raise
    finally:
        if proc.poll() is None:  # interrupted otherwise (e.g. KeyboardInterrupt): leave nothing running
            stop_tree(proc)
    reader.join(timeout=30)
    if reader.is_alive():  # a leftover grandchild still holds the output open
        stop_tree(proc)
        reader.join()
    return proc.returncode, "".join(lines)


def stop_tree(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """Stop ``proc``'s whole tree: its process group and every descendant that left it (a launcher's
    workers in a session of their own). SIGTERM first (torchrun and accelerate pass it on to their workers),
    SIGKILL to whatever is left after ``grace`` seconds; returns once ``proc`` is reaped."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
            os.killpg(proc.pid, sig)
        for child in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace if sig == signal.SIGTERM else None)
        _, alive = psutil.wait_procs(tree, timeout=grace if sig == signal.SIGTERM else 5)
        if proc.poll() is not None and not alive:
            break
        tree = alive
    proc.wait()


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a stop signal can arrive at any line)."""
    from ..distributed import write_atomic as write_file_atomic

    write_file_atomic(path, lambda tmp: tmp.write_text(text))


def mark_unfinished(run_dir: Path, text: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / UNFINISHED, text + "\n")


def run_axolotl_train(cfg: dict, workdir: Path, env: dict | None = None, timeout: int | None = None,
                      on_line: Callable[[str], None] | None = None,
                      command: Sequence[str] | None = None) -> RunResult:
    """Write ``cfg`` to ``workdir/config.yml`` and run ``axolotl train`` on it (in-process launcher); ``command``
    replaces the ``axolotl`` console script (the argv that runs Axolotl's CLI)."""
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}, sort_keys=False))
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    axolotl = list(command or [str(Path(sys.executable).with_name("axolotl"))])
    try:
        returncode, log = run_streaming([*axolotl, "train", str(path), "--launcher", "python"], workdir,
                                        full_env, timeout, on_line)
    except TimeoutError as err:
        (workdir / "train.log").write_text(err.args[1])
        raise TimeoutError(f"{err.args[0]}; log: {workdir / 'train.log'}") from None
    (workdir / "train.log").write_text(log)
    return RunResult(returncode, log, parse_metrics(log), Path(cfg.get("output_dir", workdir / "out")))
