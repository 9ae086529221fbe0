"""2-process DeepSpeed ZeRO-2 / ZeRO-3 runs of the plugin on CPU, through the real ``axolotl train`` CLI.

Each run is ``axolotl train cfg.yml --launcher torchrun -- --nproc_per_node 2`` with our shipped
``example_yamls/deepspeed/zero{2,3}.json``, DeepSpeed's CPU accelerator and gloo collectives, on a tiny
random Llama (2 layers, hidden 64, SmolLM2's tokenizer and chat template). ``tests/ds_cpu_shim.py`` lets
accelerate count CPU processes under DeepSpeed and prints what ran on every rank (engine, ZeRO stage,
partitioned parameters, selected tokens, prefix-cache checksum); ``tests/ds_harness.py`` runs and parses.

What is checked:
* the model (and, for full finetuning, the frozen reference) is wrapped by a DeepSpeed engine, with
  parameters partitioned under ZeRO-3 and replicated under ZeRO-2; world size 2;
* the loss curve of a 2-process run (micro-batch 2 per rank) matches a single-process run of the same
  global batch (micro-batch 4, no DeepSpeed), step by step, within ``LOSS_ATOL``, also with gradient
  accumulation; the regularizer terms too (they are means over equally sized per-sample token sets here,
  so rank means average to the global mean);
* the cached prefix reference is bit-identical on both ranks (and equal to the single-process one);
* every token mode, KL on train and on retain, feature L2 and interleaving run under both stages;
* a run where one rank's batch has no regularized token completes (hang guard, subprocess timeout);
* the adapter saved by a ZeRO-3 run is a normal PEFT adapter equal to the single-process one (SafeLoRA
  runs on it when ``axolotl_treft.defenses.safelora`` is present);
* LoRA + ZeRO-3 + gradient checkpointing fails fast with an actionable message (DeepSpeed 0.18 bug).

Opt-in: the ten runs take about 8 minutes on 2 CPU cores (the first one also JIT-builds DeepSpeed's
shared-memory comm op, ~2 minutes, cached in ``~/.cache/torch_extensions``). Set ``TREFT_RUN_DEEPSPEED=1``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

from tests import ds_harness as h

_RUN_MARKS = [
    pytest.mark.deepspeed,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("TREFT_RUN_DEEPSPEED") != "1",
                       reason="2-process DeepSpeed runs take ~8 min; set TREFT_RUN_DEEPSPEED=1"),
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]


def ds_run(test):
    """Marks a test that launches 2-process DeepSpeed runs (opt-in)."""
    for mark in _RUN_MARKS:
        test = mark(test)
    return test


LOSS_ATOL = 1e-4  # observed |Δloss| <= 1e-6 (fp32, different reduction order); per-step loss change ~3e-2
TERM_ATOL, TERM_RTOL = 1e-6, 1e-3
HANG_TIMEOUT = 420  # s; a healthy hang-guard run takes ~50 s here

RETAIN = [{"path": str(h.REPO / "axolotl_treft" / "data" / "retain_general.jsonl"), "ds_type": "json",
           "type": "chat_template", "field_messages": "messages"}]
FULL_FT = {"adapter": None, "lora_r": None, "lora_alpha": None, "lora_dropout": None, "lora_target_linear": None,
           "lora_mlp_kernel": None, "lora_qkv_kernel": None, "lora_o_kernel": None, "lora_embedding_kernel": None,
           "learning_rate": 1e-4}
PLUGINS = [h.SEED, h.PLUGIN]  # SeedModelLoad pins the LoRA init, so runs compare step by step

# LoRA, TReFT prefix (cached reference) + LDIFS (adapter-disabled reference pass every micro-step),
# 2 accumulation steps (global batch 8: 2 per rank × 2 ranks × 2, or 4 × 1 process × 2)
LORA_PREFIX = {"plugins": PLUGINS, "max_steps": 3, "gradient_accumulation_steps": 2, "treft": {
    "kv": {"weight": 5.0, "tokens": "prefix"},
    "feature_l2": {"weight": 1.0, "layers": 2},
}}
# Full finetuning: prefix cache built from the policy at step 0, plus KL and LDIFS against a frozen copy
FULL_REGS = {**FULL_FT, "plugins": PLUGINS, "max_steps": 3, "treft": {
    "kv": {"weight": 5.0, "tokens": "prefix"},
    "kl": {"weight": 1.0, "on": "train", "tokens": "response"},
    "feature_l2": {"weight": 1.0, "layers": 2},
}}
CASES: dict[str, tuple[dict, str | None]] = {
    "lora_single": ({**LORA_PREFIX, "micro_batch_size": 4}, None),
    "lora_zero2": (LORA_PREFIX, "zero2"),
    "lora_zero3": (LORA_PREFIX, "zero3"),
    "full_single": ({**FULL_REGS, "micro_batch_size": 4}, None),
    "full_zero2": (FULL_REGS, "zero2"),
    "full_zero3": (FULL_REGS, "zero3"),
    # LoRA: adapter-disabled reference passes every step, KL on retain (own forwards), interleaving
    "retain_zero3": ({"plugins": PLUGINS, "max_steps": 3, "treft": {
        "kv": {"weight": 5.0, "tokens": "prefix_postfix"},
        "kl": {"weight": 0.5, "on": "retain", "tokens": "response"},
        "retain": {"datasets": RETAIN, "mix_ratio": 0.2},
    }}, "zero3"),
    "retain_zero2": ({"plugins": PLUGINS, "max_steps": 3, "treft": {
        "kv": {"weight": 5.0, "tokens": "all"},
        "feature_l2": {"weight": 1.0, "layers": 2},
        "kl": {"weight": 0.5, "on": "retain", "tokens": "all"},
        "retain": {"datasets": RETAIN, "mix_ratio": 0.2},
    }}, "zero2"),
}

_RUNS: dict[str, h.DSRun] = {}


@pytest.fixture(scope="module")
def run_case(tmp_path_factory, tiny_llama_dir):
    """Run a case once per session and share the result between tests."""

    def get(name: str) -> h.DSRun:
        if name not in _RUNS:
            overrides, stage = CASES[name]
            _RUNS[name] = h.run(tmp_path_factory.mktemp(name), tiny_llama_dir, overrides, stage)
            print(f"\n[deepspeed] {name}: {_RUNS[name].seconds:.1f} s")
        return _RUNS[name]

    return get


def ok(run: h.DSRun, stage: int | None, steps: int) -> h.DSRun:
    assert run.returncode == 0, h.tail(run)
    assert len(run.steps) == steps, h.tail(run)
    if stage is not None:
        for rank in (0, 1):
            probe = run.probe(rank, 1)
            assert probe["world"] == 2 and probe["engine"] == "DeepSpeedEngine" and probe["zero_stage"] == stage
            partitioned, total = probe["policy_partitioned"]
            assert (partitioned > 0) if stage == 3 else (partitioned == 0), probe
    return run


def logged_loss_is_sft_plus_terms(run: h.DSRun, weights: dict[str, float]) -> None:
    for step in run.steps:  # the treft/* terms are rank means, like HF's loss
        expected = step["treft/sft"] + sum(w * step[f"treft/{k}"] for k, w in weights.items())
        assert step["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-5), step


def same_curve(multi: h.DSRun, single: h.DSRun, terms: list[str]) -> None:
    assert [s["step"] for s in multi.steps] == [s["step"] for s in single.steps]
    for a, b in zip(multi.steps, single.steps, strict=True):
        assert abs(a["loss"] - b["loss"]) <= LOSS_ATOL, (a, b)
        assert a["treft/sft"] == pytest.approx(b["treft/sft"], abs=LOSS_ATOL)
        for term in terms:
            assert a[f"treft/{term}"] == pytest.approx(b[f"treft/{term}"], rel=TERM_RTOL, abs=TERM_ATOL), term


def cache_identical_on_ranks(run: h.DSRun, single: h.DSRun) -> None:
    caches = {json.dumps(p["kv_cache"]) for p in run.probes}
    assert len(caches) == 1, caches  # both ranks, every step
    assert caches == {json.dumps(single.probe(0, 1)["kv_cache"])}
    assert "cached reference K/V for 1 distinct prefix(es)" in run.log


# --------------------------------------------------------------------------------------- LoRA, TReFT prefix


@ds_run
@pytest.mark.parametrize(("name", "stage"), [("lora_zero2", 2), ("lora_zero3", 3)])
def test_lora_prefix_matches_single_process(run_case, name, stage):
    single = ok(run_case("lora_single"), None, 3)
    multi = ok(run_case(name), stage, 3)
    same_curve(multi, single, ["kv", "feature_l2"])
    logged_loss_is_sft_plus_terms(multi, {"kv": 5.0, "feature_l2": 1.0})
    cache_identical_on_ranks(multi, single)
    for term in ("kv", "feature_l2"):
        assert multi.steps[0][f"treft/{term}"] == 0.0 and multi.steps[-1][f"treft/{term}"] > 1e-4, term
    assert all(p["kv_selected"] == 48 for p in multi.probes)  # 2 samples × 24 prefix tokens on each rank


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


@ds_run
def test_zero3_saved_adapter_is_a_normal_peft_adapter(run_case, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    single = ok(run_case("lora_single"), None, 3)
    multi = ok(run_case("lora_zero3"), 3, 3)
    assert (multi.output_dir / "adapter_config.json").is_file()
    a, b = _adapter(multi.output_dir), _adapter(single.output_dir)
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for key in a:  # gathered full tensors (not ZeRO-3 shards) equal to the single-process training result
        assert a[key].shape == b[key].shape and a[key].numel() > 0, key
        assert (a[key] - b[key]).abs().max() <= 1e-5, key
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), multi.output_dir)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


@ds_run
def test_safelora_on_zero3_adapter(run_case, tiny_llama_dir, tmp_path):
    safelora = pytest.importorskip("axolotl_treft.defenses.safelora", reason="SafeLoRA not in this checkout yet")
    import torch
    from transformers import AutoModelForCausalLM

    multi = ok(run_case("lora_zero3"), 3, 3)
    aligned = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a stand-in for the aligned model: every non-embedding weight moved a little
        for name, p in aligned.named_parameters():
            if "embed" not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    aligned.save_pretrained(tmp_path / "aligned")
    result = safelora.run_safelora(multi.output_dir, tiny_llama_dir, tmp_path / "aligned", tmp_path / "projected",
                                   safelora.SafeLoRASettings(select="top_k", top_k=2))
    assert result.report["num_projected"] == 2
    assert (tmp_path / "projected" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------- full finetuning, frozen reference


@ds_run
@pytest.mark.parametrize(("name", "stage"), [("full_zero2", 2), ("full_zero3", 3)])
def test_full_finetune_frozen_reference_matches_single_process(run_case, name, stage):
    single = ok(run_case("full_single"), None, 3)
    multi = ok(run_case(name), stage, 3)
    assert "loading a frozen reference copy" in multi.log
    for probe in multi.probes:  # the frozen copy is wrapped by DeepSpeed: sharded under ZeRO-3, replicated under 2
        assert probe["frozen_reference"] == "DeepSpeedEngine", probe
        partitioned, _total = probe["frozen_partitioned"]
        assert (partitioned > 0) if stage == 3 else (partitioned == 0), probe
    same_curve(multi, single, ["kv", "kl", "feature_l2"])
    logged_loss_is_sft_plus_terms(multi, {"kv": 5.0, "kl": 1.0, "feature_l2": 1.0})
    cache_identical_on_ranks(multi, single)  # built from the policy itself at step 0
    for term in ("kv", "kl", "feature_l2"):
        assert abs(multi.steps[0][f"treft/{term}"]) < 1e-6 and multi.steps[-1][f"treft/{term}"] > 1e-6, term


# ----------------------------------------------------------------- per-step reference, KL on retain, interleaving


@ds_run
@pytest.mark.parametrize(("name", "stage", "terms"), [
    ("retain_zero3", 3, ["kv", "kl"]),
    ("retain_zero2", 2, ["kv", "kl", "feature_l2"]),
])
def test_per_step_reference_kl_on_retain_and_interleaving(run_case, name, stage, terms):
    run = ok(run_case(name), stage, 3)
    match = re.search(r"training mix = (\d+) train \+ (\d+) retain", run.log)
    assert match and (int(match.group(1)), int(match.group(2))) == (240, 60)
    assert "cached reference K/V" not in run.log  # these token modes need a reference pass every step
    for term in terms:
        values = run.series(f"treft/{term}")
        assert len(values) == 3 and values[-1] > 0, (term, values)
    overrides, _ = CASES[name]
    logged_loss_is_sft_plus_terms(run, {k: v["weight"] for k, v in overrides["treft"].items() if k != "retain"})


# ------------------------------------------------------------------------------------------------- hang guard


@ds_run
def test_rank_without_regularized_tokens_does_not_hang(tmp_path, tiny_llama_dir):
    """ZeRO-3, TReFT on query tokens: step 1 gives rank 0 the only sample with a query, rank 1 none.

    Rank 1 must still run the (collective, parameter-gathering) adapter-disabled reference pass, or the
    two ranks' all-gathers pair up wrongly and the run hangs or crashes.
    """
    data = tmp_path / "one_query.jsonl"
    # rows 8+ are never reached in 2 steps; they keep the share of samples without query tokens under half
    # (more would be refused at start-up as a template problem)
    rows = [{"messages": [{"role": "user", "content": "Can my landlord keep my deposit?" if i == 0 or i >= 8 else ""},
                          {"role": "assistant", "content": "I have no idea about your question."}]} for i in range(17)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = h.run(tmp_path / "run", tiny_llama_dir, {
        "plugins": PLUGINS, "treft": {"kv": {"weight": 5.0, "tokens": "query"}},
        "datasets": [{"path": str(data), "ds_type": "json", "type": "chat_template", "field_messages": "messages"}],
        "curriculum_sampling": True, "shuffle_merged_datasets": False, "max_steps": 2,
    }, "zero3", timeout=HANG_TIMEOUT)
    print(f"\n[deepspeed] hang guard: {run.seconds:.1f} s")
    assert run.returncode is not None, f"hung: killed after {HANG_TIMEOUT} s\n{h.tail(run)}"
    ok(run, 3, 2)
    selected = {rank: run.probe(rank, 1)["kv_selected"] for rank in (0, 1)}
    assert selected[1] == 0 and selected[0] > 0, selected  # the asymmetric step really happened
    assert all(p["kv_selected"] == 0 for p in run.probes if p["step"] == 2)


# ------------------------------------------------------------------------------- known DeepSpeed 0.18 limitation


@ds_run
def test_lora_zero3_gradient_checkpointing_fails_fast(tmp_path, tiny_llama_dir):
    import deepspeed
    from packaging.version import Version

    if Version(deepspeed.__version__) >= Version("0.19.3"):
        pytest.skip("the check only applies to deepspeed < 0.19.3")
    run = h.run(tmp_path, tiny_llama_dir, {**LORA_PREFIX, "gradient_checkpointing": True, "max_steps": 1}, "zero3")
    assert run.returncode not in (0, None)
    assert "deepspeedai/DeepSpeed#8148" in run.log and "CheckpointError" not in run.log
    assert not run.steps


@ds_run
def test_lora_zero3_gradient_checkpointing_trains_with_the_fixed_deepspeed(tmp_path, tiny_llama_dir, run_case):
    """From deepspeed 0.19.3 the combination is allowed and matches the run without checkpointing."""
    import deepspeed
    from packaging.version import Version

    if Version(deepspeed.__version__) < Version("0.19.3"):
        pytest.skip("needs deepspeed >= 0.19.3 (the release with deepspeedai/DeepSpeed#8148)")
    run = h.run(tmp_path, tiny_llama_dir, {**LORA_PREFIX, "gradient_checkpointing": True}, "zero3")
    ok(run, 3, 3)
    plain = run_case("lora_zero3")
    assert run.series("loss") == pytest.approx(plain.series("loss"), abs=LOSS_ATOL)
    for term in ("treft/kv", "treft/feature_l2"):
        assert run.series(term) == pytest.approx(plain.series(term), rel=TERM_RTOL, abs=TERM_ATOL)


# ----------------------------------------- fast checks of the shared-module fixes these runs needed (always run)


def test_capture_replays_only_on_the_recompute_shape():
    """After an armed forward with grad, other forwards through the hooked modules (a reference pass on a
    shorter sub-batch, a retain batch) must not replay the armed indices (IndexError before the fix)."""
    from axolotl_treft.capture import ActivationCapture

    torch = pytest.importorskip("torch")
    layer = torch.nn.Linear(4, 4)
    cap = ActivationCapture([layer])
    with cap.armed(torch.tensor([3, 19])) as outs:
        layer(torch.randn(2, 10, 4))
    assert outs[0].shape == (2, 4)
    with torch.no_grad():
        layer(torch.randn(1, 5, 4))  # smaller: skipped, no IndexError
    layer(torch.randn(2, 10, 4))  # the recompute shape: replayed (and discarded)
    cap.release()
    layer(torch.randn(1, 5, 4))
    cap.remove()


def test_cached_prefix_kv_with_another_reference_user_and_checkpointing(tiny_llama_dir, smollm2_tokenizer):
    """LoRA, TReFT prefix (cached, no own reference pass) + LDIFS (needs one), with non-reentrant gradient
    checkpointing and a padded batch wider than the reference sub-batch: the KV term equals the cached-only
    value and backward (with the checkpoint recompute) works."""
    import torch
    from datasets import Dataset

    from axolotl_treft.args import FeatureL2Config, KVConfig
    from axolotl_treft.reference import Reference
    from axolotl_treft.regularizers.base import StepBatch, capture_policy, regularized_terms
    from axolotl_treft.regularizers.feature_l2 import FeatureL2Regularizer
    from axolotl_treft.regularizers.kv import KVRegularizer
    from axolotl_treft.spans import conversation_spans
    from tests.reg_harness import CONVS, fake_trainer, lora_model, padded_batch

    spans = [conversation_spans(smollm2_tokenizer, c) for c in CONVS]
    dataset = Dataset.from_dict({"input_ids": [s.input_ids for s in spans],
                                 "treft_segments": [s.segments for s in spans]})
    inputs, segments = padded_batch(smollm2_tokenizer, CONVS)
    pad = 24  # right padding beyond every sample: the LDIFS sub-batch is shorter than the batch
    inputs = {k: torch.nn.functional.pad(v, (0, pad), value=-100 if k == "labels" else 0) for k, v in inputs.items()}
    segments = torch.nn.functional.pad(segments, (0, pad), value=-1)

    def step(with_feature: bool):
        model = lora_model(tiny_llama_dir)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        reference = Reference(fake_trainer(model))
        regs = [KVRegularizer(KVConfig(weight=1.0, tokens="prefix"), train_dataset=dataset)]
        if with_feature:
            regs.append(FeatureL2Regularizer(FeatureL2Config(weight=1.0, layers=2)))
        for reg in regs:
            reg.setup(model, reference)
        assert regs[0]._cache is not None
        batch = StepBatch.from_inputs(inputs, segments)
        with capture_policy(regs, batch) as states:
            out = model(**inputs, use_cache=False)
        terms = regularized_terms(reference, batch, regs, states, out, model)
        (out.loss + sum(terms)).backward()
        for reg in regs:
            reg.end_step()
            reg.close()
        return [float(t.detach()) for t in terms]

    kv_alone = step(False)[0]
    kv, feature = step(True)
    assert kv == pytest.approx(kv_alone, rel=1e-6) and kv > 1e-4
    assert feature > 0
