"""Real ``axolotl train`` runs (CPU, the tiny random Llama with SmolLM2's tokenizer and template) proving the
plugin runs and does its job; the SmolLM2 model itself trains in the demo, monitor and diagnose tests."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.axolotl_runner import run_axolotl

pytestmark = pytest.mark.slow
PLUGIN = ["axolotl_treft.TReFTPlugin"]
SEED = "axolotl_treft.SeedPlugin"  # pins LoRA init so runs compare bit for bit


def assert_ok(run):
    assert run.returncode == 0, run.log[-4000:]
    assert "Plugin loaded successfully: axolotl_treft.TReFTPlugin" in run.log or "treft" not in str(run.steps)


def test_lora_packed_gradient_checkpointing_prefix(tmp_path, tiny_llama_dir):
    run = run_axolotl(tmp_path, tiny_llama_dir, {
        "plugins": PLUGIN,
        "treft": {"kv": {"weight": 5.0, "tokens": "prefix"}},
        "sample_packing": True,
        "gradient_checkpointing": True,
    })
    assert_ok(run)
    assert "Plugin loaded successfully: axolotl_treft.TReFTPlugin" in run.log
    assert "cached reference K/V for 1 distinct prefix" in run.log  # no reference pass during training
    kv, sft, loss = run.series("treft/kv"), run.series("treft/sft"), run.series("loss")
    assert len(kv) == 4
    assert kv[0] == 0.0  # LoRA starts at the initial model, also through packing
    assert kv[-1] > 1e-4
    for k, s, total in zip(kv, sft, loss, strict=True):  # the logged loss is sft + λ·kv
        assert total == pytest.approx(s + 5.0 * k, rel=2e-3, abs=2e-3)


@pytest.fixture(scope="module")
def drift_runs(tmp_path_factory, tiny_llama_dir):
    common = {"max_steps": 8, "save_strategy": "no"}
    runs = {}
    for name, extra in {
        "plain": {"plugins": [SEED]},
        "lambda0": {"plugins": [SEED, *PLUGIN], "treft": {"kv": {"weight": 0.0, "tokens": "prefix"}}},
        "lambda100": {"plugins": [SEED, *PLUGIN], "treft": {"kv": {"weight": 100.0, "tokens": "prefix"}}},
    }.items():
        runs[name] = run_axolotl(tmp_path_factory.mktemp(name), tiny_llama_dir, {**common, **extra})
        assert_ok(runs[name])
    return runs


def test_large_lambda_keeps_prefix_kv_close(drift_runs):
    free = drift_runs["lambda0"].series("treft/kv")
    held = drift_runs["lambda100"].series("treft/kv")
    assert len(free) == len(held) == 8
    assert free[-1] > 1e-3
    assert held[-1] < 0.1 * free[-1], (free, held)


def test_weight_zero_is_exactly_plain_sft(drift_runs):
    plain, zero = drift_runs["plain"], drift_runs["lambda0"]
    assert plain.series("loss") == zero.series("loss")
    assert "treft/kv" in zero.steps[0] and "treft/kv" not in plain.steps[0]
    a = load_file(plain.output_dir / "adapter_model.safetensors")
    b = load_file(zero.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_finetune_gradient_checkpointing_prefix_postfix(tmp_path, tiny_llama_dir):
    run = run_axolotl(tmp_path, tiny_llama_dir, {
        "plugins": PLUGIN,
        "treft": {"kv": {"weight": 5.0, "tokens": "prefix_postfix"}},
        "adapter": None, "lora_r": None, "lora_alpha": None, "lora_dropout": None, "lora_target_linear": None,
        "lora_mlp_kernel": None, "lora_qkv_kernel": None, "lora_o_kernel": None, "lora_embedding_kernel": None,
        "learning_rate": 2e-5,
        "max_steps": 3,
        "gradient_checkpointing": True,
        "save_strategy": "no",
    })
    assert_ok(run)
    assert "loading a frozen reference copy" in run.log
    kv = run.series("treft/kv")
    assert kv[0] == 0.0 and kv[-1] > 0.0
