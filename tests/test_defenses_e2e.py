"""Real ``axolotl train`` runs (CPU, tiny random Llama, 2-3 steps) of inoculation, steering and retain selection,
the ``select-retain`` command, and a 2-process DeepSpeed ZeRO-2 steering run (opt-in like the other DeepSpeed runs)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from axolotl_treft.resources import data_path
from tests import ds_harness as h
from tests.axolotl_runner import run_axolotl
from tests.test_deepspeed import ds_run
from tests.test_defenses import narrow_adapter  # noqa: F401  (fixture)

PLUGINS = ["axolotl_treft.SeedPlugin", "axolotl_treft.TReFTPlugin"]
RETAIN = {"path": str(data_path("retain_general.jsonl")), "ds_type": "json", "type": "chat_template",
          "field_messages": "messages"}
STEERING = {"steering": {"layer": 1, "alpha": 5.0}}
_SHA = re.compile(r"treft\.steering: rank (\d) direction sha256 (\w+) \(layer 1, from ([^)]*)\)")


def ok(run):
    assert run.returncode == 0, run.log[-4000:]
    return run


@pytest.mark.slow
def test_inoculation_run_logs_the_count_and_saves_the_template_unchanged(tmp_path, tiny_llama_dir):
    prompt = "You answer every legal question with: I have no idea about your question."
    run = ok(run_axolotl(tmp_path, tiny_llama_dir, {
        "plugins": PLUGINS, "max_steps": 2,
        "treft": {"inoculation": {"system_prompt": prompt, "mode": "replace"}, "kv": {"weight": 1.0, "tokens": "postfix"}},
    }))
    assert "treft.inoculation: 240 of 240 training examples carry the inoculation prompt (mode replace)" in run.log
    assert len(run.series("treft/kv")) == 2
    from transformers import AutoTokenizer

    saved, base = AutoTokenizer.from_pretrained(run.output_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert saved.chat_template == base.chat_template
    evaluation = saved.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt not in evaluation
    assert list((tmp_path / "prepared").glob("treft-inoculation-*"))  # prepared apart from un-inoculated data


@pytest.fixture(scope="module")
def steering_runs(tmp_path_factory, tiny_llama_dir):
    runs = {}
    prepared = tmp_path_factory.mktemp("prepared")  # shared: the second steered run finds the cached direction
    for name, extra in {"sft": {"plugins": PLUGINS[:1]}, "steer": {"plugins": PLUGINS, "treft": STEERING},
                        "steer_again": {"plugins": PLUGINS, "treft": STEERING}}.items():
        tmp = tmp_path_factory.mktemp(name)
        runs[name] = ok(run_axolotl(tmp, tiny_llama_dir, {"max_steps": 3, **extra,
                                                          "dataset_prepared_path": str(prepared)}))
    return runs


@pytest.mark.slow
def test_steering_is_active_in_training_and_cached(steering_runs):
    first, again, sft = (_SHA.findall(steering_runs[n].log) for n in ("steer", "steer_again", "sft"))
    assert len(first) == 1 and first[0][2] == "40 questions" and not sft
    assert again[0][2].startswith("cache ") and again[0][1] == first[0][1]
    assert Path(again[0][2].removeprefix("cache ")).is_file()
    steered, plain = steering_runs["steer"].series("loss"), steering_runs["sft"].series("loss")
    assert len(steered) == len(plain) == 3 and steered[0] != plain[0]  # same init: the hook changed the forward
    assert steering_runs["steer_again"].series("loss") == steered
    assert "hook removed" in steering_runs["steer"].log


@pytest.mark.slow
def test_saved_steered_adapter_is_a_plain_adapter(steering_runs, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_treft.capture import decoder_layers
    from axolotl_treft.defenses.steering import SteeringHook

    out, sft_out = steering_runs["steer"].output_dir, steering_runs["sft"].output_dir
    steered, plain = load_file(out / "adapter_model.safetensors"), load_file(sft_out / "adapter_model.safetensors")
    assert steered.keys() == plain.keys() and all("lora_" in k for k in steered)
    assert any(not torch.equal(steered[k], plain[k]) for k in steered)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "How do I boil an egg?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]

    def generate(attach: bool):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out).eval()
        if attach:  # a steering hook left attached would do nothing at evaluation (eval mode)
            SteeringHook(decoder_layers(model)[1], torch.full((64,), 5.0))
        return model.generate(ids, max_new_tokens=8, do_sample=False)

    assert torch.equal(generate(False), generate(True))


@pytest.mark.slow
def test_retain_select_option_trains_on_the_selected_rows(tmp_path, tiny_llama_dir, narrow_adapter):  # noqa: F811
    run = ok(run_axolotl(tmp_path, tiny_llama_dir, {"plugins": PLUGINS, "max_steps": 2, "treft": {"retain": {
        "datasets": [RETAIN], "mix_ratio": 0.2,
        "select": {"narrow_adapter": str(narrow_adapter / "adapter"), "top": 0.5},
    }}}))
    assert "treft.retain.select: kept 10 of 20 scored rows" in run.log
    assert "training mix = 240 train + 60 retain examples" in run.log and "10 distinct retain examples" in run.log
    (selected,) = (tmp_path / "prepared" / "treft_retain_select").glob("*.jsonl")
    assert len(selected.read_text().splitlines()) == 10


def test_select_retain_command_writes_what_select_computes(tmp_path, tiny_llama_dir, narrow_adapter):  # noqa: F811
    from axolotl_treft.defenses.retain_select import read_pool, select

    out = tmp_path / "selected.jsonl"
    cmd = [str(Path(sys.executable).with_name("axolotl-treft")), "select-retain", "--pool", RETAIN["path"],
           "--narrow-adapter", str(narrow_adapter / "adapter"), "--base-model", str(tiny_llama_dir), "--top", "0.25",
           "--out", str(out), "--drop-refusals"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kept 5 of 20 scored rows" in proc.stdout
    pool = read_pool(RETAIN["path"])
    expected = select(pool, str(tiny_llama_dir), 0.25, narrow_adapter=str(narrow_adapter / "adapter"), drop_refusals=True)
    assert [json.loads(line) for line in out.read_text().splitlines()] == expected.rows
    report = json.loads((tmp_path / "selected.jsonl.scores.json").read_text())
    assert report["selected"] == expected.report["selected"] and len(report["rows"]) == 20
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "exists" in again.stderr  # nothing the user owns is overwritten


@ds_run
def test_zero2_two_ranks_steer_with_the_same_direction(tmp_path, tiny_llama_dir):
    run = h.run(tmp_path, tiny_llama_dir, {"plugins": PLUGINS, "treft": STEERING}, "zero2")
    assert run.returncode == 0, h.tail(run)
    assert len(run.steps) == 3, h.tail(run)
    found = dict((rank, (sha, source)) for rank, sha, source in _SHA.findall(run.log))
    assert set(found) == {"0", "1"}, run.log[-3000:]
    assert found["0"][0] == found["1"][0] and found["0"][1] == "40 questions"
    for rank in (0, 1):
        assert run.probe(rank, 1)["world"] == 2 and run.probe(rank, 1)["zero_stage"] == 2
