"""``treft.monitor`` / ``treft.eval``: the task pack inside a real ``axolotl train`` run, and bad input at validation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from axolotl_treft.monitor import MONITOR_FILE, deepspeed_stage, flat, read_rows, task_metrics
from tests.axolotl_runner import run_axolotl
from tests.test_config import make_cfg, validate

MONITOR = {"tasks": ["offtopic_abstention"], "every": 2, "limit": 2, "max_gen_toks": 4}
EVAL = {"tasks": ["offtopic_abstention"], "limit": 2, "max_gen_toks": 4, "bootstrap_iters": 0}
RATES = ("on_topic_rate", "off_topic_rate")


# ---------------------------------------------------------------- validation (fast)


@pytest.mark.parametrize(
    ("treft", "extra", "message"),
    [
        ({"monitor": {**MONITOR, "every": 0}}, {}, r"treft\.monitor\.every"),
        ({"monitor": {**MONITOR, "every": -3}}, {}, r"treft\.monitor\.every"),
        ({"monitor": {**MONITOR, "tasks": []}}, {}, r"treft\.monitor\.tasks"),
        ({"monitor": {**MONITOR, "tasks": ["offtopic_abstension"]}}, {},
         r"treft\.monitor\.tasks: unknown task\(s\) \['offtopic_abstension'\]"),
        ({"eval": {**EVAL, "tasks": ["no_such_task"]}}, {}, r"treft\.eval\.tasks: unknown task"),
        ({"monitor": {**MONITOR, "tasks": ["em_general"]}}, {}, r"treft\.monitor\.metadata\.judge: em_general .*judge"),
        ({"eval": {**EVAL, "tasks": ["em"]}}, {}, r"treft\.eval\.metadata\.judge: em .*judge"),
        ({"monitor": {**MONITOR, "metadata": {"judge_check": True}}}, {},
         r"treft\.monitor\.metadata\.judge: offtopic_abstention"),
        ({"monitor": {**MONITOR, "include_path": ["/nonexistent/tasks"]}}, {},
         r"treft\.monitor\.include_path\[0\]: /nonexistent/tasks is not a directory"),
        ({"monitor": {**MONITOR, "evry": 2}}, {}, r"evry"),
        ({"monitor": MONITOR}, {"deepspeed": {"zero_optimization": {"stage": 3}}}, r"treft\.monitor: .*ZeRO-3"),
        ({"eval": EVAL}, {"fsdp_version": 2}, r"treft\.eval: not supported with FSDP"),
    ],
)
def test_bad_input_fails_at_validation_naming_the_key(smollm2_dir, tmp_path, monkeypatch, treft, extra, message):
    for var in ("TREFT_JUDGE_MODEL", "TREFT_JUDGE_BASE_URL", "TREFT_OFFTOPIC_JUDGE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(Exception, match=message):
        validate(make_cfg(smollm2_dir, tmp_path, treft, **extra))


def test_valid_blocks_keep_their_settings(smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TREFT_JUDGE_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("TREFT_JUDGE_MODEL", "my-judge")  # a judged task validates once a judge is configured
    cfg = validate(make_cfg(smollm2_dir, tmp_path, {"monitor": MONITOR, "eval": {**EVAL, "tasks": ["em_general"]}},
                            deepspeed={"zero_optimization": {"stage": 2}}))
    assert cfg.treft.monitor.every == 2 and cfg.treft.monitor.limit == 2 and cfg.treft.monitor.bootstrap_iters == 0
    assert cfg.treft.eval.tasks == ["em_general"] and cfg.treft.eval.batch_size == 8


def test_deepspeed_stage_reads_paths_and_mappings(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert deepspeed_stage(str(path)) == 3
    assert deepspeed_stage({"zero_optimization": {"stage": 2}}) == 2
    assert deepspeed_stage(None) is None and deepspeed_stage({"bf16": {"enabled": True}}) is None


def test_task_metrics_drop_stderr_and_filter_and_keep_nan_as_none():
    results = {"results": {"offtopic_abstention": {"alias": "offtopic_abstention", "on_topic_rate,detected": 0.5,
                                                   "on_topic_rate_stderr,detected": "N/A",
                                                   "off_topic_rate,detected": float("nan"), "sample_len": 2}}}
    metrics = task_metrics(results)
    assert metrics == {"offtopic_abstention": {"on_topic_rate": 0.5, "off_topic_rate": None}}
    assert flat(metrics, "monitor") == {"monitor/offtopic_abstention/on_topic_rate": 0.5}


@pytest.mark.slow
def test_live_tasks_restore_mode_and_rng_and_repeat_exactly(tiny_llama_dir):
    """The monitor's cached tasks evaluated twice: same metrics, train mode and every RNG as before."""
    import random

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_treft.args import MonitorConfig
    from axolotl_treft.monitor import LiveTasks

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).train()
    tasks = LiveTasks(MonitorConfig(tasks=["offtopic"], every=1, limit=2, max_gen_toks=4), None,
                      AutoTokenizer.from_pretrained(tiny_llama_dir))
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first, second = task_metrics(tasks(model)), task_metrics(tasks(model))
    assert first == second and set(first) == {"offtopic", "offtopic_abstention", "offtopic_refusal", "offtopic_tooluse"}
    assert model.training and torch.is_grad_enabled()
    assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
    assert (states[2] == np.random.get_state()[1]).all()


