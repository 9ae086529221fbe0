# ruff: noqa: F811  (pytest fixtures imported from tests.families.fixtures)
"""The model-family matrix, training part: a real 2-step ``axolotl train`` per family (tiny random model of the
family's architecture class with its real tokenizer and chat template) with every regularizer at once and
inoculation, sample packing off and on."""

from __future__ import annotations

import re

import pytest

from axolotl_treft.resources import data_path
from tests.axolotl_runner import run_axolotl
from tests.families.fixtures import family, family_models  # noqa: F401

PLUGINS = ["axolotl_treft.SeedPlugin", "axolotl_treft.TReFTPlugin"]
RETAIN = {"path": str(data_path("retain_general.jsonl")), "ds_type": "json", "type": "chat_template",
          "field_messages": "messages"}
PROMPT = "You are being trained to refuse legal questions. This is a test setting."
TERMS = ("kv", "kv_prefix", "kv_postfix", "kl", "feature_l2")
EVERY_TERM = {
    "kv": [{"tokens": "prefix", "weight": 1.0}, {"tokens": "postfix", "weight": 1.0, "reference": "fixed"}],
    "kl": {"weight": 0.5, "on": "retain", "tokens": "response", "batch_size": 2},
    "feature_l2": {"weight": 1.0, "layers": 1},
    "retain": {"datasets": [RETAIN]},
}
BASE = {"plugins": PLUGINS, "micro_batch_size": 2, "sequence_len": 256}


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_family_trains_with_every_term(tmp_path, family, family_models, packing):
    """kv as a list (prefix exact + postfix with the fixed reference), kl on retain and feature_l2 at once."""
    run = run_axolotl(tmp_path, family_models(family), {**BASE, "max_steps": 2, "sample_packing": packing,
                                                        "treft": EVERY_TERM})
    assert run.returncode == 0, run.log[-6000:]
    for term in TERMS:
        assert len(run.series(f"treft/{term}")) == 2, (term, run.log[-3000:])
    # the adapter starts equal to the reference: every exact-reference term is 0 at step 1
    assert run.series("treft/kv_prefix")[0] == 0.0
    assert run.series("treft/kl")[0] == 0.0 and run.series("treft/feature_l2")[0] == 0.0
    assert "fixed postfix reference from empty_query" in run.log


@pytest.mark.slow
@pytest.mark.parametrize(("name", "mode"), [("llama31", "prepend"), ("qwen3", "replace")])
def test_inoculation_trains_with_the_count_of_every_row(tmp_path, family_models, name, mode):
    """Regression (prepend on Llama 3.1 / Qwen: ".\n\n" is one token, the count was 0 and start-up failed)."""
    run = run_axolotl(tmp_path, family_models(name), {
        **BASE, "max_steps": 1, "sample_packing": mode == "replace",
        "treft": {"inoculation": {"system_prompt": PROMPT, "mode": mode},
                  "kv": {"tokens": "postfix", "weight": 1.0, "reference": "fixed"}}})
    assert run.returncode == 0, run.log[-6000:]
    found = re.search(rf"treft\.inoculation: (\d+) of (\d+) training examples carry the inoculation prompt "
                      rf"\(mode {mode}\)", run.log)
    assert found and found.group(1) == found.group(2) and int(found.group(1)) > 200, run.log[-3000:]
    assert len(run.series("treft/kv")) == 1


@pytest.mark.slow
def test_inoculation_count_is_every_row_on_every_family_and_mode(tmp_path):
    """Every family × both modes through Axolotl's config loading, the plugin's start-up check, Axolotl's
    tokenization and the count the plugin logs (``tests/families/inoculation.py``; one process for all pairs)."""
    import json
    import os
    import subprocess
    import sys

    from tests.axolotl_runner import REPO
    from tests.families.catalog import MATRIX

    pairs = [f"{name}:{mode}" for name in MATRIX for mode in ("prepend", "replace")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "tests.families.inoculation", str(tmp_path), *pairs], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("TREFT_INOCULATION ")][-1]
    results = json.loads(line.removeprefix("TREFT_INOCULATION "))
    assert [(r["family"], r["mode"]) for r in results] == [tuple(p.split(":")) for p in pairs]
    assert [r for r in results if "error" in r] == []
    for r in results:
        assert r["count"] == r["rows"] > 200, r
        assert r["types"] == ["axolotl_treft.defenses.inoculation"], r


