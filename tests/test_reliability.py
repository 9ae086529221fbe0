"""Bad input and faults (docs/reliability.md): each case ends in a clear error before model load, a visible
warning, or correct behaviour. Config cases run Axolotl's own validation (no model load); the rest use the
package's functions and CLI directly. Real-training cases are in test_reliability_e2e.py and test_resume.py."""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import sys
import time
from pathlib import Path

import pytest
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault

from axolotl_treft.cli.main import main as cli_main
from tests.axolotl_runner import CPU_BASE, TRAIN_DATA

PLUGIN = "axolotl_treft.TReFTPlugin"
RETAIN = [{"path": str(TRAIN_DATA), "type": "chat_template"}]
KV = {"kv": {"weight": 1.0}}


def make_cfg(base_model, tmp_path, treft, plugins=(PLUGIN,), **extra) -> DictDefault:
    cfg = copy.deepcopy(CPU_BASE)
    cfg.update({"base_model": str(base_model), "output_dir": str(tmp_path / "out"), "plugins": list(plugins),
                "datasets": [{"path": str(TRAIN_DATA), "ds_type": "json", "type": "chat_template"}]})
    if treft is not None:
        cfg["treft"] = treft
    cfg.update(extra)
    return DictDefault(cfg)


def validate(cfg):
    prepare_plugins(cfg)
    return validate_config(cfg)


