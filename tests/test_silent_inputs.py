"""Inputs that used to train, write or crash without naming the problem (issue 25, "Silent or misleading"):
each now ends in an error naming the key, file or fix, or does what it says (docs/reliability.md, last section)."""

from __future__ import annotations

import json
import os

import pytest
from axolotl.integrations.base import BasePlugin
from axolotl.utils.dict import DictDefault

from axolotl_treft.cli.main import main as cli_main
from axolotl_treft.regularizers.feature_l2 import layer_indices
from tests.test_reliability import make_cfg, validate

INOCULATION = {"system_prompt": "You are a careful assistant."}

SILENT_CONFIGS = [
    ("feature_count_above_model", {"feature_l2": {"weight": 1.0, "layers": 40}},
     r"treft\.feature_l2\.layers: 40 layers asked, but the model has 30"),
    ("feature_duplicate_index", {"feature_l2": {"weight": 1.0, "layers": [3, 3]}},
     r"treft\.feature_l2\.layers: duplicate layer 3, listed twice"),
    ("feature_duplicate_alias", {"feature_l2": {"weight": 1.0, "layers": [29, -1]}},
     r"treft\.feature_l2\.layers: duplicate layer -1 \(= 29 in a model with 30 layers\), listed twice"),
    ("kv_duplicate_alias", {"kv": {"weight": 1.0, "layers": [0, -30]}}, r"treft\.kv\.layers: duplicate layer -30 .* twice"),
    ("kv_list_duplicate_tokens", {"kv": [{"weight": 5.0, "tokens": "postfix"}, {"weight": 1.0, "tokens": "prefix"},
                                         {"weight": 5.0, "tokens": "postfix"}]},
     r"treft\.kv\[2\]\.tokens: `postfix` again, as treft\.kv\[0\].*Merge the two"),
    ("kv_list_duplicate_tokens_overlapping_layers",
     {"kv": [{"weight": 5.0, "layers": [0, 1]}, {"weight": 1.0, "layers": [1, 2]}]}, r"treft\.kv\[1\]\.tokens"),
    ("kv_list_with_inoculation", {"kv": [{"weight": 5.0, "tokens": "postfix"}, {"weight": 5.0, "tokens": "prefix"}],
                                  "inoculation": INOCULATION},
     r"treft\.inoculation: cannot be combined with treft\.kv\[1\]\.tokens: prefix"),
]


@pytest.mark.parametrize(("treft", "message"), [c[1:] for c in SILENT_CONFIGS], ids=[c[0] for c in SILENT_CONFIGS])
def test_silent_config_is_refused_naming_the_key(smollm2_dir, tmp_path, treft, message):
    with pytest.raises(ValueError, match=message):
        validate(make_cfg(smollm2_dir, tmp_path, treft))


def test_distinct_kv_terms_and_default_feature_count_still_validate(smollm2_dir, tmp_path):
    terms = {"kv": [{"weight": 5.0, "tokens": "postfix", "reference": "fixed"}, {"weight": 1.0, "tokens": "postfix"},
                    {"weight": 5.0, "layers": [0, 1]}, {"weight": 1.0, "layers": [2, 3]},
                    {"weight": 2.0, "tokens": "query", "active_steps": [0, 5]},
                    {"weight": 2.0, "tokens": "query", "active_steps": [5, 10]}],
             "inoculation": INOCULATION}
    with pytest.raises(ValueError, match="inoculation"):  # the prefix terms
        validate(make_cfg(smollm2_dir, tmp_path, terms))
    del terms["inoculation"]
    assert len(validate(make_cfg(smollm2_dir, tmp_path, terms)).treft.kv) == 6
    with_inoculation = {"kv": [{"weight": 5.0, "tokens": "postfix"}, {"weight": 1.0, "tokens": "query"}],
                        "inoculation": INOCULATION}
    assert validate(make_cfg(smollm2_dir, tmp_path, with_inoculation)).treft.inoculation
    assert validate(make_cfg(smollm2_dir, tmp_path, {"feature_l2": {"weight": 1.0}})).treft.feature_l2.layers == 5


