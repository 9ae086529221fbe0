"""The README's main job (the piggyback study), end to end in its quick mode: real trainings, real lm_eval."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from axolotl_treft.study.demo import (
    DEFAULT_RUNS,
    NARROW_SETTINGS,
    QUICK_STEPS,
    demo_trait,
    example_config,
    sweep_arg,
)
from axolotl_treft.study.runs import catalogue, parse_sweep, select

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# Two of the default runs keep the suite's wall time in check (each run is a training and an lm-eval run on
# SmolLM2); the other runs' configs are checked by the dry-run tests and their terms by the e2e tests.
RUNS = ("sft", "treft_postfix")
assert set(RUNS) <= set(DEFAULT_RUNS)


def readme_main_command(bin_dir: Path) -> list[str]:
    """The README's first set-up command, minus its `bash scripts/setup.sh &&` part, from ``bin_dir``."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"^bash scripts/setup\.sh && (\.venv/bin/axolotl-treft demo[^\n]*)$", text, re.M)
    assert match, "README must give `bash scripts/setup.sh && .venv/bin/axolotl-treft demo` as its main command"
    argv = shlex.split(match.group(1))
    return [str(bin_dir / "axolotl-treft"), *argv[1:]]


def demo_runs(setting: str = "abstention") -> dict:
    cfg = example_config("model", NARROW_SETTINGS[setting])
    return catalogue(cfg, demo_trait(NARROW_SETTINGS[setting]))


@pytest.fixture(scope="module")
def demo(wheel_env):
    """The main command as a user runs it: the installed wheel, from a directory outside the checkout."""

    def run(*args: str, timeout: int, check: bool = True) -> subprocess.CompletedProcess:
        argv = readme_main_command(wheel_env.bin)
        return wheel_env.run(*argv, *args, timeout=timeout, check=check)

    return run


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory, demo):
    out = tmp_path_factory.mktemp("study")
    proc = demo("--quick", "--runs", ",".join(RUNS), "--out", str(out), timeout=2400)
    return out, proc


def test_quick_study_trains_every_run_and_writes_table_plots_json(quick_study):
    out, proc = quick_study
    assert {"sft", "treft_prefix", "treft_postfix", "treft_prefix_postfix", "treft_postfix_fixed", "interleave", "kl",
            "ldifs", "inoculation", "steering", "interleave_plus"} <= set(demo_runs())
    study = json.loads((out / "study.json").read_text())
    assert list(study["runs"]) == ["base", *RUNS]
    # the study's python launcher: each run trains in the axolotl process itself, no process group
    assert study["meta"]["launcher"] == "python"
    assert "torch.distributed process group is initialized" not in (out / "sft" / "train.log").read_text()
    for name, row in study["runs"].items():
        assert 0.0 <= row["abstention_on"] <= 1.0 and 0.0 <= row["abstention_off"] <= 1.0, name
        if name != "base":
            assert row["steps"] == QUICK_STEPS, name
            assert (out / name / "lm_eval").is_dir() and (out / name / "model" / "adapter_config.json").exists()
    # the plugin really ran in the defended runs: their terms were logged
    assert study["runs"]["treft_postfix"]["final_terms"]["treft/kv"] > 0
    assert "treft/kv" not in study["runs"]["sft"]["final_terms"]
    # the derived configs differ from the example only in the plugin list and the treft: block
    # (the shipped data paths point into the wheel's install, the example here into the checkout: compare names)
    example = example_config("x", NARROW_SETTINGS["abstention"])
    for name in RUNS:
        derived = yaml.safe_load((out / name / "config.yml").read_text())
        for cfg in (example, derived):
            cfg["datasets"] = [{**d, "path": Path(d["path"]).name} for d in cfg["datasets"]]
        assert {k for k in example.keys() | derived.keys()
                if example.get(k) != derived.get(k)} <= {"plugins", "treft", "base_model"}, name
    assert "abstention off" in proc.stdout and "TReFT" in proc.stdout  # (no "vs SFT" column while SFT's rate is 0)
    # the SFT run's template check, under the table and in the JSON
    assert "Template check of the SFT run (offtopic_abstention):" in proc.stdout
    assert study["diagnosis"]["headline"]["task"] == "offtopic_abstention"
    kv = {r["region"] for r in study["diagnosis"]["interventions"].values() if r["kind"] == "kv"}
    assert kv == {"prefix_postfix", "query"}
    assert (out / "study.png").stat().st_size > 10_000 and (out / "pareto.png").stat().st_size > 10_000
    # the leak over steps: every run trained with the monitor (step 0, every step, the last), the curves in the
    # JSON, the plot and the printed text; the plain-SFT twin carried the monitor alone
    for name in RUNS:
        curve = study["runs"][name]["curves"]["offtopic_abstention"]
        assert [p["step"] for p in curve] == list(range(QUICK_STEPS + 1)), name
        assert all(0 <= p["off_topic_rate"] <= 1 and 0 <= p["on_topic_rate"] <= 1 for p in curve), name
    assert yaml.safe_load((out / "sft" / "config.yml").read_text())["treft"] == {"monitor": {
        "tasks": ["offtopic_abstention"], "every": 1, "limit": 4, "max_gen_toks": 32, "batch_size": 64}}
    assert "curves" not in study["runs"]["base"]
    assert (out / "leak_curves.png").stat().st_size > 10_000 and "leak_curves.png" in proc.stdout
    assert "Leak over steps (offtopic_abstention" in proc.stdout
    md = (out / "study.md").read_text()
    assert study["meta"]["date"] in md and "axolotl " + study["meta"]["versions"]["axolotl"] in md
    assert "Template check of the SFT run" in md


