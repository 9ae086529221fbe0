"""Run the real ``axolotl train`` CLI on a config and read back the metrics it logged."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from axolotl_treft.study.runner import RunResult, run_axolotl_train

__all__ = ["CPU_BASE", "TRAIN_DATA", "RunResult", "run_axolotl"]

REPO = Path(__file__).resolve().parents[1]
# Axolotl's CLI as a package's __main__ (tests/axolotl_cli: spawned dataset workers start without re-importing it)
AXOLOTL_CLI = (sys.executable, "-m", "tests.axolotl_cli")
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
    # a few hundred rows on 2 cores: one process tokenizes them faster than a pool of workers starts
    "dataset_num_proc": 1,
    "dataloader_num_workers": 0,
}

def run_axolotl(tmp: Path, base_model: Path, overrides: dict, timeout: int = 900) -> RunResult:
    cfg = dict(CPU_BASE)
    cfg.update({
        "base_model": str(base_model),
        "datasets": [{"path": str(TRAIN_DATA), "ds_type": "json", "type": "chat_template", "field_messages": "messages"}],
        "dataset_prepared_path": str(tmp / "prepared"),
        "output_dir": str(tmp / "out"),
    })
    cfg.update(overrides)
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "CUDA_VISIBLE_DEVICES": ""}
    return run_axolotl_train(cfg, tmp, env=env, timeout=timeout, command=AXOLOTL_CLI)
