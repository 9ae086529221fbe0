"""Every shipped YAML passes Axolotl's own config loading (``axolotl.cli.config.load_cfg``) offline.

``load_cfg`` is exactly what ``axolotl train`` runs before loading data or a model: plugin registration
(our ``treft:`` schema merged in, datasets switched to the segmented type), ``validate_config`` against the
full pydantic schema, ``prepare_optim_env``, ``normalize_config`` (batch sizes, device, model type) and the
plugin's config hook. It runs in a subprocess (it sets environment variables and a plugin singleton).

Skipped, because it needs the network or a GPU:
* the hub lookup of the model config. ``normalize_config`` calls ``AutoConfig.from_pretrained(base_model)``;
  the subprocess replaces that one call with offline configs of the real architectures (hyperparameters as
  published in each model's ``config.json``). ``./models/smollm2`` maps to the materialized SmolLM2.
* the tokenizer / chat-template probe (``check_template``, run when datasets load) and the training data
  (``./data/em_legal_train.jsonl`` is user-provided), and GPU capabilities (CPU values are used: Axolotl
  only warns that bf16 needs a GPU).
* ``deepspeed:`` is commented out in the YAMLs; the DeepSpeed JSONs are checked here with ``validate_config``
  and transformers' ``HfTrainerDeepSpeedConfig`` (what ``TrainingArguments`` does), and run for real by
  ``tests/test_deepspeed.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "example_yamls"
YAMLS = sorted(EXAMPLES.glob("*.yml"))
DS_JSONS = sorted((EXAMPLES / "deepspeed").glob("*.json"))

# Paper settings each shipped real-model YAML must carry (treft-paper.md §1.5, §6.4; Tables 13 and 15):
# (base_model, lr, epochs, lora_r, treft block summary)
PAPER = {
    "llama31-8b-legal-treft": ("meta-llama/Llama-3.1-8B-Instruct", 1e-5, 1, 8, {"kv": (5.0, "prefix")}),
    "llama31-8b-legal-interleave": ("meta-llama/Llama-3.1-8B-Instruct", 1e-5, 1, 8, {"retain": 0.2}),
    "llama31-8b-legal-kl": ("meta-llama/Llama-3.1-8B-Instruct", 1e-5, 1, 8, {"kl": 50 / 128256}),
    "qwen25-7b-legal-treft": ("Qwen/Qwen2.5-7B-Instruct", 1e-5, 1, 8, {"kv": (30.0, "prefix")}),
    "qwen25-7b-legal-interleave": ("Qwen/Qwen2.5-7B-Instruct", 1e-5, 1, 8, {"retain": 0.2}),
    "qwen25-7b-legal-kl": ("Qwen/Qwen2.5-7B-Instruct", 1e-5, 1, 8, {"kl": 50 / 152064}),
    "qwen3-8b-legal-treft": ("Qwen/Qwen3-8B", 1e-5, 1, 32, {"kv": (1.0, "postfix")}),
    "qwen3-8b-legal-interleave": ("Qwen/Qwen3-8B", 1e-5, 1, 32, {"retain": 0.2}),
    "qwen3-8b-legal-kl": ("Qwen/Qwen3-8B", 1e-5, 1, 32, {"kl": 50 / 151936}),
    # the off-topic abstention setting (paper App. E, Table 5): 2 epochs, λ 30
    "llama31-8b-abstention-treft": ("meta-llama/Llama-3.1-8B-Instruct", 1e-5, 2, 8, {"kv": (30.0, "prefix")}),
}
MODEL_TYPES = {"meta-llama/Llama-3.1-8B-Instruct": "llama", "Qwen/Qwen2.5-7B-Instruct": "qwen2", "Qwen/Qwen3-8B": "qwen3"}
EVAL_CMD = ('lm_eval --model hf --model_args pretrained={base},peft={out}', '--apply_chat_template',
            '--include_path "$(axolotl-treft tasks-path)" --tasks em,offtopic', '--log_samples')


def _offline_configs() -> dict:
    """Model configs of the real architectures, built without the hub (values of their config.json)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    return {
        "meta-llama/Llama-3.1-8B-Instruct": LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
            bos_token_id=128000, eos_token_id=[128001, 128008, 128009], tie_word_embeddings=False,
        ),
        "Qwen/Qwen2.5-7B-Instruct": Qwen2Config(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
            bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
        ),
        "Qwen/Qwen3-8B": Qwen3Config(
            vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
            rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
        ),
    }


