"""Run the real ``axolotl train`` CLI on a config and read back the metrics it logged."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAIN_DATA = REPO / "axolotl_treft" / "data" / "abstention_legal_train.jsonl"

CPU_BASE = {
    "tokenizer_type": "AutoTokenizer",
    "chat_template": "tokenizer_default",
    "val_set_size": 0,
    "sequence_len": 128,
    "sample_packing": False,
    "adapter": "lora",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_target_linear": True,
    "lora_mlp_kernel": False,
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
    "lora_embedding_kernel": False,
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_steps": 4,
    "learning_rate": 1e-3,
    "optimizer": "adamw_torch",
    "lr_scheduler": "constant",
    "seed": 42,
    "bf16": False,
    "fp16": False,
    "tf32": False,
    "attn_implementation": "sdpa",
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "save_strategy": "no",
}

_METRICS = re.compile(r"(\{'loss': .*?\})")


@dataclass
class RunResult:
    returncode: int
    log: str
    steps: list[dict]
    output_dir: Path

    def series(self, key: str) -> list[float]:
        return [float(s[key]) for s in self.steps if key in s]


def run_axolotl(tmp: Path, base_model: Path, overrides: dict, timeout: int = 900) -> RunResult:
    cfg = dict(CPU_BASE)
    cfg.update({
        "base_model": str(base_model),
        "datasets": [{"path": str(TRAIN_DATA), "ds_type": "json", "type": "chat_template", "field_messages": "messages"}],
        "dataset_prepared_path": str(tmp / "prepared"),
        "output_dir": str(tmp / "out"),
    })
    cfg.update(overrides)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = tmp / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    axolotl = Path(sys.executable).with_name("axolotl")
    proc = subprocess.run([str(axolotl), "train", str(path), "--launcher", "python"], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    (tmp / "train.log").write_text(log)
    steps = [ast.literal_eval(m) for m in _METRICS.findall(log)]
    return RunResult(proc.returncode, log, steps, tmp / "out")