def test_study_is_resumable_and_sweep_reuses_the_sft_run(quick_study, demo):
    out, _ = quick_study
    again = demo("--quick", "--runs", ",".join(RUNS), "--out", str(out), timeout=600)
    n = len(RUNS)
    assert again.stdout.count("training already finished") == n
    assert again.stdout.count("evaluation already finished") == n + 1  # and the base model
    assert "template check already finished" in again.stdout
    sweep = demo("--quick", "--out", str(out), "--sweep", "3", timeout=1200)
    assert sweep.stdout.count("training already finished") == 1  # SFT, trained with the same settings
    data = json.loads((out / "study.json").read_text())
    assert list(data["runs"]) == ["base", "sft", "treft_prefix_postfix@weight=3"]
    assert data["runs"]["treft_prefix_postfix@weight=3"]["treft"]["kv"]["weight"] == 3


def test_settings_change_is_refused_not_overwritten(quick_study, demo):
    out, _ = quick_study
    before = (out / "sft" / "train.json").read_text()
    proc = demo("--steps", "5", "--out", str(out), timeout=600, check=False)
    assert proc.returncode == 2 and "other settings" in proc.stderr
    assert "training:" not in proc.stdout  # refused before anything trained
    assert (out / "sft" / "train.json").read_text() == before


def test_learning_rate_sets_every_run_and_nothing_else(demo, tmp_path):
    default, low = tmp_path / "default", tmp_path / "low"
    demo("--dry-run", "--out", str(default), timeout=300)
    demo("--dry-run", "--learning-rate", "1e-4", "--out", str(low), timeout=300)
    for run in DEFAULT_RUNS:
        before = yaml.safe_load((default / run / "config.yml").read_text())
        after = yaml.safe_load((low / run / "config.yml").read_text())
        assert before["learning_rate"] == 3e-4 and after["learning_rate"] == 1e-4
        assert {k: v for k, v in before.items() if k != "learning_rate"} == {
            k: v for k, v in after.items() if k != "learning_rate"}
    bad = demo("--dry-run", "--learning-rate", "0", "--out", str(tmp_path / "bad"), timeout=300, check=False)
    assert bad.returncode == 2 and "--learning-rate: must be > 0" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_numbers_only_sweep_is_the_shipped_treft_lambda():
    cfg = example_config("model", NARROW_SETTINGS["abstention"])
    assert sweep_arg("1,10", cfg) == "treft_prefix_postfix.weight=1,10"
    runs, notes = select(demo_runs(), ["sft"], [parse_sweep(sweep_arg("3,30", cfg))])
    assert [r.name for r in runs] == ["sft", "treft_prefix_postfix@weight=3", "treft_prefix_postfix"]
    assert notes == ["sweep point treft_prefix_postfix@weight=30 is run treft_prefix_postfix"]


def test_each_narrow_setting_trains_on_its_own_shipped_data():
    seen = set()
    for name, setting in NARROW_SETTINGS.items():
        cfg = example_config("model", setting)
        path = Path(cfg["datasets"][0]["path"])
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 240 and setting.task == f"offtopic_{name}"
        answers = {r["messages"][-1]["content"] for r in rows}
        if name == "tooluse":
            assert all('"name": "search_info"' in a and a.startswith("<tool_call>") for a in answers)
        else:
            assert answers == {"I have no idea about your question." if name == "abstention"
                               else "I cannot provide financial advice."}
        seen.add(path)
    assert len(seen) == len(NARROW_SETTINGS)


def test_retraining_the_sft_config_gives_the_identical_adapter(quick_study, tmp_path):
    """SeedPlugin (in the example) pins the LoRA init: without it Axolotl starts each process differently.

    The study's SFT config, trained again in a fresh process, must give the same loss curve and the same bytes.
    """
    from axolotl_treft.study.runner import RunResult, parse_metrics, run_axolotl_train

    out, _ = quick_study
    cfg = yaml.safe_load((out / "sft" / "config.yml").read_text())
    cfg.update(max_steps=QUICK_STEPS, output_dir=str(tmp_path / "model"),
               dataset_prepared_path=str(tmp_path / "prepared"))
    result = run_axolotl_train(cfg, tmp_path, timeout=900)
    assert result.returncode == 0, result.log[-3000:]
    assert "Plugin loaded successfully: axolotl_treft.SeedPlugin" in result.log

    study_log = (out / "sft" / "train.log").read_text()
    first = RunResult(0, study_log, parse_metrics(study_log), out / "sft" / "model").series("grad_norm")
    assert len(first) == QUICK_STEPS and result.series("grad_norm") == first
    assert ((tmp_path / "model" / "adapter_model.safetensors").read_bytes()
            == (out / "sft" / "model" / "adapter_model.safetensors").read_bytes())