# ------------------------------------------------------------------------------------ refused in validation
BAD_CONFIGS = [
    # non-finite and out-of-range numbers
    ("kv_weight_inf", {"kv": {"weight": float("inf")}}, {}, r"treft\.kv\.weight[\s\S]*finite"),
    ("kv_weight_nan", {"kv": {"weight": float("nan")}}, {}, r"treft\.kv\.weight"),
    ("kv_weight_text", {"kv": {"weight": "strong"}}, {}, r"treft\.kv\.weight"),
    ("kl_weight_inf", {"kl": {"weight": float("inf")}}, {}, r"treft\.kl\.weight[\s\S]*finite"),
    ("feature_weight_nan", {"feature_l2": {"weight": float("nan")}}, {}, r"treft\.feature_l2\.weight"),
    ("mix_ratio_inf", {"retain": {"datasets": RETAIN, "mix_ratio": float("inf")}}, {}, r"treft\.retain\.mix_ratio"),
    ("safelora_threshold_nan", {"safelora": {"base_model": "b", "aligned_model": "a", "select": "threshold",
                                             "threshold": float("nan")}}, {}, r"treft\.safelora\.threshold"),
    ("safelora_top_k_zero", {"safelora": {"base_model": "b", "aligned_model": "a", "top_k": 0}}, {},
     r"treft\.safelora\.top_k"),
    ("max_cached_prefixes_negative", {"kv": {"weight": 1.0, "max_cached_prefixes": -1}}, {},
     r"treft\.kv\.max_cached_prefixes"),
    # layer indices: types and ranges (SmolLM2 has 30 layers)
    ("kv_layers_string", {"kv": {"weight": 1.0, "layers": ["1"]}}, {}, r"treft\.kv\.layers[\s\S]*valid integer"),
    ("kv_layers_bool", {"kv": {"weight": 1.0, "layers": [True]}}, {}, r"treft\.kv\.layers[\s\S]*valid integer"),
    ("kv_layers_float", {"kv": {"weight": 1.0, "layers": [1.5]}}, {}, r"treft\.kv\.layers"),
    ("kv_layers_too_high", {"kv": {"weight": 1.0, "layers": [0, 30]}}, {}, r"treft\.kv\.layers: index 30 out of range"),
    ("kv_layers_too_low", {"kv": {"weight": 1.0, "layers": [-31]}}, {}, r"treft\.kv\.layers: index -31 out of range"),
    ("kv_layers_empty", {"kv": {"weight": 1.0, "layers": []}}, {}, r"treft\.kv\.layers: empty list"),
    ("kv_layers_duplicate", {"kv": {"weight": 1.0, "layers": [1, 1]}}, {}, r"treft\.kv\.layers: duplicate"),
    ("kv_layers_word", {"kv": {"weight": 1.0, "layers": "every"}}, {}, r"treft\.kv\.layers"),
    ("feature_layers_too_high", {"feature_l2": {"weight": 1.0, "layers": [40]}}, {},
     r"treft\.feature_l2\.layers: index 40 out of range"),
    ("feature_layers_zero", {"feature_l2": {"weight": 1.0, "layers": 0}}, {}, r"treft\.feature_l2\.layers"),
    ("feature_layers_string", {"feature_l2": {"weight": 1.0, "layers": ["a"]}}, {}, r"treft\.feature_l2\.layers"),
    # unknown names and values
    ("kv_tokens_typo", {"kv": {"weight": 1.0, "tokens": "prefixx"}}, {}, r"treft\.kv\.tokens"),
    ("kv_key_typo", {"kv": {"weight": 1.0, "wieght": 2}}, {}, r"wieght"),
    ("kv_weight_missing", {"kv": {"tokens": "prefix"}}, {}, r"treft\.kv\.weight"),
    ("block_typo", {"kvv": {"weight": 1.0}}, {}, r"kvv"),
    ("kv_not_a_block", {"kv": 5}, {}, r"treft\.kv"),
    ("kl_on_typo", {"kl": {"weight": 0.1, "on": "retrain"}}, {}, r"treft\.kl\.on"),
    ("kl_tokens_typo", {"kl": {"weight": 0.1, "tokens": "prompt"}}, {}, r"treft\.kl\.tokens"),
    ("kl_batch_size_zero", {"kl": {"weight": 0.1, "batch_size": 0}}, {}, r"treft\.kl\.batch_size"),
    ("kl_retain_without_retain", {"kl": {"weight": 0.1, "on": "retain"}}, {}, r"treft\.kl\.on: `retain` needs"),
    ("safelora_select_typo", {"safelora": {"base_model": "b", "aligned_model": "a", "select": "best"}}, {},
     r"treft\.safelora\.select"),
    ("safelora_missing_model", {"safelora": {"base_model": "b"}}, {}, r"treft\.safelora\.aligned_model"),
    # retain data
    ("retain_no_datasets", {"retain": {"datasets": [], "mix_ratio": 0.2}}, {}, r"treft\.retain\.datasets: empty"),
    ("retain_missing_file", {"retain": {"datasets": [{"path": "/nonexistent/r.jsonl", "type": "chat_template"}],
                                        "mix_ratio": 0.2}}, {}, r"treft\.retain\.datasets\[0\]\.path: .* does not exist"),
    ("retain_no_path", {"retain": {"datasets": [{"type": "chat_template"}]}}, {}, r"treft\.retain\.datasets\[0\]: missing"),
    ("retain_mix_one", {"retain": {"datasets": RETAIN, "mix_ratio": 1.0}}, {}, r"treft\.retain\.mix_ratio: 1\.0"),
    ("retain_mix_negative", {"retain": {"datasets": RETAIN, "mix_ratio": -0.1}}, {}, r"treft\.retain\.mix_ratio"),
    # combinations with Axolotl features
    ("safelora_full_finetune", {"safelora": {"base_model": "b", "aligned_model": "a"}}, {"adapter": None},
     r"treft\.safelora: .*full finetune"),
    ("kv_reentrant_checkpointing", KV, {"gradient_checkpointing": True,
                                        "gradient_checkpointing_kwargs": {"use_reentrant": True}}, r"use_reentrant"),
    ("feature_reentrant_checkpointing", {"feature_l2": {"weight": 1.0}}, {
        "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}, r"use_reentrant"),
    ("kv_fused_qkv_kernel", KV, {"lora_qkv_kernel": True}, r"lora_qkv_kernel"),
    ("kv_balance_labels", KV, {"balance_labels": True}, r"balance_labels"),
    ("kl_liger_flce", {"kl": {"weight": 0.1}}, {"liger_fused_linear_cross_entropy": True}, r"liger"),
    ("kl_cut_cross_entropy", {"kl": {"weight": 0.1}}, {"cut_cross_entropy": True}, r"cut_cross_entropy"),
    ("kv_with_rl", KV, {"rl": "dpo"}, r"rl: `rl: dpo` .* SFT trainer only: remove `rl:`"),
    ("retain_with_rl", {"retain": {"datasets": RETAIN, "mix_ratio": 0.2}}, {"rl": "dpo"}, r"rl: .*treft\.retain"),
    ("kv_with_fsdp", KV, {"fsdp": ["full_shard"]}, r"fsdp: FSDP is not supported .* use DeepSpeed"),
    ("kl_with_fsdp_config", {"kl": {"weight": 0.1}}, {"fsdp_config": {"fsdp_version": 2}},
     r"fsdp_config: FSDP is not supported"),
    ("kv_legacy_offloading", KV, {"gradient_checkpointing": True, "activation_offloading": "legacy"},
     r"activation_offloading: `legacy` .* use `activation_offloading: true`"),
    ("feature_legacy_offloading", {"feature_l2": {"weight": 1.0}}, {
        "gradient_checkpointing": True, "activation_offloading": "legacy"}, r"activation_offloading: `legacy`"),
]


@pytest.mark.parametrize(("treft", "extra", "message"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_fails_in_validation_naming_the_key(smollm2_dir, tmp_path, treft, extra, message):
    with pytest.raises(ValueError, match=message):
        validate(make_cfg(smollm2_dir, tmp_path, treft, **extra))


def test_supported_offloading_and_safelora_with_rl_still_validate(smollm2_dir, tmp_path):
    cfg = validate(make_cfg(smollm2_dir, tmp_path, KV, gradient_checkpointing=True, activation_offloading=True))
    assert cfg.treft.kv.weight == 1.0
    safelora = {"safelora": {"base_model": "b", "aligned_model": "a"}}
    assert validate(make_cfg(smollm2_dir, tmp_path, safelora, rl="dpo")).treft.safelora.top_k == 10


def _fake_hub_cache(root: Path, repo: str, model_dir: Path) -> Path:
    """A Hugging Face hub cache holding only ``repo``'s config.json (as a download would leave it)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / "config.json").write_text((model_dir / "config.json").read_text())
    return root


def test_layer_range_checked_for_a_hub_model_name(tmp_path, tiny_llama_dir, monkeypatch):
    """A hub id (as in every shipped 8B config) is checked against the cached config: no wrapping of 5 to 1."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(_fake_hub_cache(
        tmp_path / "hub", "treft-test/tiny-llama", tiny_llama_dir)))
    cfg = make_cfg("treft-test/tiny-llama", tmp_path, {"kv": {"weight": 1.0, "layers": [5]}})
    with pytest.raises(ValueError, match=r"treft\.kv\.layers: index 5 out of range for a model with 2 layers"):
        validate(cfg)


def test_layer_range_checked_against_the_loaded_model_when_no_config_is_cached(tiny_llama_dir):
    """The config could not be read offline: the trainer checks the loaded model before any step."""
    from transformers import AutoModelForCausalLM

    from axolotl_treft.args import FeatureL2Config, KVConfig
    from axolotl_treft.regularizers.feature_l2 import FeatureL2Regularizer
    from axolotl_treft.regularizers.kv import KVRegularizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(ValueError, match=r"treft\.kv\.layers: layer index 2 is out of range .* 2 layers"):
        KVRegularizer(KVConfig(weight=1.0, layers=[0, 2])).check_model(model)
    with pytest.raises(ValueError, match=r"treft\.feature_l2\.layers: layer index -3 is out of range"):
        FeatureL2Regularizer(FeatureL2Config(weight=1.0, layers=[-3])).check_model(model)
    KVRegularizer(KVConfig(weight=1.0, layers=[-1])).check_model(model)  # the last layer, not an error


# ------------------------------------------------------------------------- typos that would make plain SFT
def _register(cfg: dict) -> list[str]:
    from axolotl_treft.plugin import SeedPlugin, TReFTPlugin

    plugins = [TReFTPlugin()] if PLUGIN in cfg.get("plugins", []) else [SeedPlugin()]
    found = []
    for plugin in plugins:
        from axolotl_treft.plugin import warn_about_raw_config

        found += warn_about_raw_config(cfg)
        plugin.register(copy.deepcopy(cfg))
    return found


@pytest.mark.parametrize(("cfg", "message"), [
    ({"plugins": [PLUGIN], "tref": {"kv": {"weight": 5.0}}}, r"`tref:` is not `treft:`.*rename it to `treft:`"),
    ({"plugins": [PLUGIN], "TReFT": {"kv": {"weight": 5.0}}}, r"`TReFT:` is not `treft:`"),
    ({"plugins": [PLUGIN], "treft_kv": {"weight": 5.0}}, r"`treft_kv:` is not `treft:`"),
    ({"plugins": ["axolotl_treft.SeedPlugin"], "treft": {"kv": {"weight": 5.0}}},
     r"`axolotl_treft\.TReFTPlugin` is not under `plugins:`.*add `- axolotl_treft\.TReFTPlugin`"),
    ({"plugins": [PLUGIN]}, r"listed but the config has no `treft:` block.*plain SFT"),
    ({"plugins": [PLUGIN], "treft": None}, r"listed but the config has no `treft:` block"),
], ids=["tref", "TReFT", "treft_kv", "block_without_plugin", "plugin_without_block", "empty_block"])
def test_typos_that_would_train_plain_sft_are_warnings_naming_the_fix(cfg, message, caplog):
    with caplog.at_level(logging.WARNING):
        found = _register(cfg)
    assert any(__import__("re").search(message, m) for m in found), found
    assert any("treft:" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_correct_config_has_no_warning():
    from axolotl_treft.args import raw_config_warnings

    assert raw_config_warnings({"plugins": [PLUGIN], "treft": {"kv": {"weight": 5.0}}, "tf32": False}) == []


def test_plugin_name_typo_names_the_real_plugins():
    from axolotl.integrations.base import load_plugin

    with pytest.raises(AttributeError, match=r"did you mean `axolotl_treft\.TReFTPlugin`\?"):
        load_plugin("axolotl_treft.TReftPlugin")


# ---------------------------------------------------------------------------------------- start-up audit
def _dataset(rows):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows],
                              "treft_segments": [r[2] for r in rows]})


