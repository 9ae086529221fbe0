"""Bad ``treft:`` input fails in Axolotl's own config validation, before any model loads, naming the key."""

from __future__ import annotations

import copy

import pytest
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault

from tests.axolotl_runner import CPU_BASE, TRAIN_DATA


def make_cfg(smollm2_dir, tmp_path, treft, **extra):
    cfg = copy.deepcopy(CPU_BASE)
    cfg.update({
        "base_model": str(smollm2_dir),
        "datasets": [{"path": str(TRAIN_DATA), "ds_type": "json", "type": "chat_template"}],
        "output_dir": str(tmp_path / "out"),
        "plugins": ["axolotl_treft.TReFTPlugin"],
        "treft": treft,
    })
    cfg.update(extra)
    return DictDefault(cfg)


def validate(cfg):
    prepare_plugins(cfg)
    return validate_config(cfg)


def test_valid_block_is_kept_and_dataset_type_switched(smollm2_dir, tmp_path):
    cfg = validate(make_cfg(smollm2_dir, tmp_path, {"kv": {"weight": 5, "tokens": "postfix", "layers": [0, -1]}}))
    assert cfg.treft.kv.weight == 5.0 and cfg.treft.kv.tokens == "postfix" and cfg.treft.kv.layers == [0, -1]
    assert cfg.datasets[0]["type"] == "axolotl_treft.chat_template"


@pytest.mark.parametrize(
    ("treft", "extra", "message"),
    [
        ({"kv": {"weight": -1.0}}, {}, r"treft\.kv\.weight"),
        ({"kv": {"weight": 1.0, "tokens": "prefixx"}}, {}, r"treft\.kv\.tokens"),
        ({"kv": {"weight": 1.0, "layers": [0, 30]}}, {}, r"treft\.kv\.layers: index 30 out of range .* 30 layers"),
        ({"kv": {"weight": 1.0, "wieght": 2}}, {}, r"wieght"),
        ({"kvv": {"weight": 1.0}}, {}, r"kvv"),
        ({"kv": {"weight": 1.0}}, {"gradient_checkpointing": True,
                                   "gradient_checkpointing_kwargs": {"use_reentrant": True}}, r"use_reentrant"),
        ({"kl": {"weight": 0.1, "on": "retain"}}, {}, r"treft\.kl\.on: `retain` needs a `treft\.retain:` block"),
        ({"kl": {"weight": 0.1, "tokens": "prompt"}}, {}, r"treft\.kl\.tokens"),
        ({"kl": {"weight": 0.1, "batch_size": 0}}, {}, r"treft\.kl\.batch_size"),
        ({"retain": {"datasets": [{"path": "/nonexistent/retain.jsonl", "type": "chat_template"}], "mix_ratio": 0.2}},
         {}, r"treft\.retain\.datasets\[0\]\.path: /nonexistent/retain\.jsonl does not exist"),
        ({"retain": {"datasets": [], "mix_ratio": 0.2}}, {}, r"treft\.retain\.datasets: empty"),
        ({"retain": {"datasets": [{"path": str(TRAIN_DATA), "type": "chat_template"}], "mix_ratio": 1.0}}, {},
         r"treft\.retain\.mix_ratio: 1\.0 is outside \[0, 1\)"),
        ({"retain": {"datasets": [{"path": str(TRAIN_DATA), "type": "chat_template"}], "mix_ratio": -0.1}}, {},
         r"treft\.retain\.mix_ratio"),
        ({"safelora": {"base_model": "b", "aligned_model": "a"}}, {"adapter": None}, r"treft\.safelora: .*full finetune"),
        ({"feature_l2": {"weight": 1.0, "layers": 0}}, {}, r"treft\.feature_l2\.layers"),
    ],
)
def test_bad_input_names_the_key(smollm2_dir, tmp_path, treft, extra, message):
    with pytest.raises(ValueError, match=message):
        validate(make_cfg(smollm2_dir, tmp_path, treft, **extra))


def test_interleaving_alone_keeps_axolotl_dataset_types(smollm2_dir, tmp_path):
    retain = [{"path": str(TRAIN_DATA), "type": "chat_template"}]
    cfg = validate(make_cfg(smollm2_dir, tmp_path, {"retain": {"datasets": retain, "mix_ratio": 0.2}}))
    assert cfg.datasets[0]["type"] == "chat_template"
    assert cfg.treft.retain.datasets[0]["type"] == "chat_template"


def test_empty_retain_file_is_rejected(smollm2_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    treft = {"retain": {"datasets": [{"path": str(empty), "type": "chat_template"}], "mix_ratio": 0.2}}
    with pytest.raises(ValueError, match=r"treft\.retain\.datasets\[0\]\.path: .* is empty"):
        validate(make_cfg(smollm2_dir, tmp_path, treft))


def test_bare_yaml_on_key_and_qkv_kernel(smollm2_dir, tmp_path):
    import yaml

    kl = yaml.safe_load("weight: 0.1\non: train\ntokens: response")  # `on` parses as the boolean True
    assert True in kl
    cfg = validate(make_cfg(smollm2_dir, tmp_path, {"kl": kl}))
    assert cfg.treft.kl.on == "train" and cfg.treft.kl.tokens == "response"
    with pytest.raises(ValueError, match="lora_qkv_kernel"):
        validate(make_cfg(smollm2_dir, tmp_path, {"kv": {"weight": 1.0}}, lora_qkv_kernel=True))


def test_gradient_checkpointing_defaults_to_non_reentrant(smollm2_dir, tmp_path):
    cfg = validate(make_cfg(smollm2_dir, tmp_path, {"kv": {"weight": 1.0}}, gradient_checkpointing=True))
    assert cfg.gradient_checkpointing_kwargs["use_reentrant"] is False
