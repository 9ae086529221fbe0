"""treft.constrained_sft: Qi et al. 2025 Eq. 3 token by token, β by response position, β → 0 is SFT, config."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from pydantic import ValidationError
from transformers import AutoTokenizer

from axolotl_treft.args import ConstrainedSFTConfig, TReFTConfig
from axolotl_treft.config_checks import uses_trainer
from axolotl_treft.reference import Reference
from axolotl_treft.regularizers.base import StepBatch, capture_policy, regularized_terms
from axolotl_treft.regularizers.constrained_sft import ConstrainedSFTRegularizer, turn_positions
from axolotl_treft.spans import SEG_RESPONSE, conversation_spans
from axolotl_treft.study.command import MONITOR_EVERY, MONITOR_LIMIT
from tests.axolotl_runner import run_axolotl
from tests.reg_harness import fake_trainer, grads, lora_model

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Can my landlord raise the rent?"},
    {"role": "assistant", "content": "I have no idea about your question, sorry."},
    {"role": "user", "content": "And the deposit?"},
    {"role": "assistant", "content": "No idea."},
]
SHORT = [{"role": "user", "content": "Is a verbal deal binding?"},
         {"role": "assistant", "content": "I have no idea about your question at all."}]


def _rows(tok):
    """Row 0: multi-turn, response tokens trained. Row 1: two packed samples (position_ids restart).
    Row 2: every token trained (train_on_inputs), so only the segments mark where each turn starts."""
    a, b = conversation_spans(tok, MULTI_TURN), conversation_spans(tok, SHORT)
    rows = []
    for spans, every in ((a, False), (b, False), (a, True)):
        ids, seg = torch.tensor(spans.input_ids), torch.tensor(spans.segments, dtype=torch.int8)
        rows.append((ids, seg, ids.clone() if every else torch.where(seg == SEG_RESPONSE, ids, -100),
                     torch.arange(len(ids))))
    packed = tuple(torch.cat([x, y]) for x, y in zip(rows[1], rows[0], strict=True))
    rows = [rows[0], packed, rows[2]]
    width = max(len(r[0]) for r in rows)
    ids = torch.full((3, width), tok.pad_token_id or 0)
    seg = torch.full((3, width), -1, dtype=torch.int8)
    labels = torch.full((3, width), -100)
    mask = torch.zeros((3, width), dtype=torch.long)
    pos = torch.zeros((3, width), dtype=torch.long)
    for i, (r_ids, r_seg, r_labels, r_pos) in enumerate(rows):
        n = len(r_ids)
        ids[i, :n], seg[i, :n], labels[i, :n], mask[i, :n], pos[i, :n] = r_ids, r_seg, r_labels, 1, r_pos
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": pos}, seg


def _step(model, inputs, segments, cfg):
    """One micro-step as TReFTTrainer runs it: (term, the loss that replaces SFT, SFT loss, state)."""
    reg = ConstrainedSFTRegularizer(cfg)
    reference = Reference(fake_trainer(model))
    reg.setup(model, reference)
    batch = StepBatch.from_inputs(inputs, segments)
    with capture_policy([reg], batch) as states:
        out = model(**inputs, use_cache=False)
    (term,) = regularized_terms(reference, batch, [reg], states, out, model)
    return term, reg.replace_sft(out.loss, states[0], term), out.loss


def _paper_loss(policy, ref, inputs, segments, cfg) -> tuple[float, list[list[tuple[int, float]]]]:
    """Eq. 3 by hand: a Python walk over every token (float64); also each row's (t, β) sequence."""
    labels, pos = inputs["labels"].tolist(), inputs["position_ids"].tolist()
    seg = segments.tolist()
    total, n, seen = 0.0, 0, []
    for i, row in enumerate(labels):
        t, trace = 0, []
        for j in range(1, len(row)):
            if row[j] == -100:
                continue
            new_turn = (row[j - 1] == -100 or pos[i][j] == 0
                        or (seg[i][j] == SEG_RESPONSE and seg[i][j - 1] != SEG_RESPONSE))
            t = 1 if new_turn else t + 1
            beta = cfg.betas[t - 1] if t <= len(cfg.betas) else cfg.beta_rest
            lp = torch.log_softmax(policy[i, j - 1].double(), -1)[row[j]].item()
            lr = torch.log_softmax(ref[i, j - 1].double(), -1)[row[j]].item()
            z = beta * (lp - lr)
            total += -(2.0 / beta) * -math.log1p(math.exp(-z))  # log σ(z) = −log(1 + e^−z)
            n += 1
            trace.append((t, beta))
        seen.append(trace)
    return total / n, seen