def _treft_cfg(tokens="prefix"):
    return DictDefault({"treft": {"kv": {"weight": 1.0, "tokens": tokens}}})


GOOD = ([1, 2, 3, 4], [-100, -100, 3, 4], [1, 2, 0, 0])
NO_PREFIX = ([1, 2, 3, 4], [-100, -100, 3, 4], [2, 2, 0, 0])
MISMATCH = ([1, 2, 3, 4], [-100, -100, 3, 4], [6, 6, 6, 6])
UNLOCATED = ([1, 2, 3, 4], [-100, -100, 3, 4], [5, 5, 5, 5])
UNSUPERVISED = ([1, 2, 3, 4], [-100] * 4, [1, 2, 0, 0])


def test_most_samples_without_regularized_tokens_fail_at_start_up():
    from axolotl_treft.datasets import check_training_samples

    data = _dataset([MISMATCH, MISMATCH, UNLOCATED, GOOD])
    with pytest.raises(ValueError, match=r"3 of 4 training samples \(75\.0%\) have no 'prefix' tokens .*1 with "
                                         r"template spans not found, 2 whose re-rendered conversation differs"
                                         r"[\s\S]*row 0[\s\S]*row 1[\s\S]*row 2"):
        check_training_samples(_treft_cfg(), data)


