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
    ],
)
def test_bad_input_names_the_key(smollm2_dir, tmp_path, treft, extra, message):
    with pytest.raises(ValueError, match=message):
        validate(make_cfg(smollm2_dir, tmp_path, treft, **extra))


def test_gradient_checkpointing_defaults_to_non_reentrant(smollm2_dir, tmp_path):
    cfg = validate(make_cfg(smollm2_dir, tmp_path, {"kv": {"weight": 1.0}}, gradient_checkpointing=True))
    assert cfg.gradient_checkpointing_kwargs["use_reentrant"] is False