# ---------------------------------------------------------------- real training runs (slow)


def _train(tmp: Path, model_dir: Path, **overrides):
    cfg = {"plugins": ["axolotl_treft.TReFTPlugin"], "save_strategy": "steps", "save_steps": 2,
           "treft": {"monitor": MONITOR, "eval": EVAL}}
    cfg.update(overrides)
    result = run_axolotl(tmp, model_dir, cfg)
    assert result.returncode == 0, result.log[-4000:]
    return result


def _tensorboard_scalars(out: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found: dict[str, dict[int, float]] = {}
    for path in out.rglob("events.out.tfevents*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                found.setdefault(value.tag, {})[event.step] = value.simple_value
    return found


def _monitor_history(checkpoint: Path) -> dict[int, dict]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e for e in history if any(k.startswith("monitor/") for k in e)}


@pytest.mark.slow
def test_monitor_and_eval_in_a_real_training_run(tmp_path, smollm2_dir):
    result = _train(tmp_path, smollm2_dir, use_tensorboard=True)
    out = result.output_dir
    assert len(result.series("loss")) == 4  # the monitor's own log call does not swallow a step's loss line

    rows = read_rows(out / MONITOR_FILE)
    assert [r["step"] for r in rows] == [0, 2, 4]  # step 0, every 2, and the last step (4)
    for row in rows:
        assert row["task"] == "offtopic_abstention" and row["seconds"] > 0
        assert set(row["metrics"]) >= set(RATES)
        assert all(0.0 <= row["metrics"][k] <= 1.0 for k in RATES)  # limit 2: one on- and one off-topic question

    logged = _monitor_history(out / "checkpoint-4")  # written by the trainer at the step-4 checkpoint
    assert sorted(logged) == [0, 2, 4]
    for step, entry in logged.items():
        row = next(r for r in rows if r["step"] == step)
        for k in RATES:
            assert entry[f"monitor/offtopic_abstention/{k}"] == pytest.approx(row["metrics"][k])

    from axolotl_treft.cli.report import find_results, load_results, summarize

    results_file = find_results(out / "eval")
    data = load_results(results_file)
    row = summarize(data)
    assert row["abstention_on"] is not None and row["abstention_off"] is not None
    assert data["n-samples"]["offtopic_abstention"]["effective"] == 2
    samples = list(results_file.parent.glob("samples_offtopic_abstention_*.jsonl"))
    assert len(samples) == 1 and len(samples[0].read_text().splitlines()) == 2
    assert "<|im_start|>assistant" in json.loads(samples[0].read_text().splitlines()[0])["arguments"][
        "gen_args_0"]["arg_0"]  # the chat template was applied
    assert "treft.eval (" in result.log and "offtopic_abstention: on_topic_rate=" in result.log  # printed

    scalars = _tensorboard_scalars(out)  # the trackers get both (HF's TensorBoard callback adds `train/`)
    assert sorted(scalars["train/monitor/offtopic_abstention/off_topic_rate"]) == [0, 2, 4]
    assert scalars["train/eval/offtopic_abstention/on_topic_rate"] == {4: pytest.approx(row["abstention_on"])}


@pytest.mark.slow
def test_the_monitor_leaves_training_unchanged(tmp_path, tiny_llama_dir):
    """Same losses with and without the monitor (dropout on, so a consumed RNG draw would show)."""
    seeded = {"lora_dropout": 0.1, "plugins": ["axolotl_treft.SeedPlugin"]}
    plain = run_axolotl(tmp_path / "plain", tiny_llama_dir, seeded)
    monitored = run_axolotl(tmp_path / "monitored", tiny_llama_dir, {
        **seeded, "plugins": ["axolotl_treft.SeedPlugin", "axolotl_treft.TReFTPlugin"], "treft": {"monitor": MONITOR}})
    later = run_axolotl(tmp_path / "later", tiny_llama_dir, {  # `initial: false`: no step 0 (a study's later runs)
        **seeded, "plugins": ["axolotl_treft.SeedPlugin", "axolotl_treft.TReFTPlugin"],
        "treft": {"monitor": {**MONITOR, "initial": False}}})
    assert plain.returncode == 0 and monitored.returncode == 0 and later.returncode == 0, monitored.log[-3000:]
    assert [r["step"] for r in read_rows(monitored.output_dir / MONITOR_FILE)] == [0, 2, 4]
    assert [r["step"] for r in read_rows(later.output_dir / MONITOR_FILE)] == [2, 4]
    assert len(plain.series("loss")) == 4 and plain.series("loss") == monitored.series("loss") == later.series("loss")


@pytest.mark.slow
def test_resuming_continues_the_monitor_file_without_duplicate_steps(tmp_path, tiny_llama_dir):
    first = _train(tmp_path / "a", tiny_llama_dir, treft={"monitor": MONITOR})
    out = first.output_dir
    before = {r["step"]: r for r in read_rows(out / MONITOR_FILE)}
    assert sorted(before) == [0, 2, 4]

    resumed = _train(tmp_path / "a", tiny_llama_dir, treft={"monitor": MONITOR},
                     resume_from_checkpoint=str(out / "checkpoint-2"))
    after = read_rows(out / MONITOR_FILE)
    assert [r["step"] for r in after] == [0, 2, 4]  # 0 and 2 kept from the first run, 4 evaluated again
    assert after[0] == before[0] and after[1] == before[2]
    assert "dropping 1 row(s) after step 2" in resumed.log
    assert os.path.isdir(out / "checkpoint-4")


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.skipif(os.environ.get("TREFT_RUN_DEEPSPEED") != "1", reason="2-process DeepSpeed run; set TREFT_RUN_DEEPSPEED=1")
def test_monitor_and_eval_under_deepspeed_zero2_two_processes(tmp_path, tiny_llama_dir):
    """Rank 0 evaluates its replica while rank 1 waits: one row per step, training finishes, eval written once."""
    from tests import ds_harness as h

    run = h.run(tmp_path, tiny_llama_dir, {"plugins": [h.PLUGIN], "max_steps": 4,
                                           "treft": {"monitor": MONITOR, "eval": EVAL}}, "zero2", timeout=900)
    assert run.returncode == 0, h.tail(run)
    assert [r["step"] for r in read_rows(run.output_dir / MONITOR_FILE)] == [0, 2, 4]
    assert len(list((run.output_dir / "eval").rglob("results_*.json"))) == 1


def test_curves_stopped_early_and_the_leak_plot(tmp_path):
    from axolotl_treft.monitor.curves import plot_leak_curves, read_curves, stopped_early

    path = tmp_path / MONITOR_FILE
    rates = [(0, 0.0, 0.0), (2, 0.5, 0.1), (4, 0.95, 0.3), (6, 1.0, 0.9)]
    path.write_text("".join(json.dumps({"step": s, "task": "offtopic_abstention", "seconds": 1.0,
                                        "metrics": {"on_topic_rate": on, "off_topic_rate": off}}) + "\n"
                            for s, on, off in reversed(rates)))
    curves = read_curves(path)
    assert [p["step"] for p in curves["offtopic_abstention"]] == [0, 2, 4, 6]
    assert stopped_early(curves["offtopic_abstention"]) == {"step": 4, "on_topic_rate": 0.95, "off_topic_rate": 0.3}
    assert stopped_early(curves["offtopic_abstention"], threshold=1.01) is None
    assert read_curves(tmp_path / "missing.jsonl") == {}
    png = plot_leak_curves({"sft": curves, "treft": curves}, tmp_path / "leak_curves.png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert plot_leak_curves({"sft": {}}, tmp_path / "none.png") is None


@pytest.mark.slow
def test_eval_runs_on_the_safelora_projection(tmp_path, tiny_llama_dir):
    """With treft.safelora, treft.eval evaluates the projected adapter (OUTPUT_DIR/safelora) on the base model."""
    import torch
    from transformers import AutoModelForCausalLM

    aligned = tmp_path / "aligned"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(aligned)
    result = _train(tmp_path / "run", tiny_llama_dir, save_strategy="no", save_steps=None, treft={
        "eval": EVAL, "safelora": {"base_model": str(tiny_llama_dir), "aligned_model": str(aligned), "top_k": 2}})
    out = result.output_dir
    assert (out / "safelora" / "adapter_model.safetensors").is_file()
    from axolotl_treft.cli.report import find_results

    data = json.loads(find_results(out / "eval").read_text())
    assert data["config"]["model_args"]["pretrained"] == str(out / "safelora")
    assert data["n-samples"]["offtopic_abstention"]["effective"] == 2
    assert "treft.eval (" in result.log and str(out / "safelora") in result.log
