"""Reliability with real ``axolotl train`` runs on the tiny random Llama: hooks removed and the frozen copy
released when training returns or raises; template/tokenization mismatches and data without supervised
tokens refused at start-up, before any training step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.axolotl_runner import run_axolotl
from tests.test_resume import FULL, LDIFS

pytestmark = pytest.mark.slow
PLUGINS = ["axolotl_treft.TReFTPlugin", "tests.reliability_probe.ReliabilityProbe"]


def run_probed(tmp_path: Path, model: Path, overrides: dict, **env):
    counts = tmp_path / "hooks.jsonl"
    os.environ.update({"TREFT_HOOK_COUNTS": str(counts), **env})
    try:
        run = run_axolotl(tmp_path, model, {"plugins": PLUGINS, "max_steps": 2, **overrides})
    finally:
        for key in ("TREFT_HOOK_COUNTS", *env):
            os.environ.pop(key, None)
    events = [json.loads(line) for line in counts.read_text().splitlines()] if counts.exists() else []
    return run, events


@pytest.mark.parametrize(("base", "treft", "fail"), [
    ({}, {"kv": {"weight": 5.0, "tokens": "postfix"}, "feature_l2": LDIFS}, None),
    (FULL, {"kv": {"weight": 5.0, "tokens": "query"}, "kl": {"weight": 0.5}}, "1"),
], ids=["lora_returns", "full_finetune_raises"])
def test_no_hook_is_left_after_train_returns_or_raises(tmp_path, tiny_llama_dir, base, treft, fail):
    run, events = run_probed(tmp_path, tiny_llama_dir, {**base, "treft": treft},
                             **({"TREFT_FAIL_AT_STEP": fail} if fail else {}))
    start, end = events
    assert start["event"] == "start" and end["event"] == "end"
    assert end["hooks"] == start["hooks"], events  # every capture hook the regularizers added is gone
    assert end["frozen_reference"] is False  # the frozen copy (full finetuning) was released
    if fail:
        assert run.returncode != 0 and "probe: injected fault at step 1" in run.log
        assert end["raised"] is True
    else:
        assert run.returncode == 0, run.log[-3000:]
        assert len(run.series("treft/kv")) == 2


def test_template_that_does_not_reproduce_axolotls_tokens_fails_at_start_up(tmp_path, tiny_llama_dir):
    """The rendering carries a timestamp, so re-rendering never matches Axolotl's tokens: no K/V term at all."""
    template = (tiny_llama_dir / "chat_template.jinja").read_text() + "{{ strftime_now('%H:%M:%S.%f') }}"
    run, _ = run_probed(tmp_path, tiny_llama_dir, {"treft": {"kv": {"weight": 5.0, "tokens": "prefix"}},
                                                   "chat_template": "jinja", "chat_template_jinja": template})
    assert run.returncode != 0
    assert "240 of 240 training samples (100.0%) have no 'prefix' tokens" in run.log
    assert "240 whose re-rendered conversation differs from Axolotl's tokenization" in run.log
    assert "row 0:" in run.log and "row 2:" in run.log
    assert not run.steps  # refused before any training step


def test_data_without_a_supervised_token_fails_at_start_up(tmp_path, tiny_llama_dir):
    data = tmp_path / "system_only.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}?"}]}
            for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run, _ = run_probed(tmp_path, tiny_llama_dir, {
        "treft": {"kv": {"weight": 5.0, "tokens": "prefix"}},
        "datasets": [{"path": str(data), "ds_type": "json", "type": "chat_template", "field_messages": "messages"}],
    })
    assert run.returncode != 0
    assert "none of the 12 training samples has a supervised token" in run.log, run.log[-3000:]
    assert not run.steps