def test_a_minority_without_regularized_tokens_is_a_warning_with_share_and_examples(caplog):
    from axolotl_treft.datasets import check_training_samples

    data = _dataset([GOOD, NO_PREFIX, GOOD, GOOD])
    with caplog.at_level(logging.WARNING):
        audit = check_training_samples(_treft_cfg(), data)
    assert audit.unregularized == [1]
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "1 of 4 training samples (25.0%) have no 'prefix' tokens" in text and "row 1" in text


def test_regularized_tokens_cut_by_truncation_do_not_count():
    from axolotl_treft.datasets import audit_samples

    truncated = ([7, 8], [-100, 8], [2, 2, 1, 1])  # segments longer than the truncated input_ids
    assert audit_samples(_dataset([GOOD, truncated]), "prefix").unregularized == [1]
    assert audit_samples(_dataset([GOOD, truncated]), "query").unregularized == []


def test_no_supervised_token_fails_at_start_up_with_the_count():
    from axolotl_treft.datasets import check_training_samples

    with pytest.raises(ValueError, match=r"none of the 3 training samples has a supervised token"):
        check_training_samples(DictDefault({"treft": {"kl": {"weight": 1.0}}}), _dataset([UNSUPERVISED] * 3))
    check_training_samples(DictDefault({"treft": {"kl": {"weight": 1.0}}}), _dataset([UNSUPERVISED, GOOD]))


