"""Shared fixtures: the embedded SmolLM2 model and a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _split_cpu_threads_between_workers() -> None:
    """Give each xdist worker (and every process it starts) its share of the cores as OpenMP/MKL threads.

    Left alone, every training and lm-eval process starts one intra-op thread per core, so two workers on
    two cores run four spinning threads: measured here, a pair of SmolLM2 training tests took 232 s and 240 s
    side by side with the default threads and 72 s and 84 s with one thread each. Explicit settings win.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = str(max(1, (os.cpu_count() or 1) // workers))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, share)


_split_cpu_threads_between_workers()

REPO = Path(__file__).resolve().parents[1]

# The files with the suite's longest chains of training and lm-eval processes, longest first. Under two xdist
# workers (whole files each, in collection order: pyproject's addopts) they start first, so neither worker is
# left alone with one of them at the end; every other file follows in its usual order.
LONGEST_FIRST = ("test_demo.py", "test_families_e2e.py", "test_study.py", "test_study_reliability.py", "test_monitor.py",
                 "test_train_e2e.py", "test_evals.py", "test_resume.py", "test_diagnose.py", "test_defenses_e2e.py",
                 "test_reliability_e2e.py", "test_regularizers_e2e.py", "test_constrained_sft.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: a file keeps its order


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory (materialized once into the user cache)."""
    from axolotl_treft.cli.model import materialize_smollm2

    return materialize_smollm2()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer random Llama (GQA, hidden 64) sharing SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,  # padding_idx would zero the embedding of <|im_end|>, a template token
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_lora_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A LoRA adapter (r=4 on q/v) for SmolLM2 whose lora_B is small random non-zero, so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("smollm2-lora")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    from tests.reg_harness import randomize_lora_b

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(peft_model, 0.05).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def wheel_env(tmp_path_factory):
    """The built wheel installed (``--no-deps``) in a fresh venv that sees the dependencies, not the checkout."""
    from tests.wheel_env import make_wheel_env

    env, _build_log = make_wheel_env(tmp_path_factory.mktemp("wheel"))
    return env