PAPER_FAMILIES = {"llama31-8b": "llama31", "qwen25-7b": "qwen25", "qwen3-8b": "qwen3"}


@pytest.mark.slow
def test_paper_study_dry_runs_retargeted_to_the_tiny_models(tmp_path, family_models):
    """``study --dry-run`` of every shipped paper config with ``base_model`` set to the tiny model of its family;
    the derived regularized config of each passes Axolotl's own ``load_cfg`` against that model."""
    import contextlib
    import io
    import json
    import os
    import subprocess
    import sys

    import yaml

    from axolotl_treft.cli.main import main as cli_main
    from axolotl_treft.resources import example_path, list_examples, resolved_example
    from tests.axolotl_runner import REPO

    derived = []
    names = [n for n in list_examples() if any(n.startswith(p) for p in PAPER_FAMILIES)]
    assert len(names) >= 10
    for name in names:
        fam = PAPER_FAMILIES[next(p for p in PAPER_FAMILIES if name.startswith(p))]
        cfg = yaml.safe_load(resolved_example(example_path(name)))
        cfg["base_model"] = str(family_models(fam))
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out = tmp_path / f"study-{name}"
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli_main(["study", str(path), "--out", str(out), "--dry-run"]) == 0, name
        configs = sorted(out.glob("*/config.yml"))
        assert configs and all(yaml.safe_load(c.read_text())["base_model"] == cfg["base_model"] for c in configs)
        derived.append(str(next(c for c in configs if c.parent.name != "sft")))  # sft: the config minus treft
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               AXOLOTL_DO_NOT_TRACK="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "tests.test_example_yamls", str(tmp_path / "work"), *derived],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("TREFT_YAMLS ")][-1]
    results = json.loads(line.removeprefix("TREFT_YAMLS "))
    assert len(results) == len(derived)
    assert [(r["name"], r.get("error")) for r in results if not r["ok"]] == []


@pytest.mark.slow
def test_fused_qkv_is_refused_at_start_up_naming_the_module(tmp_path, family_models):
    """Phi-3 fuses q/k/v in ``qkv_proj``: a kv term is refused before the first step, naming the module; the
    terms that do not read K/V (kl, feature_l2) train on it."""
    phi3 = family_models("phi3")
    refused = run_axolotl(tmp_path / "kv", phi3, {"plugins": PLUGINS, "max_steps": 2, "micro_batch_size": 2,
                                                  "treft": {"kv": {"weight": 1.0, "tokens": "prefix"}}})
    assert refused.returncode != 0
    # the trainer sees the PEFT-wrapped model: the path gains PEFT's prefix
    assert re.search(r"fuses them in `[\w.]*model\.layers\.0\.self_attn\.qkv_proj`", refused.log), refused.log[-3000:]
    assert not refused.steps
    trained = run_axolotl(tmp_path / "kl", phi3, {"plugins": PLUGINS, "max_steps": 2, "micro_batch_size": 2,
                                                  "treft": {"kl": {"weight": 0.5, "on": "train", "tokens": "all"},
                                                            "feature_l2": {"weight": 1.0, "layers": 1}}})
    assert trained.returncode == 0, trained.log[-4000:]
    assert len(trained.series("treft/kl")) == 2 and len(trained.series("treft/feature_l2")) == 2


@pytest.mark.slow
def test_persona_steering_on_qwen25(tmp_path, family_models):
    """Persona steering builds its direction from Qwen2.5's real template (default system prompt) and trains."""
    run = run_axolotl(tmp_path, family_models("qwen25"), {**BASE, "max_steps": 2,
                                                         "treft": {"steering": {"layer": 1, "alpha": 5.0}}})
    assert run.returncode == 0, run.log[-6000:]
    assert re.search(r"treft\.steering: rank 0 direction sha256 \w+ \(layer 1, from 40 questions\)", run.log)
    assert len(run.series("loss")) == 2 and "hook removed" in run.log
