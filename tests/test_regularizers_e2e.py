"""Real ``axolotl train`` runs (CPU, SmolLM2, LoRA) for each comparison regularizer, alone and combined."""

from __future__ import annotations

import re

import pytest

from tests.axolotl_runner import REPO, run_axolotl

pytestmark = pytest.mark.slow
PLUGIN = ["axolotl_treft.TReFTPlugin"]
RETAIN = [{"path": str(REPO / "axolotl_treft" / "data" / "retain_general.jsonl"), "ds_type": "json",
           "type": "chat_template", "field_messages": "messages"}]


def check(run, *terms):
    assert run.returncode == 0, run.log[-4000:]
    assert "Plugin loaded successfully: axolotl_treft.TReFTPlugin" in run.log
    for term in terms:
        values = run.series(f"treft/{term}")
        assert len(values) == len(run.series("loss")) > 0, term
        assert values[-1] > 0, (term, values)
    return run


def test_kl_on_train(tmp_path, smollm2_dir):
    run = check(run_axolotl(tmp_path, smollm2_dir, {
        "plugins": PLUGIN, "treft": {"kl": {"weight": 0.5, "on": "train", "tokens": "all"}}, "max_steps": 3,
    }), "kl")
    assert run.series("treft/kl")[0] == 0.0  # LoRA starts equal to the reference


def test_feature_l2_with_interleaving(tmp_path, smollm2_dir):
    run = check(run_axolotl(tmp_path, smollm2_dir, {
        "plugins": PLUGIN,
        "treft": {"feature_l2": {"weight": 1.0, "layers": 5}, "retain": {"datasets": RETAIN, "mix_ratio": 0.2}},
        "max_steps": 3,
    }), "feature_l2")
    assert run.series("treft/feature_l2")[0] == 0.0
    match = re.search(r"training mix = (\d+) train \+ (\d+) retain", run.log)
    assert match and (int(match.group(1)), int(match.group(2))) == (240, 60)
    assert re.search(r"Maximum number of steps set at 3", run.log)


def test_kl_on_retain_combined_with_treft_postfix(tmp_path, smollm2_dir):
    run = check(run_axolotl(tmp_path, smollm2_dir, {
        "plugins": PLUGIN,
        "treft": {
            "kv": {"weight": 5.0, "tokens": "postfix"},
            "kl": {"weight": 0.5, "on": "retain", "tokens": "response", "batch_size": 3},
            "retain": {"datasets": RETAIN},
        },
        "max_steps": 3,
    }), "kl", "kv")
    assert "KL-on-retain batches of 3 retain rows per step" in run.log