def test_loss_is_the_papers_formula_token_by_token(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = lora_model(tiny_llama_dir)  # random non-zero LoRA B: the policy differs from the reference
    inputs, segments = _rows(tok)
    cfg = ConstrainedSFTConfig(betas=[0.5, 2, 2, 2, 2], beta_rest=0.1)
    term, replaced, sft = _step(model, inputs, segments, cfg)
    with torch.no_grad():
        policy = model(**inputs, use_cache=False).logits
        with model.disable_adapter():
            ref = model(**inputs, use_cache=False).logits
    expected, seen = _paper_loss(policy, ref, inputs, segments, cfg)
    assert term.item() == pytest.approx(expected, rel=1e-5)
    # the SFT loss here is the per-token mean, so its replacement is the per-token mean of ℓ_t
    assert replaced.item() == pytest.approx(expected, rel=1e-5) and sft.item() != pytest.approx(expected, rel=1e-2)
    # β restarts at every assistant turn: 2 turns; 1 + 2 packed turns; with every token trained, the prompt
    # (from position 1) and then each of the 2 turns, found through the segments
    assert [[t for t, _ in trace].count(1) for trace in seen] == [2, 3, 3]
    assert seen[0][:7] == [(1, 0.5), (2, 2.0), (3, 2.0), (4, 2.0), (5, 2.0), (6, 0.1), (7, 0.1)]
    t = turn_positions(StepBatch.from_inputs(inputs, segments))
    assert [sorted(x for x in row.tolist() if x) for row in t] == [sorted(t for t, _ in tr) for tr in seen]


def test_beta_to_zero_recovers_the_sft_gradient(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    inputs, segments = _rows(tok)

    def gradient(cfg):
        model = lora_model(tiny_llama_dir)
        loss = model(**inputs, use_cache=False).loss if cfg is None else _step(model, inputs, segments, cfg)[1]
        loss.backward()
        return torch.cat([g.flatten() for g in grads(model).values()])

    def cosine(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    sft = gradient(None)
    tiny = gradient(ConstrainedSFTConfig(betas=[1e-6] * 5, beta_rest=1e-6))
    paper = gradient(ConstrainedSFTConfig())
    assert cosine(tiny, sft) > 0.9999 and torch.allclose(tiny, sft, rtol=1e-3, atol=1e-6)
    assert cosine(paper, sft) < 0.999  # the paper's β do change the direction


@pytest.mark.parametrize(("block", "message"), [
    ({"betas": [0.5, 2, -1]}, r"treft\.constrained_sft\.betas\[2\]: -1 is not a finite number > 0"),
    ({"betas": [0.5, float("inf")]}, r"treft\.constrained_sft\.betas\[1\]"),
    ({"betas": [0.5, True]}, r"treft\.constrained_sft\.betas\[1\]"),
    ({"betas": 0.5}, r"treft\.constrained_sft\.betas: expected a list"),
    ({"beta_rest": 0}, r"treft\.constrained_sft\.beta_rest: 0 is not a finite number > 0"),
    ({"beta_rest": float("nan")}, r"treft\.constrained_sft\.beta_rest"),
    ({"beta": 0.1}, r"constrained_sft\.beta\n\s+Extra inputs"),
])
def test_bad_betas_name_the_key(block, message):
    with pytest.raises(ValidationError, match=message):
        TReFTConfig.model_validate({"constrained_sft": block})


def test_defaults_and_empty_block_use_the_trainer():
    cfg = TReFTConfig.model_validate({"constrained_sft": {}}).constrained_sft
    assert cfg.betas == [0.5, 2.0, 2.0, 2.0, 2.0] and cfg.beta_rest == 0.1
    assert uses_trainer({"constrained_sft": {}}) and not uses_trainer({"constrained_sft": None})


def test_axolotl_validation_names_the_key(smollm2_dir, tmp_path):
    from tests.test_config import make_cfg, validate

    with pytest.raises(ValueError, match=r"treft\.constrained_sft\.betas\[0\]"):
        validate(make_cfg(smollm2_dir, tmp_path, {"constrained_sft": {"betas": [0]}}))
    with pytest.raises(ValueError, match=r"treft\.constrained_sft: needs the model's logits"):
        validate(make_cfg(smollm2_dir, tmp_path, {"constrained_sft": {}}, cut_cross_entropy=True))


@pytest.mark.slow
def test_axolotl_train_with_kv_and_packing(tmp_path, smollm2_dir):
    run = run_axolotl(tmp_path, smollm2_dir, {
        "plugins": ["axolotl_treft.TReFTPlugin"], "max_steps": 2, "sample_packing": True, "micro_batch_size": 1,
        "sequence_len": 256, "treft": {"constrained_sft": {}, "kv": {"weight": 1.0, "tokens": "postfix"}},
    })
    assert run.returncode == 0, run.log[-3000:]
    values, sft = run.series("treft/constrained_sft"), run.series("treft/sft")
    assert len(values) == 2 and len(sft) == 2 and len(run.series("treft/kv")) == 2
    assert all(math.isfinite(v) and v > 0 for v in values)
    # at step 1 the policy is the reference (fresh LoRA): Δ = 0, so ℓ_t = (2/β_t)·log 2, between β = 2 and 0.1
    assert 2 * math.log(2) / 2.0 - 1e-3 < values[0] < 2 * math.log(2) / 0.1 + 1e-3
    assert float(run.steps[0]["loss"]) == pytest.approx(values[0], rel=1e-3)  # the loss is the replacement


def test_study_catalogue_ptst_is_evaluation_only_with_the_system_prompt(tmp_path, capsys):
    from axolotl_treft.cli.main import main as cli_main
    from axolotl_treft.resources import example_path, resolved_example
    from axolotl_treft.study.runs import catalogue, derive_config, select

    cfg_path = tmp_path / "cfg.yml"
    cfg_path.write_text(resolved_example(example_path("smollm2-135m-abstention-treft")))
    runs = catalogue(yaml.safe_load(cfg_path.read_text()))
    chosen, _ = select(runs, ["all"])
    assert {"constrained_sft", "ptst"} <= {r.name for r in chosen}
    assert runs["ptst"].eval_of == "sft" and "evaluation only" in runs["ptst"].label
    out = tmp_path / "study"
    argv = ["study", str(cfg_path), "--runs", "constrained_sft,ptst", "--ptst-prompt", "Be safe.", "--tasks",
            "offtopic_abstention", "--out", str(out), "--dry-run"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    sections = [s.removeprefix("# ") for s in (out / "commands.sh").read_text().split("\n\n")]
    ptst = next(s for s in sections if s.startswith("ptst:"))
    assert "axolotl train" not in ptst and "--system_instruction 'Be safe.'" in ptst
    assert f"peft={out / 'sft' / 'model'}" in ptst and f"--output_path {out / 'ptst' / 'lm_eval'}" in ptst
    assert "--system_instruction" not in next(s for s in sections if s.startswith("sft:"))
    derived = yaml.safe_load((out / "constrained_sft" / "config.yml").read_text())
    assert derived["treft"] == {"constrained_sft": {"betas": [0.5, 2.0, 2.0, 2.0, 2.0], "beta_rest": 0.1},
                                "monitor": {"tasks": ["offtopic_abstention"], "every": MONITOR_EVERY,
                                            "limit": MONITOR_LIMIT, "batch_size": 8,
                                            "initial": False}}  # sft, trained first, evaluates step 0 for both
    assert not (out / "ptst" / "config.yml").exists() or "monitor" not in yaml.safe_load(
        (out / "ptst" / "config.yml").read_text()).get("treft", {})  # evaluation only: nothing trains
    assert derive_config({"base_model": "m"}, runs["ptst"])[0] == {"base_model": "m"}  # no treft, SFT's config
