"""The plugin under the hook orders of the Axolotl versions it supports (0.19 installed; 0.20/0.21 replayed).

Python 3.12 (needed by Axolotl 0.21) cannot be installed here, so the 0.21 order is driven on 0.19 by the
test plugin ``tests.hook_order.Axolotl021HookOrder``: the builder sets ``axolotl_cfg`` and calls
``post_set_axolotl_cfg`` itself, before the plugin's ``post_trainer_create`` (0.21's ``core/builders/causal.py``).
Every regularizer, KL on retain included, must be built exactly once, after the retain set is attached.
"""

from __future__ import annotations

import pytest

from tests.axolotl_runner import REPO, run_axolotl

pytestmark = pytest.mark.slow
PLUGINS = ["tests.hook_order.Axolotl021HookOrder", "axolotl_treft.TReFTPlugin"]
RETAIN = [{"path": str(REPO / "axolotl_treft" / "data" / "retain_general.jsonl"), "ds_type": "json",
           "type": "chat_template", "field_messages": "messages"}]
BUILT = "treft: regularizers active: "


@pytest.mark.parametrize("treft, terms", [
    ({"kv": {"weight": 5.0, "tokens": "postfix"}, "kl": {"weight": 0.5, "on": "retain", "batch_size": 2},
      "feature_l2": {"weight": 1.0, "layers": 2}, "retain": {"datasets": RETAIN}}, ["kv", "kl", "feature_l2"]),
    ({"kv": {"weight": 5.0, "tokens": "prefix"}, "kl": {"weight": 0.5, "on": "train"}}, ["kv", "kl"]),
], ids=["kv-postfix+kl-retain+ldifs", "kv-prefix+kl-train"])
def test_axolotl_021_hook_order(tmp_path, tiny_llama_dir, treft, terms, monkeypatch):
    hook_log = tmp_path / "hooks.log"
    monkeypatch.setenv("TREFT_HOOK_LOG", str(hook_log))
    run = run_axolotl(tmp_path, tiny_llama_dir, {"plugins": PLUGINS, "treft": treft, "max_steps": 2,
                                                 "micro_batch_size": 2})
    assert run.returncode == 0, run.log[-4000:]
    assert "Plugin loaded successfully: tests.hook_order.Axolotl021HookOrder" in run.log
    assert "Plugin loaded successfully: axolotl_treft.TReFTPlugin" in run.log
    # 0.21's order really happened: the builder's calls first, then the plugin hook, once
    assert hook_log.read_text().split() == [
        "builder:set_axolotl_cfg", "builder:post_set_axolotl_cfg", "plugin:configure_treft",
    ]
    assert run.log.count(BUILT) == 1
    assert f"{BUILT}{terms}" in run.log
    for term in terms:
        assert len(run.series(f"treft/{term}")) == 2, term