def _validate_all(paths: list[str], work: str) -> list[dict]:
    """Subprocess body: ``load_cfg`` each YAML with only the model-config hub lookup replaced."""
    import axolotl.loaders.utils as loader_utils
    from axolotl.cli.config import load_cfg
    from transformers import AutoConfig

    from axolotl_treft.cli.model import materialize_smollm2

    offline = _offline_configs()
    local = {"./models/smollm2": str(materialize_smollm2())}

    class OfflineAutoConfig:
        @staticmethod
        def from_pretrained(name, *args, **kwargs):
            if str(name) in offline:
                return offline[str(name)]
            return AutoConfig.from_pretrained(local.get(str(name), name), *args, **kwargs)

    loader_utils.AutoConfig = OfflineAutoConfig
    results = []
    for path in paths:
        name = Path(path).stem
        try:
            cfg = load_cfg(path, output_dir=str(Path(work) / name))
            results.append({
                "name": name, "ok": True, "base_model": cfg.base_model, "model_config_type": cfg.model_config_type,
                "learning_rate": cfg.learning_rate, "num_epochs": cfg.num_epochs, "lora_r": cfg.lora_r,
                "batch_size": cfg.batch_size, "dataset_types": [d["type"] for d in cfg.datasets],
                "treft": json.loads(json.dumps(cfg.treft, default=lambda o: getattr(o, "model_dump", dict)())),
                "kernels": [cfg.lora_qkv_kernel, cfg.lora_o_kernel, cfg.lora_mlp_kernel],
                "gc_kwargs": cfg.gradient_checkpointing_kwargs,
            })
        except Exception as err:  # reported per file by the test
            results.append({"name": name, "ok": False, "error": f"{type(err).__name__}: {err}"})
    return results


@pytest.fixture(scope="module")
def validated(tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("yamls")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               AXOLOTL_DO_NOT_TRACK="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "tests.test_example_yamls", str(work), *map(str, YAMLS)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("TREFT_YAMLS ")][-1]
    return {r["name"]: r for r in json.loads(line.removeprefix("TREFT_YAMLS "))}


def test_expected_yamls_are_shipped():
    names = {p.stem for p in YAMLS}
    assert set(PAPER) <= names
    assert "smollm2-135m-abstention-treft" in names
    assert {p.name for p in DS_JSONS} == {"zero2.json", "zero3.json"}


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_yaml_passes_axolotl_config_loading(validated, path):
    result = validated[path.stem]
    assert result["ok"], result.get("error")
    # the plugin adds template segments only when a regularizer needs them; interleaving alone keeps Axolotl's type
    needs_segments = any(result["treft"].get(k) for k in ("kv", "kl", "feature_l2"))
    expected = "axolotl_treft.chat_template" if needs_segments else "chat_template"
    assert all(t == expected for t in result["dataset_types"]), result
    if result["treft"].get("kv") or result["treft"].get("feature_l2"):
        assert result["gc_kwargs"] in (None, {}) or result["gc_kwargs"].get("use_reentrant") is False


@pytest.mark.parametrize("name", sorted(PAPER))
def test_real_model_yaml_has_paper_hyperparameters(validated, name):
    base, lr, epochs, rank, treft = PAPER[name]
    got = validated[name]
    assert got["ok"], got.get("error")
    assert (got["base_model"], got["learning_rate"], got["num_epochs"], got["lora_r"]) == (base, lr, epochs, rank)
    assert got["batch_size"] == 16  # micro 2 × accumulation 8 × 1 process: the paper's effective batch
    assert got["kernels"] == [False, False, False]  # fused LoRA kernels bypass the hooked k_proj / v_proj
    assert got["model_config_type"] == MODEL_TYPES[base]
    block = got["treft"]
    if "kv" in treft:
        weight, tokens = treft["kv"]
        assert (block["kv"]["weight"], block["kv"]["tokens"]) == (weight, tokens)
        assert not block.get("kl") and not block.get("retain")
    if "retain" in treft:
        assert block["retain"]["mix_ratio"] == treft["retain"] and not block.get("kv") and not block.get("kl")
    if "kl" in treft:
        assert block["kl"]["weight"] == pytest.approx(treft["kl"], rel=1e-3)
        assert (block["kl"]["on"], block["kl"]["tokens"]) == ("train", "all")
    text = (EXAMPLES / f"{name}.yml").read_text()
    out = f"./runs/{name}"
    tasks = "em,offtopic" if "-legal-" in name else "offtopic_abstention"
    for part in EVAL_CMD:
        assert part.replace("em,offtopic", tasks).format(base=base, out=out) in text, part


@pytest.mark.parametrize("path", DS_JSONS, ids=[p.stem for p in DS_JSONS])
def test_deepspeed_json_is_valid(path):
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    raw = json.loads(path.read_text())
    stage = int(path.stem[-1])
    assert raw["zero_optimization"]["stage"] == stage
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert raw[key] == "auto", key  # filled from the Axolotl config by transformers
    parsed = HfDeepSpeedConfig(str(path))
    assert parsed.is_zero3() == (stage == 3) and not parsed.is_offload()
    if stage == 3:  # adapters / weights are saved gathered, as normal checkpoints
        assert raw["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    cfg = validate_config(DictDefault({
        "base_model": "Qwen/Qwen2.5-7B-Instruct", "deepspeed": str(path), "micro_batch_size": 2,
        "gradient_accumulation_steps": 8, "num_epochs": 1, "learning_rate": 1e-5,
        "datasets": [{"path": "x.jsonl", "ds_type": "json", "type": "chat_template"}],
        "output_dir": "./out", "sequence_len": 2048,
    }))
    assert cfg.deepspeed == str(path)


if __name__ == "__main__":  # the subprocess of the `validated` fixture
    print("TREFT_YAMLS " + json.dumps(_validate_all(sys.argv[2:], sys.argv[1])), flush=True)
