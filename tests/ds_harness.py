"""Run ``axolotl train`` under torchrun with DeepSpeed on CPU processes, and read back what ran.

The command is the documented multi-GPU one (``axolotl train cfg.yml --launcher torchrun -- --nproc_per_node
N``); the config lists the test-only plugin ``tests.ds_cpu_shim.CPUDeepSpeed`` first (it makes accelerate
count CPU processes under DeepSpeed and prints per-rank probe lines), and the environment selects
DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``; collectives over gloo).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.axolotl_runner import CPU_BASE, REPO, TRAIN_DATA

DS_CONFIGS = REPO / "example_yamls" / "deepspeed"
SHIM = "tests.ds_cpu_shim.CPUDeepSpeed"
SEED = "axolotl_treft.SeedPlugin"
PLUGIN = "axolotl_treft.TReFTPlugin"
_DECODER = json.JSONDecoder()


@dataclass
class DSRun:
    returncode: int | None  # None: killed by the timeout
    log: str
    seconds: float
    steps: list[dict]
    probes: list[dict] = field(default_factory=list)
    output_dir: Path | None = None

    def series(self, key: str) -> list[float]:
        return [float(s[key]) for s in self.steps if key in s]

    def probe(self, rank: int, step: int) -> dict:
        found = [p for p in self.probes if p["rank"] == rank and p["step"] == step]
        assert found, (rank, step, self.probes)
        return found[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(tmp: Path, base_model: Path, overrides: dict, deepspeed: str | None) -> Path:
    cfg = dict(CPU_BASE)
    cfg.update({
        "base_model": str(base_model),
        "datasets": [{"path": str(TRAIN_DATA), "ds_type": "json", "type": "chat_template",
                      "field_messages": "messages"}],
        "dataset_prepared_path": str(tmp / "prepared"),
        "output_dir": str(tmp / "out"),
        "micro_batch_size": 2,
        "max_steps": 3,
    })
    if deepspeed:
        cfg["deepspeed"] = str(DS_CONFIGS / f"{deepspeed}.json")
    cfg.update(overrides)
    cfg["plugins"] = [SHIM, *[p for p in cfg.get("plugins") or [] if p != SHIM]]
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = tmp / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def env() -> dict:
    return dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        AXOLOTL_DO_NOT_TRACK="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", AXOLOTL_METRIC_NDIGITS="10",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )


def run(tmp: Path, base_model: Path, overrides: dict, deepspeed: str | None = None, nproc: int = 2,
        timeout: int = 900) -> DSRun:
    """``deepspeed`` is ``zero2``/``zero3`` (our shipped JSONs) or None for a single-process run."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = write_config(tmp, base_model, overrides, deepspeed)
    axolotl = str(Path(sys.executable).with_name("axolotl"))
    if deepspeed:
        cmd = [axolotl, "train", str(path), "--launcher", "torchrun", "--",
               "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    else:
        cmd = [axolotl, "train", str(path), "--launcher", "python"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tmp, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # torchrun starts its ranks in their own sessions: kill by ancestry
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            out = ""
        code = None
    seconds = time.monotonic() - start
    (tmp / "train.log").write_text(out)
    steps, probes = tagged(out, "TREFT_DS_LOG"), tagged(out, "TREFT_DS_PROBE")
    return DSRun(code, out, seconds, steps, probes, tmp / "out")


def kill_tree(pid: int) -> None:
    """Kill ``pid`` and every process below it (the launcher, the ranks, their data-loader workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)


def tagged(text: str, tag: str) -> list[dict]:
    """Every ``TAG {json}`` payload in ``text`` (other output may follow on the same line)."""
    found = []
    for match in re.finditer(re.escape(tag) + " ", text):
        try:
            found.append(_DECODER.raw_decode(text, match.end())[0])
        except json.JSONDecodeError:
            continue
    return found


def tail(run: DSRun, n: int = 6000) -> str:
    lines = [ln for ln in run.log.splitlines() if "Warning" not in ln and "return func(" not in ln and ln.strip()]
    return "\n".join(lines)[-n:]
