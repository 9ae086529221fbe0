"""``axolotl-treft study CONFIG.yml``: derived configs, commands, sweeps, bad input, and a real study
through the ``torchrun`` launcher (from the built wheel; the ``python`` launcher's is the demo's)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from axolotl_treft.cli.main import main as cli_main
from axolotl_treft.monitor import MONITOR_FILE, read_rows
from axolotl_treft.monitor.curves import OFF, ON
from axolotl_treft.resources import example_path, resolved_example
from axolotl_treft.study.command import MONITOR_EVERY, MONITOR_LIMIT
from axolotl_treft.study.execute import Settings, plan_study, train_key
from axolotl_treft.study.leak import add_monitor, monitor_block, share_initial_points
from axolotl_treft.study.outputs import (
    add_stopped_early,
    curve_lines,
    format_table,
    pareto_front,
    plot_curves,
)
from axolotl_treft.study.runs import (
    StudyError,
    catalogue,
    derive_config,
    parse_sweep,
    select,
    sweep_point,
)

REPO = Path(__file__).resolve().parents[1]
# (config, its study run file, tasks): the paper configs that ship a run file
PAPER_STUDIES = [
    ("llama31-8b-legal-treft", "studies/llama31-8b-legal", "em,offtopic"),
    ("qwen25-7b-legal-treft", "studies/qwen25-7b-legal", "em,offtopic"),
    ("qwen3-8b-legal-treft", "studies/qwen3-8b-legal", "em,offtopic"),
    ("llama31-8b-abstention-treft", "studies/llama31-8b-abstention", "offtopic_abstention"),
]
CHANGED_KEYS = {"plugins", "treft"}


def user_config(tmp_path: Path, name: str) -> Path:
    """A shipped example as `axolotl-treft example NAME --out FILE` writes it."""
    path = tmp_path / f"{name}.yml"
    path.write_text(resolved_example(example_path(name)))
    return path


def changed_keys(a: dict, b: dict) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


@pytest.fixture(scope="module")
def paper_dry_runs(tmp_path_factory):
    """``study --dry-run`` of every paper config with its run file, through the CLI."""
    tmp = tmp_path_factory.mktemp("paper-studies")
    done = {}
    for name, run_file, tasks in PAPER_STUDIES:
        cfg = user_config(tmp, name)
        out = tmp / f"study-{name}"
        argv = ["study", str(cfg), "--run-file", str(example_path(run_file)), "--tasks", tasks, "--launcher",
                "accelerate", "--launcher-args", "--num_processes 4", "--out", str(out), "--dry-run"]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert cli_main(argv) == 0
        done[name] = (cfg, out, printed.getvalue(), tasks)
    return done


def test_dry_run_writes_every_derived_config_and_the_exact_commands(paper_dry_runs):
    for name, (cfg_path, out, printed, tasks) in paper_dry_runs.items():
        cfg = yaml.safe_load(cfg_path.read_text())
        runs = ["sft", "treft", "interleave", "kl"]
        assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(runs), name
        for run in runs:
            derived = yaml.safe_load((out / run / "config.yml").read_text())
            assert changed_keys(cfg, derived) <= CHANGED_KEYS, (name, run)
            # every run trains with the study's monitor (the leak curves); the plain-SFT twin with it alone
            monitor = derived["treft"].pop("monitor")
            assert monitor == {"tasks": [t for t in tasks.split(",") if t.startswith("offtopic")],
                               "every": MONITOR_EVERY, "limit": MONITOR_LIMIT, "batch_size": 8,
                               **({} if run == "sft" else {"initial": False})}, (name, run)  # step 0: once
            assert derived["treft"] == {} if run == "sft" else derived["treft"]
            assert "axolotl_treft.TReFTPlugin" in derived["plugins"]
        treft = yaml.safe_load((out / "treft" / "config.yml").read_text())["treft"]
        assert {k: v for k, v in treft.items() if k != "monitor"} == cfg["treft"]
        script = [ln for ln in (out / "commands.sh").read_text().splitlines() if not ln.startswith("#")]
        trains = [shlex.split(line) for line in script if " train " in line]
        evals = [shlex.split(line) for line in script if "lm_eval" in line.split(" ")[0]]
        assert len(trains) == 4 and len(evals) == 5  # every run, and the base model
        for argv, run in zip(trains, runs, strict=True):
            assert argv[1:5] == ["train", str(out / run / "config.yml"), "--launcher", "accelerate"]
            assert argv[argv.index("--output-dir") + 1] == str(out / run / "model")
            assert argv[-3:] == ["--", "--num_processes", "4"]
        sft_eval = evals[0]
        assert f"pretrained={cfg['base_model']},peft={out / 'sft' / 'model'}" in sft_eval[sft_eval.index("--model_args") + 1]
        assert "pretrained=" + cfg["base_model"] + ",dtype=bfloat16" in evals[-1][evals[-1].index("--model_args") + 1]
        if name.startswith("qwen3"):
            assert "enable_thinking=False" in sft_eval[sft_eval.index("--model_args") + 1]
        assert "sft: the config's treft: block and axolotl_treft.TReFTPlugin are dropped (plain-SFT twin)" in printed
        assert shlex.join(trains[0]) in printed


def test_derived_configs_pass_axolotl_validation_offline(paper_dry_runs, tmp_path):
    """Axolotl's own ``load_cfg`` (validation, normalization, plugin hooks) on every derived config."""
    paths = [str(out / run / "config.yml") for _, out, _, _ in paper_dry_runs.values()
             for run in ("sft", "treft", "interleave", "kl")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               AXOLOTL_DO_NOT_TRACK="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "tests.test_example_yamls", str(tmp_path), *paths], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("TREFT_YAMLS ")][-1]
    results = json.loads(line.removeprefix("TREFT_YAMLS "))
    assert len(results) == len(paths)
    for path, result in zip(paths, results, strict=True):
        assert result["ok"], (path, result.get("error"))
    by_run = {Path(p).parent.name: r for p, r in zip(paths, results, strict=True)}
    assert by_run["kl"]["treft"]["kl"]["on"] == "train"
    sft = {k: v for k, v in by_run["sft"]["treft"].items() if v}  # the plain-SFT twin: the study's monitor alone
    assert list(sft) == ["monitor"] and sft["monitor"]["every"] == 20


def test_bad_input_is_refused_before_anything_runs(tmp_path, capsys):
    cfg = user_config(tmp_path, "smollm2-135m-abstention-treft")

    def study(*args: str) -> str:
        assert cli_main(["study", str(cfg), "--out", str(tmp_path / "out"), "--dry-run", *args]) == 2
        return capsys.readouterr().err

    assert "unknown run(s) treft_prefx" in study("--runs", "sft,treft_prefx")
    assert "--tasks: offtopic_abstain not in the task pack" in study("--tasks", "offtopic_abstain")
    assert "kl.nope.weight: the run's treft block has no nope" in study("--sweep", "kl.nope.weight=1")
    assert "every value must be a number" in study("--sweep", "kl.weight=a")
    assert "sft has no treft: block" in study("--sweep", "sft.weight=1")
    assert "--trait-prompt adds the inoculation" in study("--trait-prompt", "You know nothing.")
    run_file = tmp_path / "runs.yml"
    run_file.write_text("a:\n  safelora: {base_model: b, aligned_model: c, output_dir: shared}\n"
                        "b:\n  safelora: {base_model: b, aligned_model: c, output_dir: shared}\n")
    assert "share the output_dir" in study("--run-file", str(run_file))
    run_file.write_text("sft: {kv: {weight: 1}}\n")
    assert "`sft` is the plain-SFT twin" in study("--run-file", str(run_file))
    assert not (tmp_path / "out").exists()  # nothing written
    assert cli_main(["study", str(tmp_path / "missing.yml"), "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sweeps_name_their_parameter_and_reuse_known_runs():
    runs = catalogue({"base_model": "m", "treft": {"kv": {"weight": 30.0, "tokens": "prefix_postfix"}}})
    assert runs["treft"] is runs["treft_prefix_postfix"]  # the config's own block is that run: not trained twice
    point = sweep_point(runs["kl"], "weight", 10)
    assert point.name == "kl@weight=10" and point.treft["kl"]["weight"] == 10 and runs["kl"].treft["kl"]["weight"] == 1.0
    assert sweep_point(runs["interleave"], "mix_ratio", 0.5).treft["retain"]["mix_ratio"] == 0.5
    assert sweep_point(runs["ldifs"], "feature_l2.layers", 3).treft["feature_l2"]["layers"] == 3
    with pytest.raises(StudyError, match="no weighted term"):
        sweep_point(runs["interleave"], "weight", 1)
    both = catalogue({"base_model": "m", "treft": {"kv": {"weight": 1.0}, "kl": {"weight": 1.0}}})["treft"]
    with pytest.raises(StudyError, match="several weighted terms"):
        sweep_point(both, "weight", 2)
    chosen, notes = select(runs, ["sft", "kl"], [parse_sweep("kl.weight=1,10"), parse_sweep("treft_prefix.weight=30")])
    assert [r.name for r in chosen] == ["sft", "kl", "kl@weight=10", "treft_prefix"]
    assert notes == ["sweep point kl@weight=1 is run kl", "sweep point treft_prefix@weight=30 is run treft_prefix"]
    for bad in ("kl.weight", "kl=1", ".weight=1", "kl.weight="):
        with pytest.raises(StudyError, match="RUN.PARAM"):
            parse_sweep(bad)


def test_monitor_block_follows_the_off_topic_tasks_and_the_parallelism():
    settings = Settings(tasks=("em", "offtopic_refusal"), max_gen_toks=16, eval_batch_size="8", monitor_every=5,
                        monitor_limit=12)
    block, note = monitor_block({}, settings)
    assert block == {"tasks": ["offtopic_refusal"], "every": 5, "limit": 12, "max_gen_toks": 16, "batch_size": 8}
    assert note.startswith("leak curves: every run trains with treft.monitor on offtopic_refusal")
    assert monitor_block({}, replace(settings, tasks=("em",)))[0] is None
    assert "none is in --tasks" in monitor_block({}, replace(settings, tasks=("em",)))[1]
    assert monitor_block({}, replace(settings, monitor_every=None)) == (None, "leak curves off (--monitor-every 0)")
    zero3 = {"deepspeed": {"zero_optimization": {"stage": 3}}}
    block, note = monitor_block(zero3, settings)
    assert block is None and "ZeRO-3" in note
    # the plain-SFT twin carries the monitor alone; a defended run keeps its block
    runs = catalogue({"base_model": "m", "plugins": ["axolotl_treft.SeedPlugin"], "treft": {"kv": {"weight": 1.0}}})
    sft = add_monitor(derive_config({"base_model": "m", "plugins": ["axolotl_treft.SeedPlugin"]}, runs["sft"])[0],
                      {"tasks": ["offtopic"], "every": 5})
    assert sft["plugins"] == ["axolotl_treft.SeedPlugin", "axolotl_treft.TReFTPlugin"]
    assert sft["treft"] == {"monitor": {"tasks": ["offtopic"], "every": 5}}
    kl = add_monitor(derive_config({"base_model": "m"}, runs["kl"])[0], {"tasks": ["offtopic"], "every": 5})
    assert kl["plugins"] == ["axolotl_treft.TReFTPlugin"] and kl["treft"]["kl"] == runs["kl"].treft["kl"] and "monitor" in kl["treft"]


def test_step0_is_evaluated_in_the_first_run_and_shared(tmp_path):
    """Every run of a study starts from the same model: the first trained run evaluates step 0, the others skip it
    (keyed as if they did not, so a finished run is reused whichever run is first), and their curves share it."""
    cfg = {"base_model": "m"}
    settings = Settings(tasks=("offtopic_abstention",), max_gen_toks=16, eval_batch_size="8", monitor_every=5,
                        monitor_limit=12, cwd=tmp_path)
    runs = catalogue(cfg)
    _, plans = plan_study(cfg, [runs[n] for n in ("sft", "kl", "ptst")], tmp_path / "out", settings, log=lambda _: None)
    assert [p.config.get("treft", {}).get("monitor", {}).get("initial") for p in plans] == [None, False, None]
    assert "monitor" not in (plans[2].config.get("treft") or {})  # ptst: evaluation only
    _, alone = plan_study(cfg, [runs["kl"]], tmp_path / "out", settings, log=lambda _: None)
    assert "initial" not in alone[0].config["treft"]["monitor"]
    assert train_key(alone[0], settings) == train_key(plans[1], settings)

    first = [{"step": 0, ON: 0.0, OFF: 0.1}, {"step": 5, ON: 1.0, OFF: 0.5}]
    rows = {"base": {"label": "base"}, "sft": {"curves": {"offtopic_abstention": first}},
            "kl": {"curves": {"offtopic_abstention": [{"step": 5, ON: 1.0, OFF: 0.25}]}}}
    note = share_initial_points(rows)
    assert rows["kl"]["curves"]["offtopic_abstention"] == [first[0], {"step": 5, ON: 1.0, OFF: 0.25}]
    assert note == "step 0 (the initial model, the same for every run) evaluated once, in run sft, and shared by the others"
    assert share_initial_points(rows) is None  # nothing left to share
    lonely = {"kl": {"curves": {"offtopic_abstention": [{"step": 5, ON: 1.0, OFF: 0.25}]}}}
    assert "no run evaluated step 0 of offtopic_abstention" in share_initial_points(lonely)


def test_stopped_early_column_curve_text_and_plot(tmp_path):
    curve = [{"step": 0, ON: 0.0, OFF: 0.0}, {"step": 10, ON: 0.5, OFF: 0.25}, {"step": 20, ON: 1.0, OFF: 0.5},
             {"step": 30, ON: 1.0, OFF: 0.75}]
    never = [{"step": 0, ON: 0.0, OFF: 0.0}, {"step": 30, ON: 0.75, OFF: 0.5}]
    rows = {"base": {"label": "base model", "abstention_on": 0.0, "abstention_off": 0.0},
            "sft": {"label": "SFT", "abstention_on": 1.0, "abstention_off": 0.8,
                    "curves": {"offtopic_abstention": curve}},
            "kl": {"label": "KL", "abstention_on": 0.9, "abstention_off": 0.4,
                   "curves": {"offtopic_abstention": never}}}
    add_stopped_early(rows)
    assert (rows["sft"]["abstention_off_early"], rows["sft"]["abstention_early_step"]) == (0.5, 20)
    assert rows["kl"]["abstention_off_early"] is None and "abstention_off_early" not in rows["base"]
    header, *lines = format_table(rows).splitlines()
    assert "abstention off stopped early" in header and "at step" in header
    assert lines[2].split()[-2:] == ["50.0%", "20"]  # SFT: the rate at step 20, then the step
    text = curve_lines(rows)
    assert text[0].startswith("Leak over steps (offtopic_abstention")
    assert text[1] == "  SFT: 0: 0% (0%)  10: 25% (50%)  20: 50% (100%)  30: 75% (100%)"
    assert plot_curves(rows, tmp_path / "leak_curves.png", "t").stat().st_size > 10_000
    assert plot_curves({"base": rows["base"]}, tmp_path / "none.png", "t") is None


def test_pareto_front_marks_the_runs_nothing_beats():
    points = {"sft": (1.0, 1.0), "a": (1.0, 0.8), "b": (0.9, 0.8), "c": (0.5, 0.1), "d": (0.4, 0.2)}
    assert pareto_front(points) == ["a", "c"]


# ------------------------------------------------------------------------------------------ real studies


@pytest.fixture(scope="module")
def example_config_on_tiny_model(wheel_env, tiny_llama_dir, tmp_path_factory) -> Path:
    """The shipped SmolLM2 example as a user writes it with the installed wheel, on the tiny random Llama that shares
    SmolLM2's tokenizer and template: the launcher is what this test checks; the demo trains the embedded model."""
    tmp = tmp_path_factory.mktemp("example")
    wheel_env.run("axolotl-treft", "example", "smollm2", "--out", str(tmp / "cfg.yml"))
    cfg = yaml.safe_load((tmp / "cfg.yml").read_text())
    cfg["base_model"] = str(tiny_llama_dir)
    (tmp / "cfg.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return tmp / "cfg.yml"


@pytest.mark.slow
def test_real_study_through_torchrun(wheel_env, example_config_on_tiny_model, tmp_path):
    """The ``python`` launcher's real study is the demo's (``tests/test_demo.py``: same ``run_study``)."""
    launcher = ["--launcher", "torchrun", "--launcher-args", "--nproc_per_node 1"]
    out = tmp_path / "study"
    proc = wheel_env.run("axolotl-treft", "study", str(example_config_on_tiny_model), "--runs", "sft,treft_postfix_fixed",
                         "--tasks", "offtopic_abstention", "--max-steps", "2", "--limit", "4", "--max-gen-toks", "16",
                         "--eval-batch-size", "8", "--device", "cpu", *launcher, "--out", str(out), timeout=1800)
    study = json.loads((out / "study.json").read_text())
    assert list(study["runs"]) == ["base", "sft", "treft_postfix_fixed"]
    assert study["meta"]["launcher"] == launcher[1]
    for name in ("sft", "treft_postfix_fixed"):
        row = study["runs"][name]
        assert row["steps"] == 2 and 0 <= row["abstention_off"] <= 1, name
        assert (out / name / "model" / "adapter_config.json").exists(), name
    assert "treft/kv" in study["runs"]["treft_postfix_fixed"]["final_terms"]
    for name in ("sft", "treft_postfix_fixed"):  # the leak curves: step 0 and the last step (every 20)
        assert [p["step"] for p in study["runs"][name]["curves"]["offtopic_abstention"]] == [0, 2], name
    # step 0 (the initial model) was evaluated in the first run only, and shared
    steps = [r["step"] for r in read_rows(out / "treft_postfix_fixed" / "model" / MONITOR_FILE)]
    assert [r["step"] for r in read_rows(out / "sft" / "model" / MONITOR_FILE)] == [0, 2] and steps == [2]
    curves = {n: study["runs"][n]["curves"]["offtopic_abstention"] for n in ("sft", "treft_postfix_fixed")}
    assert curves["sft"][0] == curves["treft_postfix_fixed"][0]
    assert "evaluated once, in run sft" in study["meta"]["curves_note"] and "evaluated once, in run sft" in proc.stdout
    assert (out / "leak_curves.png").stat().st_size > 10_000
    # torchrun starts a process group (rank 0 of 1); the python launcher trains in the axolotl process itself
    assert "torch.distributed process group is initialized" in (out / "sft" / "train.log").read_text()
    assert "abstention off" in proc.stdout and "base model (no finetuning)" in proc.stdout
    assert all(row.get("peak_gpu_gib") is None for row in study["runs"].values())  # no GPU here
    assert (out / "study.png").stat().st_size > 10_000 and (out / "pareto.png").stat().st_size > 10_000
    assert "| run |" in (out / "study.md").read_text()
