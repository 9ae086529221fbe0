"""The README's main job (the piggyback study), end to end in its quick mode: real trainings, real lm_eval."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from axolotl_treft.demo import QUICK_STEPS, parse_weights
from axolotl_treft.study import DEFAULT_RUNS, select_runs, study_runs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def readme_main_command(bin_dir: Path) -> list[str]:
    """The README's first set-up command, minus its `bash scripts/setup.sh &&` part, from ``bin_dir``."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"^bash scripts/setup\.sh && (\.venv/bin/axolotl-treft demo[^\n]*)$", text, re.M)
    assert match, "README must give `bash scripts/setup.sh && .venv/bin/axolotl-treft demo` as its main command"
    argv = shlex.split(match.group(1))
    return [str(bin_dir / "axolotl-treft"), *argv[1:]]


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
    proc = demo("--quick", "--out", str(out), timeout=2400)
    return out, proc


def test_quick_study_trains_every_run_and_writes_table_plot_json(quick_study):
    out, proc = quick_study
    assert {"sft", "treft_prefix", "treft_postfix", "treft_prefix_postfix", "interleave", "kl", "inoculation",
            "steering", "interleave_plus"} <= {r.name for r in study_runs()}
    names = [r.name for r in select_runs(None)]
    assert names == list(DEFAULT_RUNS)
    study = json.loads((out / "study.json").read_text())
    assert list(study["runs"]) == names
    for name, row in study["runs"].items():
        assert row["steps"] == QUICK_STEPS, name
        assert 0.0 <= row["on_topic_rate"] <= 1.0 and 0.0 <= row["off_topic_rate"] <= 1.0, name
        assert (out / name / "lm_eval").is_dir() and (out / name / "adapter" / "adapter_config.json").exists()
    # the plugin really ran in the defended runs: their terms were logged
    assert study["runs"]["treft_prefix_postfix"]["final_terms"]["treft/kv"] > 0
    assert "treft/kl" in study["runs"]["kl"]["final_terms"]
    assert "treft/kv" not in study["runs"]["sft"]["final_terms"]
    assert "retain examples" in (out / "interleave" / "train.log").read_text()
    assert "240 of 240 training examples carry the inoculation prompt" in (out / "inoculation" / "train.log").read_text()
    assert "treft.steering: adding α·e at layer 15" in (out / "steering" / "train.log").read_text()
    assert "off-topic vs SFT" in proc.stdout and "TReFT" in proc.stdout
    assert (out / "study.png").stat().st_size > 10_000
    md = (out / "study.md").read_text()
    assert study["meta"]["date"] in md and "axolotl " + study["meta"]["versions"]["axolotl"] in md


def test_study_is_resumable_and_sweep_reuses_the_sft_run(quick_study, demo):
    out, _ = quick_study
    again = demo("--quick", "--out", str(out), timeout=600)
    n = len(select_runs(None))
    assert again.stdout.count("training already finished") == n
    assert again.stdout.count("evaluation already finished") == n
    sweep = demo("--quick", "--out", str(out), "--sweep", "3", timeout=1200)
    assert sweep.stdout.count("already finished") == 2  # SFT trained and evaluated with the same settings
    data = json.loads((out / "sweep.json").read_text())
    assert len(data["runs"]) == 2 and (out / "sweep.png").stat().st_size > 10_000


def test_settings_change_is_refused_not_overwritten(quick_study, demo):
    out, _ = quick_study
    before = (out / "sft" / "train.json").read_text()
    proc = demo("--steps", "5", "--out", str(out), timeout=600, check=False)
    assert proc.returncode != 0 and "other settings" in proc.stdout + proc.stderr
    assert (out / "sft" / "train.json").read_text() == before


def test_sweep_weights_are_validated_and_the_shipped_weight_reuses_the_study_run():
    assert parse_weights("1, 10,30") == [1.0, 10.0, 30.0]
    from axolotl_treft.study import example_treft, sweep_runs

    kv = example_treft()["kv"]
    names = [r.name for r in sweep_runs([3.0, kv["weight"]])]
    assert names == ["sft", f"treft_{kv['tokens']}_w3", f"treft_{kv['tokens']}"]
    assert names[2] in [r.name for r in study_runs()]
    for bad in ("0,1", "a,b", ""):
        with pytest.raises(SystemExit):
            parse_weights(bad)


def test_run_selection():
    assert [r.name for r in select_runs(["kl", "steering"])] == ["sft", "kl", "steering"]  # SFT always, study order
    assert [r.name for r in select_runs(["all"])] == [r.name for r in study_runs()]
    with pytest.raises(SystemExit, match="unknown run.*treft_prefx"):
        select_runs(["treft_prefx"])


def test_interleave_plus_scores_with_the_sft_adapter_of_the_same_study(tmp_path):
    from axolotl_treft.study import run_config

    run = next(r for r in study_runs() if r.name == "interleave_plus")
    cfg = run_config(run, Path("model"), tmp_path, None)
    assert cfg["treft"]["retain"]["select"] == {"top": 0.5, "narrow_adapter": str(tmp_path / "sft" / "adapter")}
    assert "narrow_adapter" not in run.treft["retain"]["select"]  # the catalogue entry is not modified


def test_each_narrow_setting_trains_on_its_own_shipped_data(tmp_path):
    from axolotl_treft.study import NARROW_SETTINGS, run_config

    seen = set()
    for name, setting in NARROW_SETTINGS.items():
        cfg = run_config(study_runs()[0], Path("model"), tmp_path, None, setting)
        path = Path(cfg["datasets"][0]["path"])
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 240 and setting.task == f"offtopic_{name}"
        answers = {r["messages"][-1]["content"] for r in rows}
        if name == "tooluse":
            assert all('"name": "search_info"' in a and a.startswith("<tool_call>") for a in answers)
        else:
            assert answers == {"I have no idea about your question." if name == "abstention"
                               else "I cannot provide financial advice."}
        assert cfg["plugins"] == ["axolotl_treft.SeedPlugin"] and "treft" not in cfg  # the SFT twin
        seen.add(path)
    assert len(seen) == len(NARROW_SETTINGS)


def test_two_runs_of_one_config_give_identical_adapters(tmp_path):
    """SeedPlugin (in the example) pins the LoRA init: without it Axolotl starts each process differently."""
    from axolotl_treft.models import materialize_smollm2
    from axolotl_treft.runner import run_axolotl_train
    from axolotl_treft.study import run_config

    model = materialize_smollm2()
    digests, losses = [], []
    for name in ("a", "b"):
        cfg = run_config(study_runs()[0], model, tmp_path / name, 2)
        result = run_axolotl_train(cfg, tmp_path / name / "sft", timeout=900)
        assert result.returncode == 0, result.log[-3000:]
        assert "Plugin loaded successfully: axolotl_treft.SeedPlugin" in result.log
        losses.append(result.series("grad_norm"))
        digests.append((tmp_path / name / "sft" / "adapter" / "adapter_model.safetensors").read_bytes())
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert digests[0] == digests[1]