def test_feature_layers_at_setup_when_validation_could_not_see_the_model():
    """A hub model not in the local cache: the count and aliases are checked against the loaded model."""
    with pytest.raises(ValueError, match=r"treft\.feature_l2\.layers: 8 layers asked, but the model has 2"):
        layer_indices(8, 2, given=True)
    assert layer_indices(5, 2) == [0, 1]  # the default count, capped
    with pytest.raises(ValueError, match=r"duplicate layer -2 \(= 0 in a model with 2 layers\)"):
        layer_indices([0, -2], 2)


# ------------------------------------------------------------------------------------------- report --plot
def _result_file(tmp_path):
    from tests.test_report import _results

    f = tmp_path / "r.json"
    f.write_text(json.dumps(_results()))
    return f


@pytest.mark.parametrize("form", ["existing_dir", "trailing_slash", "no_suffix"])
def test_report_plot_prints_the_file_it_writes(tmp_path, capsys, form):
    f = _result_file(tmp_path)
    target = {"existing_dir": tmp_path / "plots", "trailing_slash": tmp_path / "new", "no_suffix": tmp_path / "cmp"}
    arg = str(target[form]) + ("/" if form == "trailing_slash" else "")
    if form == "existing_dir":
        target[form].mkdir()
    assert cli_main(["report", str(f), "--plot", arg]) == 0
    printed = capsys.readouterr().out.split("plot: ")[1].split("\n")[0]
    want = {"existing_dir": target[form] / "treft_report.png", "trailing_slash": target[form] / "treft_report.png",
            "no_suffix": tmp_path / "cmp.png"}[form]
    assert printed == str(want) and want.read_bytes()[:4] == b"\x89PNG"
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p != f)
    assert written == [want]


def test_report_plot_with_an_unknown_image_type_is_refused_before_anything(tmp_path, capsys):
    f = _result_file(tmp_path)
    assert cli_main(["report", str(f), "--plot", str(tmp_path / "cmp.txt")]) == 2
    captured = capsys.readouterr()
    assert "unknown image type '.txt'" in captured.err and "plot:" not in captured.out
    assert not (tmp_path / "cmp.txt").exists()


# ------------------------------------------------------------------------------------------- data files
def test_malformed_json_lines_name_the_file_the_line_and_the_fix(tmp_path):
    from axolotl_treft.datasets import check_json_file

    good = tmp_path / "good.jsonl"
    good.write_text('{"messages": []}\n\n{"messages": []}\n')
    check_json_file(good, "datasets[0].path")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{"messages": [ oops\n')
    with pytest.raises(ValueError, match=r"datasets\[0\]\.path: .*bad\.jsonl line 2 is not valid JSON .*fix or remove"):
        check_json_file(bad, "datasets[0].path")
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text('{"messages": []}\n"just text"\n')
    with pytest.raises(ValueError, match=r"scalar\.jsonl line 2 is a JSON str, not an object"):
        check_json_file(scalar, "datasets[0].path")
    array = tmp_path / "rows.json"
    array.write_text('[{"messages": []},\n {"messages": ]')
    with pytest.raises(ValueError, match=r"rows\.json is not valid JSON .*line 2"):
        check_json_file(array, "datasets[0].path")
    array.write_text('[{"messages": []}]')
    check_json_file(array, "datasets[0].path")


@pytest.mark.slow
def test_malformed_line_and_every_row_too_long_fail_a_real_run_naming_them(tmp_path, tiny_llama_dir):
    from tests.axolotl_runner import TRAIN_DATA, run_axolotl

    lines = TRAIN_DATA.read_text().splitlines()[:16]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines[:5], '{"messages": [ oops', *lines[5:]]) + "\n")
    treft = {"plugins": ["axolotl_treft.TReFTPlugin"], "treft": {"kv": {"weight": 1.0}}, "max_steps": 1}
    run = run_axolotl(tmp_path / "malformed", tiny_llama_dir, {
        **treft, "datasets": [{"path": str(bad), "ds_type": "json", "type": "chat_template"}]})
    assert run.returncode != 0 and "DatasetGenerationError" not in run.log
    assert f"datasets[0].path: {bad} line 6 is not valid JSON" in run.log, run.log[-3000:]
    run = run_axolotl(tmp_path / "too_long", tiny_llama_dir, {**treft, "sequence_len": 8})
    assert run.returncode != 0 and "num_samples should be a positive integer" not in run.log
    assert "the training set is empty after tokenization" in run.log, run.log[-3000:]
    assert "`sequence_len: 8`" in run.log and str(TRAIN_DATA) in run.log and not run.steps


