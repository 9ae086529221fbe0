"""The study and retain selection as reliable as the core (issue 25): stop signals stop the whole tree, every
derived config is validated before anything trains, defaults are safe on the CPU, nothing stale is reused.

The signal tests run the real ``axolotl-treft study`` (real ``axolotl train`` on the embedded model) and
check with psutil that no process of its tree survives."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from axolotl_treft.cli.main import main as cli_main
from axolotl_treft.resources import data_path, example_path, resolved_example
from axolotl_treft.study.command import CPU_EVAL_BATCH_SIZE, eval_batch_size
from axolotl_treft.study.execute import Settings, _reusable_training, evaluation_only, plan_study, train_key
from axolotl_treft.study.runs import StudyError, catalogue, derive_config, select

BIN = Path(sys.executable).parent
RETAIN = str(data_path("retain_general.jsonl"))


def user_config(tmp_path: Path, model: Path | None = None, **changes) -> Path:
    cfg = yaml.safe_load(resolved_example(example_path("smollm2-135m-abstention-treft")))
    if model is not None:
        cfg["base_model"] = str(model)
    cfg.update(changes)
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}, sort_keys=False))
    return path


def study(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(argv))
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------- checked before training


def test_every_derived_config_is_validated_before_anything_trains(tmp_path):
    """A bad sweep value and a misspelled run-file key: refused together by Axolotl's schema, even by
    ``--dry-run``, before a single run trains or a config is written."""
    cfg = user_config(tmp_path)
    run_file = tmp_path / "runs.yml"
    run_file.write_text("sft: null\nmine:\n  kv: {weight: 1, tokns: postfix}\nkl:\n  kl: {weight: 1}\n")
    for extra in ([], ["--dry-run"]):
        code, _, err = study("study", str(cfg), "--run-file", str(run_file), "--sweep", "kl.weight=-5",
                             "--out", str(tmp_path / "out"), *extra)
        assert code == 2, err
        assert "run mine:\n  treft.kv.tokns: Extra inputs are not permitted" in err
        assert "run kl@weight=-5:\n  treft.kl.weight: Input should be greater than or equal to 0" in err
        assert "nothing was trained" in err and not (tmp_path / "out").exists()


def test_a_config_axolotl_rejects_fails_up_front_with_axolotls_message(tmp_path):
    cfg = user_config(tmp_path, datasets=None)
    code, out, err = study("study", str(cfg), "--runs", "sft,treft", "--out", str(tmp_path / "out"))
    assert code == 2
    assert "of run sft, treft_prefix_postfix:\n  config: either datasets or pretraining_dataset is required" in err
    assert "training:" not in out and not (tmp_path / "out").exists()


def test_demo_sweep_value_is_validated_up_front(tmp_path):
    code, out, err = study("demo", "--sweep", "-1", "--quick", "--out", str(tmp_path / "demo"))
    assert code == 2 and "treft.kv.weight: Input should be greater than or equal to 0" in err
    assert "training:" not in out and not (tmp_path / "demo").exists()


def test_treft_always_names_the_configs_own_block():
    own = {"kv": {"weight": 30.0, "tokens": "prefix_postfix", "layers": "all"}}
    runs = catalogue({"base_model": "m", "treft": own})
    chosen, notes = select(runs, ["sft", "treft"])
    assert [r.name for r in chosen] == ["sft", "treft_prefix_postfix"] and chosen[1].treft == own
    assert notes == ["run treft (the config's treft: block) is run treft_prefix_postfix"]
    every, _ = select(runs, ["all"])
    assert len({r.name for r in every}) == len(every)  # the alias does not train that run twice
    other = catalogue({"base_model": "m", "treft": {"kv": {"weight": 2.0}, "kl": {"weight": 1.0}}})
    assert select(other, ["treft"])[0][1].name == "treft"


# ------------------------------------------------------------------------------------------ defaults


def test_eval_batch_size_default_is_fixed_on_the_cpu_and_auto_on_a_gpu():
    assert eval_batch_size(None, "cpu") == str(CPU_EVAL_BATCH_SIZE)
    assert eval_batch_size(None, "cuda:0") == "auto"
    assert eval_batch_size(None, None) == ("auto" if torch.cuda.is_available() else str(CPU_EVAL_BATCH_SIZE))
    assert eval_batch_size("16", "cpu") == "16" and eval_batch_size("auto:4", "cuda") == "auto:4"
    with pytest.raises(StudyError, match="--eval-batch-size auto: lm-eval's automatic search"):
        eval_batch_size("auto", "cpu")
    with pytest.raises(StudyError, match="positive number"):
        eval_batch_size("0", "cuda")


def test_study_on_the_cpu_evaluates_with_the_fixed_batch_size(tmp_path):
    code, out, _ = study("study", str(user_config(tmp_path)), "--runs", "sft", "--device", "cpu", "--dry-run",
                         "--out", str(tmp_path / "out"))
    assert code == 0
    evals = [line for line in (tmp_path / "out" / "commands.sh").read_text().splitlines() if "lm_eval " in line]
    assert evals and all(f"--batch_size {CPU_EVAL_BATCH_SIZE} " in line for line in evals)


# ------------------------------------------------------------------------------------------ stale results


def test_treft_plugin_under_its_module_path_is_listed_once():
    cfg = {"base_model": "m", "plugins": ["axolotl_treft.SeedPlugin", "axolotl_treft.plugin.TReFTPlugin"],
           "treft": {"kv": {"weight": 1.0}}}
    runs = catalogue(cfg)
    derived, _ = derive_config(cfg, runs["kl"])
    assert derived["plugins"] == ["axolotl_treft.SeedPlugin", "axolotl_treft.plugin.TReFTPlugin"]
    sft, notes = derive_config(cfg, runs["sft"])
    assert sft["plugins"] == ["axolotl_treft.SeedPlugin"] and "treft" not in sft
    assert notes == ["sft: the config's treft: block and axolotl_treft.plugin.TReFTPlugin are dropped (plain-SFT twin)"]


def test_users_retain_selection_stays_out_of_interleave_and_kl():
    select_block = {"narrow_model": "./narrow", "top": 0.3}
    cfg = {"base_model": "m", "treft": {"retain": {"datasets": [{"path": RETAIN}], "mix_ratio": 0.3,
                                                   "select": select_block}}}
    runs = catalogue(cfg)
    assert "select" not in runs["interleave"].treft["retain"] and runs["interleave"].treft["retain"]["mix_ratio"] == 0.3
    assert "select" not in runs["kl"].treft["retain"]
    assert runs["interleave_plus"].treft["retain"]["select"] == {"top": 0.5}
    assert runs["treft"].treft["retain"]["select"] == select_block  # the user's own run keeps it


def _plans(tmp_path: Path, cfg_path: Path, names: list[str]):
    cfg = yaml.safe_load(cfg_path.read_text())
    settings = Settings(tasks=("offtopic_abstention",), cwd=tmp_path)
    runs, _ = select(catalogue(cfg), names)
    return cfg, settings, plan_study(cfg, runs, tmp_path / "out", settings, log=lambda _: None)[1]


def test_reuse_key_covers_upstream_weights_and_every_local_input(tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{{ messages }}")
    cfg_path = user_config(tmp_path, chat_template="jinja", chat_template_jinja=str(template))
    cfg, settings, (sft, plus) = _plans(tmp_path, cfg_path, ["sft", "interleave_plus"])
    assert plus.upstream is sft
    key = train_key(plus, settings)
    sft.dir.mkdir(parents=True)
    (sft.dir / "train.json").write_text(json.dumps({"fingerprint": train_key(sft, settings), "model_digest": "A"}))
    plus.dir.mkdir(parents=True)
    (plus.dir / "train.json").write_text(json.dumps({"fingerprint": key, "upstream": {"sft": "A"}}))
    logged: list[str] = []
    assert _reusable_training(plus, key, logged.append) is not None
    (sft.dir / "train.json").write_text(json.dumps({"fingerprint": train_key(sft, settings), "model_digest": "B"}))
    assert _reusable_training(plus, key, logged.append) is None  # the SFT run it scored with was trained again
    assert logged[-1] == "[interleave_plus] its upstream run sft was trained again since: training again"
    template.write_text("{{ messages }}!")  # a file the config names, not a dataset
    assert train_key(plus, settings) != key and train_key(sft, settings) != json.loads(
        (sft.dir / "train.json").read_text())["fingerprint"]


def test_evaluation_only_run_is_keyed_by_the_weights_it_evaluates(tmp_path):
    """``ptst`` evaluates the SFT model: the SFT run trained again (same settings) must not reuse its scores."""
    _, settings, plans = _plans(tmp_path, user_config(tmp_path), ["sft", "ptst"])
    sft = plans[0]
    sft.dir.mkdir(parents=True)
    keys = []
    for weights in ("A", "B"):
        (sft.dir / "train.json").write_text(json.dumps({"fingerprint": train_key(sft, settings), "model_digest": weights}))
        keys.append(evaluation_only(plans[1], plans, settings)["fingerprint"])
    assert keys[0] != keys[1]


# ----------------------------------------------------------------------------------- retain selection


CUSTOM_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}### assistant:\n{% endif %}")


def _narrow(tiny_llama_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.reg_harness import randomize_lora_b

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(model, 0.3).merge_and_unload().save_pretrained(out)
    return out


def _startup_cfg(tmp_path: Path, model: Path, narrow: Path, specs: list[dict], narrow_key: str = "narrow_model",
                 **extra):
    from axolotl.utils.dict import DictDefault

    return DictDefault({"base_model": str(model), "tokenizer_config": str(model), "chat_template": "tokenizer_default",
                        "dataset_prepared_path": str(tmp_path / "prepared"), "torch_dtype": torch.bfloat16,
                        "treft": {"retain": {"datasets": [dict(s) for s in specs], "mix_ratio": 0.2,
                                             "select": {narrow_key: str(narrow), "top": 1.0,
                                                        "drop_refusals": False, "epsilon": 1e-3}}}, **extra})


def test_retain_selection_renders_each_spec_as_configured_in_the_runs_dtype(tmp_path, smollm2_dir, smollm2_lora_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_treft.args import treft_settings
    from axolotl_treft.defenses.retain_select import answer_nll, read_pool, select_at_startup

    rows = read_pool(RETAIN)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    second.write_text("".join(json.dumps({"conversations": r["messages"]}) + "\n" for r in rows[10:]))
    specs = [{"path": str(first), "type": "chat_template", "field_messages": "messages"},
             {"path": str(second), "type": "chat_template", "field_messages": "conversations",
              "chat_template": "jinja", "chat_template_jinja": CUSTOM_TEMPLATE}]
    cfg = _startup_cfg(tmp_path, smollm2_dir, smollm2_lora_dir, specs, narrow_key="narrow_adapter")
    kept = select_at_startup(cfg, treft_settings(cfg).retain).datasets
    assert [{k: v for k, v in d.items() if k != "path"} for d in kept] == [
        {k: v for k, v in s.items() if k != "path"} for s in specs]  # each spec keeps its own options
    assert [len(read_pool(d["path"], d["field_messages"])) for d in kept] == [10, 10]
    report = json.loads(Path(kept[0]["path"] + ".scores.json").read_text())
    assert report["dtype"] == "bfloat16"
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    convs = [r["messages"] for r in rows[10:]]
    custom = answer_nll(base, tok, convs, chat_template=CUSTOM_TEMPLATE)
    default = answer_nll(base, tok, convs)
    got = [r["nll_aligned"] for r in report["rows"][10:]]
    assert got == pytest.approx(custom, rel=2e-2)  # bf16, batched otherwise
    assert max(abs(a - b) / b for a, b in zip(custom, default, strict=True)) > 0.1  # the template matters


def test_retain_selection_cache_key_covers_the_narrow_weights_and_template_kwargs(tmp_path, tiny_llama_dir):
    from axolotl_treft.args import treft_settings
    from axolotl_treft.defenses.retain_select import select_at_startup

    narrow = _narrow(tiny_llama_dir, tmp_path / "narrow", 0)
    spec = {"path": RETAIN, "type": "chat_template", "field_messages": "messages"}
    root = tmp_path / "prepared" / "treft_retain_select"

    def selected() -> set[str]:
        cfg = _startup_cfg(tmp_path, tiny_llama_dir, narrow, [spec])
        return {Path(d["path"]).name for d in select_at_startup(cfg, treft_settings(cfg).retain).datasets}

    one = selected()
    assert selected() == one and len(list(root.glob("*.jsonl"))) == 1  # the same inputs: reused
    _narrow(tiny_llama_dir, narrow, 1)  # the narrow model trained again, at the same path
    two = selected()
    assert two != one and len(list(root.glob("*.jsonl"))) == 2
    cfg = _startup_cfg(tmp_path, tiny_llama_dir, narrow, [spec], chat_template_kwargs={"enable_thinking": False})
    assert {Path(d["path"]).name for d in select_at_startup(cfg, treft_settings(cfg).retain).datasets} not in (one, two)


def test_retain_selection_refuses_spec_options_it_would_not_apply(tmp_path):
    from axolotl_treft.defenses.retain_select import check_pool_specs

    with pytest.raises(ValueError, match=r"treft.retain.datasets\[0\]: .* does not apply `message_property_mappings`"):
        check_pool_specs([{"path": RETAIN, "type": "chat_template",
                           "message_property_mappings": {"role": "from"}}], key="treft.retain.datasets")


def test_select_retain_names_a_missing_adapter_flag_and_path(tmp_path, capsys):
    argv = ["select-retain", "--pool", RETAIN, "--base-model", str(tmp_path), "--top", "0.5",
            "--out", str(tmp_path / "o.jsonl")]
    for extra, message in (([], "one of the arguments --narrow-model --narrow-adapter is required"),
                           (["--narrow-adapter", str(tmp_path / "missing")],
                            f"argument --narrow-adapter: {tmp_path / 'missing'} does not exist"),
                           (["--narrow-adapter", str(tmp_path)], "has no adapter_config.json")):
        with pytest.raises(SystemExit) as exit_:
            cli_main([*argv, *extra])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------------------------------- stopping


def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1",
               CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen([str(BIN / "axolotl-treft"), *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if text in line:
            return seen
    pytest.fail(f"{text!r} never printed; output:\n{seen[-3000:]}")


def _tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


@pytest.mark.slow
def test_sigterm_stops_the_training_tree_and_a_rerun_retrains(tmp_path, tiny_llama_dir):
    """A real study (the tiny random Llama with SmolLM2's tokenizer: the stop is what is checked) killed while
    Axolotl trains, then run again."""
    cfg = user_config(tmp_path, tiny_llama_dir)
    out = tmp_path / "out"
    argv = ["study", str(cfg), "--runs", "sft", "--tasks", "offtopic_abstention", "--limit", "2",
            "--max-gen-toks", "8", "--device", "cpu", "--out", str(out)]
    proc = _start([*argv, "--max-steps", "500"], tmp_path)
    _wait_for(proc, "[sft] step 1:", 900)
    tree = _tree(proc.pid)
    assert any("axolotl" in " ".join(p.cmdline()) for p in tree)
    proc.send_signal(signal.SIGTERM)  # to the study only, as `timeout` or a scheduler sends it
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    assert "stopped by SIGTERM" in err and str(out / "sft") in err
    assert (out / "sft" / "UNFINISHED").read_text().startswith("training stopped by SIGTERM at ")
    assert not (out / "sft" / "train.json").exists()
    again = subprocess.run([str(BIN / "axolotl-treft"), *argv, "--max-steps", "2"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[sft] training: " in again.stdout and "training already finished" not in again.stdout
    assert json.loads((out / "sft" / "train.json").read_text())["steps"] == 2
    assert not (out / "sft" / "UNFINISHED").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_stop_the_running_child_tree(tmp_path, sig):
    """The same handling for the other stop signals, here while the validation child runs (no training)."""
    proc = _start(["study", str(user_config(tmp_path)), "--runs", "sft", "--dry-run", "--out", str(tmp_path / "o")],
                  tmp_path)
    _wait_for(proc, "Checking 1 derived configs", 300)
    time.sleep(1)
    tree = _tree(proc.pid)
    assert tree
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and f"stopped by {signal.Signals(sig).name}" in err
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive
