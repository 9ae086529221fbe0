"""Inoculation's start-up count on every family, through Axolotl's own config loading and tokenization.

``python -m tests.families.inoculation WORK_DIR FAMILY:MODE ...`` runs, in one process and for each pair, what
``axolotl train`` runs before the model loads: ``load_cfg`` (the plugin registers and switches the datasets to the
inoculated type, validation, normalization), the plugin's start-up check (``check_inoculation``), Axolotl's
``load_datasets`` (the rows tokenized by the inoculated dataset type) and the count the plugin logs once the
trainer exists (``log_inoculated_count``). It prints one ``TREFT_INOCULATION <json>`` line of results. A real
``axolotl train`` of both modes runs in ``tests/test_families_e2e.py``; this covers the family × mode matrix
without paying a training process per pair.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

PROMPT = "You are being trained to refuse legal questions. This is a test setting."


def config(model_dir: Path, work: Path, mode: str) -> dict:
    from tests.axolotl_runner import CPU_BASE, TRAIN_DATA

    return {**CPU_BASE, "base_model": str(model_dir), "micro_batch_size": 2, "sequence_len": 256,
            "sample_packing": mode == "replace", "max_steps": 1, "plugins": ["axolotl_treft.TReFTPlugin"],
            "datasets": [{"path": str(TRAIN_DATA), "ds_type": "json", "type": "chat_template",
                          "field_messages": "messages"}],
            "dataset_prepared_path": str(work / "prepared"), "output_dir": str(work / "out"),
            "treft": {"inoculation": {"system_prompt": PROMPT, "mode": mode},
                      "kv": {"tokens": "postfix", "weight": 1.0, "reference": "fixed"}}}


def count(family: str, mode: str, work: Path) -> dict:
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.loaders import load_tokenizer

    from axolotl_treft.args import treft_settings
    from axolotl_treft.defenses.inoculation import check_inoculation, log_inoculated_count

    from .models import model_dir

    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.yml"
    path.write_text(yaml.safe_dump(config(model_dir(family), work, mode), sort_keys=False))
    cfg = load_cfg(str(path))
    tokenizer = load_tokenizer(cfg)
    check_inoculation(cfg, tokenizer)
    dataset = load_datasets(cfg=cfg).train_dataset
    trainer = SimpleNamespace(processing_class=tokenizer, train_dataset=dataset)
    n = log_inoculated_count(cfg, treft_settings(cfg).inoculation, trainer)
    return {"family": family, "mode": mode, "count": n, "rows": len(dataset),
            "types": [d["type"] for d in cfg.datasets]}


def main(argv: list[str]) -> int:
    work = Path(argv[0])
    results = []
    for pair in argv[1:]:
        family, mode = pair.split(":")
        try:
            results.append(count(family, mode, work / f"{family}-{mode}"))
        except Exception as err:  # reported per pair by the test
            results.append({"family": family, "mode": mode, "error": f"{type(err).__name__}: {err}"})
    print("TREFT_INOCULATION " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