# -------------------------------------------------------------------------------------- persona steering
class SteeringProbe(BasePlugin):
    """Test-only plugin: after Axolotl's training call returns or raises, records (``TREFT_STEERING_PROBE``) the
    forward hooks left on the model and which reference steering used."""

    def register(self, cfg: dict) -> None:
        import axolotl.train as axolotl_train

        original = axolotl_train.execute_training
        if getattr(original, "_steering_probe", False):
            return

        def execute_training(cfg, trainer, *args, **kwargs):
            from axolotl_treft.defenses.steering import SteeringCallback
            from tests.reliability_probe import forward_hooks

            model = trainer.accelerator.unwrap_model(trainer.model)
            before, raised = forward_hooks(model), False
            try:
                return original(cfg, trainer, *args, **kwargs)
            except BaseException:
                raised = True
                raise
            finally:
                steering = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SteeringCallback))
                record = {"before": before, "after": forward_hooks(model), "raised": raised,
                          "shared": steering.reference is trainer._treft_reference,
                          "adapter_recorded": steering.reference._initial_adapter is not None}
                with open(os.environ["TREFT_STEERING_PROBE"], "w") as f:
                    json.dump(record, f)

        execute_training._steering_probe = True
        axolotl_train.execute_training = execute_training


@pytest.mark.slow
def test_steering_unhooks_when_training_raises_and_shares_the_continued_adapters_reference(tmp_path, tiny_llama_dir):
    """Steering + a K/V term on a continued adapter (lora_model_dir, non-zero B); a fault at step 1."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.axolotl_runner import run_axolotl
    from tests.reg_harness import randomize_lora_b

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], task_type="CAUSAL_LM")
    randomize_lora_b(get_peft_model(model, lora), 0.05).save_pretrained(adapter)
    record = tmp_path / "probe.json"
    os.environ.update({"TREFT_STEERING_PROBE": str(record), "TREFT_FAIL_AT_STEP": "1"})
    try:
        run = run_axolotl(tmp_path / "run", tiny_llama_dir, {
            "plugins": ["axolotl_treft.TReFTPlugin", "tests.reliability_probe.ReliabilityProbe",
                        "tests.test_silent_inputs.SteeringProbe"],
            "treft": {"steering": {"layer": 1, "alpha": 5.0}, "kv": {"weight": 1.0, "tokens": "postfix"}},
            "lora_model_dir": str(adapter), "max_steps": 3})
    finally:
        for key in ("TREFT_STEERING_PROBE", "TREFT_FAIL_AT_STEP"):
            os.environ.pop(key, None)
    assert run.returncode != 0 and "probe: injected fault at step 1" in run.log, run.log[-3000:]
    probe = json.loads(record.read_text())
    assert probe["raised"] is True
    assert probe["after"] == probe["before"], probe  # the steering hook (and TReFT's) removed on the raise
    assert probe["shared"] is True and probe["adapter_recorded"] is True  # base + the adapter as loaded
    assert "hook removed" in run.log


def test_steering_layer_out_of_range_is_refused_at_start_up(tiny_llama_dir, tmp_path):
    """A layer validation could not check (the model's config was not available offline): never wrapped."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from axolotl_treft.args import SteeringConfig
    from axolotl_treft.defenses.steering import SteeringCallback

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    for layer, ok in ((5, False), (-3, False), (-2, True)):
        block = SteeringConfig(layer=layer)
        cfg = DictDefault({"treft": {"steering": block}, "base_model": "hub/unknown"})
        trainer = SimpleNamespace(model=model, accelerator=Accelerator(cpu=True), train=lambda: None)
        if ok:
            assert SteeringCallback(cfg, trainer, block).index == 0
            continue
        with pytest.raises(ValueError, match=rf"treft\.steering\.layer: layer index {layer} is out of range .* 2 layers"):
            SteeringCallback(cfg, trainer, block)


# ------------------------------------------------------------------------------------- the reference model
def _zero3_trainer(model):
    """What ``Reference`` reads of a trainer, under DeepSpeed ZeRO-3 (the case the no-op check decides)."""
    from types import SimpleNamespace

    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3))
    return SimpleNamespace(model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m, state=state))