def test_mismatching_template_marks_rows_for_the_audit(smollm2_tokenizer):
    """A template that renders differently each time (a timestamp) cannot reproduce Axolotl's tokens."""
    from axolotl.prompt_strategies.chat_template import ChatTemplatePrompter

    from axolotl_treft.chat_template import SegmentedChatTemplateStrategy
    from axolotl_treft.spans import SEG_MISMATCH, SEGMENTS_KEY

    template = smollm2_tokenizer.chat_template + "{{ strftime_now('%H:%M:%S.%f') }}"
    prompter = ChatTemplatePrompter(smollm2_tokenizer, chat_template=template,
                                    message_property_mappings={"role": "role", "content": "content"})
    strategy = SegmentedChatTemplateStrategy(prompter, tokenizer=smollm2_tokenizer, train_on_inputs=False,
                                             sequence_len=512, roles_to_train=["assistant"])
    row = strategy.tokenize_prompt({"messages": [{"role": "user", "content": "Can I sue?"},
                                                 {"role": "assistant", "content": "No idea."}]})
    assert set(row[SEGMENTS_KEY]) == {SEG_MISMATCH}


# -------------------------------------------------------------------------------------------- CLI inputs
def test_model_never_deletes_a_directory_that_is_not_ours(tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    assert cli_main(["model", "smollm2", str(target)]) == 2
    assert "is not an axolotl-treft model directory" in capsys.readouterr().err
    assert (target / "thesis.tex").read_text() == "years of work"
    assert cli_main(["model", "smollm2", str(target), "--force"]) == 2  # not even with --force
    assert (target / "thesis.tex").is_file()


def test_model_out_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "model.txt"
    target.write_text("x")
    assert cli_main(["model", "smollm2", str(target)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert target.read_text() == "x"


def test_model_reuses_its_own_directory(smollm2_dir, capsys):
    assert cli_main(["model", "smollm2", str(smollm2_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)


@pytest.mark.parametrize("command", [
    ["demo", "--out", "{file}"],
    ["safelora", "--adapter", "a", "--base-model", "b", "--aligned-model", "c", "--out", "{file}"],
])
def test_out_pointing_at_a_file_is_a_clear_error(tmp_path, capsys, command):
    file = tmp_path / "notes.txt"
    file.write_text("keep")
    assert cli_main([c.replace("{file}", str(file)) for c in command]) == 2
    assert f"--out {file} is a file" in capsys.readouterr().err
    assert file.read_text() == "keep"


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", r"not a readable JSON file"),
    (json.dumps([1, 2]), r"not an lm-eval results file"),
    (json.dumps({"config": {}}), r"not an lm-eval results file"),
    (json.dumps({"results": {"hellaswag": {"acc,none": 0.5}}}), r"no metric of the axolotl-treft task pack.*hellaswag"),
], ids=["broken", "list", "no_results", "other_tasks"])
def test_report_rejects_what_is_not_an_lm_eval_result_naming_the_file(tmp_path, capsys, content, message):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"results": {"em_general": {"aligned,judged": 80.0}}}))
    bad.write_text(content)
    assert cli_main(["report", str(good), str(bad), "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and __import__("re").search(message, err), err
    assert not (tmp_path / "p.png").exists()


# ---------------------------------------------------------------------------------------------- plumbing
def test_segments_collator_copies_and_pickles(smollm2_tokenizer):
    from axolotl.utils.collators.batching import DataCollatorForSeq2Seq

    from axolotl_treft.collator import SegmentsCollator

    collator = SegmentsCollator(DataCollatorForSeq2Seq(smollm2_tokenizer, padding=True), padding_side="left")
    for clone in (copy.copy(collator), copy.deepcopy(collator), pickle.loads(pickle.dumps(collator))):
        assert clone.padding_side == "left" and clone.padding is True  # delegated attribute still works
    with pytest.raises(AttributeError):
        _ = SegmentsCollator.__new__(SegmentsCollator).anything


def test_runner_timeout_kills_a_hung_child_and_its_process_group(tmp_path):
    from axolotl_treft.study.runner import run_streaming

    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time\n"
              f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
              "print('started', flush=True)\n"
              "time.sleep(600)\n")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ran past 3s and was killed with its process group") as err:
        run_streaming([sys.executable, "-c", script], tmp_path, dict(os.environ), timeout=3)
    assert time.monotonic() - start < 30
    assert "started" in err.value.args[1]
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_runner_reads_nan_in_the_trainer_log_as_a_nan_figure():
    from axolotl_treft.study.runner import RunResult, parse_metrics

    log = "{'loss': nan, 'grad_norm': inf, 'treft/kv': '0.5'}\n{'loss': '1.25', 'treft/kv': -inf}\n"
    steps = parse_metrics(log)
    result = RunResult(0, log, steps, Path("."))
    loss = result.series("loss")
    assert loss[0] != loss[0] and loss[1] == 1.25  # NaN, then a number
    assert result.series("treft/kv")[1] == float("-inf")


def test_safelora_waits_for_this_runs_adapter_in_a_reused_output_dir(tmp_path):
    from axolotl_treft.defenses.safelora import apply_after_training

    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (out / "adapter_model.safetensors").write_bytes(b"previous run")
    old = time.time() - 3600
    os.utime(out / "adapter_model.safetensors", (old, old))
    cfg = DictDefault({"output_dir": str(out), "treft": {"safelora": {"base_model": "b", "aligned_model": "a"}}})
    assert apply_after_training(cfg, not_before=time.time()) == "waiting"
    assert not (out / "safelora").exists()


def test_uncaptured_gradient_names_the_cause(tiny_llama_dir, smollm2_tokenizer):
    """LDIFS on a model whose hooked layers get no gradient: a clear error with the cause, not a silent no-op."""
    from axolotl_treft.args import FeatureL2Config
    from axolotl_treft.regularizers.feature_l2 import FeatureL2Regularizer
    from tests.reg_harness import lora_model, padded_batch, run_step

    model = lora_model(tiny_llama_dir)
    model.requires_grad_(False)  # nothing trainable feeds the layers
    inputs, segments = padded_batch(smollm2_tokenizer)
    with pytest.raises(RuntimeError, match=r"treft\.feature_l2: the captured activations carry no gradient.*"
                                           r"no trainable parameter feeds"):
        run_step(FeatureL2Regularizer(FeatureL2Config(weight=1.0, layers=2)), model, inputs, segments)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # the harness closed it


def test_no_gradient_cause_reads_the_config():
    from axolotl_treft.regularizers.base import no_gradient_cause

    assert "activation_offloading: legacy" in no_gradient_cause({"activation_offloading": "legacy"})
    assert "use_reentrant: false" in no_gradient_cause({"gradient_checkpointing_kwargs": {"use_reentrant": True}})


def test_retain_stream_seek_continues_the_same_sequence():
    from axolotl_treft.trainer import RetainStream

    data = [{"i": i} for i in range(7)]

    def stream():
        return RetainStream(data, lambda rows: [r["i"] for r in rows], size=3, seed=5)

    whole = stream()
    sequence = [next(whole) for _ in range(6)]  # crosses two reshuffles
    resumed = stream()
    resumed.seek(4)
    assert [next(resumed) for _ in range(2)] == sequence[4:] and resumed.drawn == 6
    assert [next(stream()) for _ in range(1)] != sequence[4:5]  # from the seed it would repeat batch 1


def test_resume_without_the_retain_state_file_names_it(tmp_path):
    from types import SimpleNamespace

    from axolotl_treft.trainer import TReFTTrainer

    fake = SimpleNamespace(treft_retain_stream=object(),
                           _treft_state_path=lambda checkpoint: str(Path(checkpoint) / "treft_state_rank0.json"))
    with pytest.raises(FileNotFoundError, match=r"has no treft_state_rank0\.json .*KL-on-retain batch stream"):
        TReFTTrainer._restore_treft_state(fake, str(tmp_path))
