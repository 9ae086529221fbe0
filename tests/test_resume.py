"""Resume and the initial-model reference, with real ``axolotl train`` runs on the tiny random Llama.

Each case trains 4 steps saving a checkpoint at step 2, then a new process resumes from that checkpoint: the
resumed steps 3-4 must log the same loss and ``treft/*`` terms as the uninterrupted run (within 1e-5). Cases
cover full finetuning (frozen copy) and LoRA, every token mode, KL on train and on retain (the retain-batch
stream continues where it was), LDIFS, and a continued adapter (``lora_model_dir``), whose reference is base +
the adapter as loaded (every term exactly 0 at the first step).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.axolotl_runner import REPO, run_axolotl

pytestmark = pytest.mark.slow
PLUGINS = ["axolotl_treft.TReFTPlugin", "tests.reliability_probe.ReliabilityProbe"]
RETAIN = [{"path": str(REPO / "axolotl_treft" / "data" / "retain_general.jsonl"), "ds_type": "json",
           "type": "chat_template", "field_messages": "messages"}]
FULL = {key: None for key in ("adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_linear",
                              "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")}
KL = {"weight": 0.5}
LDIFS = {"weight": 1.0, "layers": 2}

CASES = {  # every token mode, full finetuning and LoRA, KL on train and on retain, LDIFS, a continued adapter
    "full_kv_list_kl_ldifs": (FULL, {"kv": [{"weight": 5.0, "tokens": "prefix_postfix"},
                                            {"weight": 5.0, "tokens": "query"}], "kl": KL, "feature_l2": LDIFS}),
    "lora_kv_list_kl_retain": ({}, {"kv": [{"weight": 5.0, "tokens": "postfix"}, {"weight": 5.0, "tokens": "all"}],
                                    "kl": {"weight": 0.5, "on": "retain", "batch_size": 2},
                                    "retain": {"datasets": RETAIN}}),
    "continued_prefix_kl_ldifs": ("continued", {"kv": {"weight": 5.0, "tokens": "prefix"}, "kl": KL,
                                                "feature_l2": LDIFS}),
}


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_llama_dir) -> Path:
    """A LoRA adapter for the tiny Llama (Axolotl's r/alpha/targets) whose B is non-zero: it changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.reg_harness import randomize_lora_b

    out = tmp_path_factory.mktemp("continued-adapter")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    randomize_lora_b(get_peft_model(model, lora), 0.2).save_pretrained(out)
    return out


def metrics(path: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, path.read_text().splitlines())}


def train(workdir: Path, model: Path, overrides: dict, **env) -> dict[int, dict]:
    os.environ.update({"TREFT_METRICS": str(workdir / "metrics.jsonl"), **env})
    try:
        run = run_axolotl(workdir, model, overrides)
    finally:
        for key in ("TREFT_METRICS", *env):
            os.environ.pop(key, None)
    assert run.returncode == 0, run.log[-4000:]
    return metrics(workdir / "metrics.jsonl")


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_continues_exactly(case, tmp_path, tiny_llama_dir, trained_adapter):
    base, treft = CASES[case]
    if base == "continued":
        base = {"lora_model_dir": str(trained_adapter)}
    common = {**base, "plugins": PLUGINS, "treft": treft, "max_steps": 4, "save_strategy": "steps",
              "save_steps": 2, "output_dir": str(tmp_path / "out")}
    whole = train(tmp_path / "whole", tiny_llama_dir, common)
    resumed = train(tmp_path / "resumed", tiny_llama_dir,
                    {**common, "resume_from_checkpoint": str(tmp_path / "out" / "checkpoint-2")})
    terms = ["loss", *sorted(k for k in whole[1] if k.startswith("treft/"))]
    kv_list = isinstance(treft["kv"], list)
    n_terms = len([k for k in treft if k not in ("retain", "kv")]) + (len(treft["kv"]) + 1 if kv_list else 1)
    assert len(terms) == 2 + n_terms, terms  # loss, treft/sft, each term (a kv list: each K/V term and their sum)
    assert sorted(resumed) == [3, 4] and sorted(whole) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in terms:
            assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-5, abs=1e-5), (step, key)
    kv_keys = [k for k in terms if k.startswith("treft/kv")]
    assert all(whole[4][k] > 1e-4 for k in kv_keys), kv_keys  # the terms moved: equality is not trivially 0 == 0
    first = whole[1]
    if case.startswith("continued"):
        # the reference is base + the loaded adapter: nothing has drifted at the first step
        assert first["treft/kv"] == 0.0
        assert abs(first["treft/kl"]) < 1e-6 and abs(first["treft/feature_l2"]) < 1e-6
    else:
        assert all(abs(first[k]) < 1e-6 for k in kv_keys)