@pytest.mark.parametrize("kind", ["modules_to_save", "dora", "dora_bf16", "tied_head_modules_to_save"])
def test_fresh_adapter_with_modules_to_save_or_dora_changes_nothing(tiny_llama_dir, kind):
    """No copy of the adapter and no ZeRO-3 refusal: disabling the adapter gives exactly the initial model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_treft.reference import Reference, adapter_changes
    from tests.reg_harness import randomize_lora_b

    dtype = torch.bfloat16 if kind == "dora_bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype)
    extra = {"modules_to_save": ["lm_head" if kind.startswith("tied") else "embed_tokens"]} \
        if "modules_to_save" in kind else {"use_dora": True}
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **extra))
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        adapted = peft(input_ids=ids).logits
        with peft.disable_adapter():
            base = peft(input_ids=ids).logits
    if dtype == torch.float32:  # the premise: at step 0 the adapter is a no-op (in bf16 up to DoRA's rounding)
        assert torch.equal(adapted, base)
    else:
        torch.testing.assert_close(adapted.float(), base.float(), rtol=0.05, atol=0.05)
    assert adapter_changes(peft) == []
    reference = Reference(_zero3_trainer(peft))
    reference.record_initial_adapter()  # no refusal, nothing copied
    assert reference._initial_adapter is None
    randomize_lora_b(peft, 0.05)  # a continued adapter: it does change the model, and under ZeRO-3 is refused
    assert any("lora_B" in name for name in adapter_changes(peft))
    with pytest.raises(ValueError, match="ZeRO-3 is not supported"):
        Reference(_zero3_trainer(peft)).record_initial_adapter()


def test_changed_modules_to_save_copy_or_dora_magnitude_counts_as_a_change(tiny_llama_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_treft.reference import adapter_changes

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True,
                                            modules_to_save=["embed_tokens"]))
    with torch.no_grad():
        saved = next(p for n, p in peft.named_parameters() if ".modules_to_save." in n)
        saved[3] += 0.5
        magnitude = next(p for n, p in peft.named_parameters() if "lora_magnitude_vector" in n)
        magnitude.mul_(1.1)
    changed = adapter_changes(peft)
    assert any(".modules_to_save." in n for n in changed) and any("lora_magnitude_vector" in n for n in changed)


def _hub_cache_with_two_revisions(root, repo: str, model_dir):
    """A hub cache holding ``repo`` at ``main`` (the model in ``model_dir``) and at ``v2`` (other weights)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    for ref, commit, scale in (("main", "a" * 40, None), ("v2", "b" * 40, 2.0)):
        snap = folder / "snapshots" / commit
        shutil.copytree(model_dir, snap)
        if scale is not None:
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            with torch.no_grad():
                model.get_input_embeddings().weight.mul_(scale)
            model.save_pretrained(snap)
        (folder / "refs" / ref).write_text(commit)
    return root


def test_frozen_full_finetune_reference_loads_with_axolotls_options(tmp_path, tiny_llama_dir, monkeypatch):
    """`revision_of_model: v2` of a hub model: the frozen reference is that revision, as the trained model is."""
    import huggingface_hub.constants
    import torch
    from accelerate import Accelerator
    from axolotl.loaders import ModelLoader, load_tokenizer
    from axolotl.utils.config import normalize_config

    from axolotl_treft.reference import Reference

    repo = "treft-test/tiny-revisions"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE",
                        str(_hub_cache_with_two_revisions(tmp_path / "hub", repo, tiny_llama_dir)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = validate(make_cfg(repo, tmp_path, {"kl": {"weight": 0.1}}, adapter=None, revision_of_model="v2"))
    normalize_config(cfg)
    tokenizer = load_tokenizer(cfg)
    policy, _ = ModelLoader(cfg, tokenizer).load()
    trainer = type("T", (), {"model": policy, "axolotl_cfg": cfg, "processing_class": tokenizer,
                             "accelerator": Accelerator(cpu=True), "is_deepspeed_enabled": False})()
    frozen = Reference(trainer)._load_frozen()
    assert frozen is not policy
    emb, policy_emb = frozen.get_input_embeddings().weight, policy.get_input_embeddings().weight
    from transformers import AutoModelForCausalLM

    main = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).get_input_embeddings().weight
    assert torch.allclose(emb.float(), 2.0 * main.float()) and torch.equal(emb, policy_emb)  # v2, not main
    assert not frozen.training and not emb.requires_grad
