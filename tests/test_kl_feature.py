"""KL and feature-space L2 (LDIFS) against independent direct computations on a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from axolotl_treft.args import FeatureL2Config, KLConfig
from axolotl_treft.reference import Reference
from axolotl_treft.regularizers.base import ReferenceRequest, ReferenceResult, SubBatch
from axolotl_treft.regularizers.feature_l2 import FeatureL2Regularizer, layer_indices
from axolotl_treft.regularizers.kl import KLRegularizer
from tests.reg_harness import fake_trainer, grads, lora_model, padded_batch, run_step


def reference_outputs(model, inputs, **kw):
    with torch.no_grad(), model.disable_adapter():
        model.eval()
        out = model(**inputs, use_cache=False, **kw)
        model.train()
    return out


def direct_kl(model, inputs, tokens):
    """KL(p_ref ‖ p_θ) with F.kl_div, masked mean over positions."""
    labels = inputs["labels"]
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    ref = reference_outputs(model, inputs).logits
    # float64: the value is a small difference of large log-probabilities, fp32 rounding alone is ~1e-5 relative
    logits, ref = logits.double(), ref.double()
    per_token = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
    mask = inputs["attention_mask"].bool()
    if tokens == "response":
        nxt = torch.zeros_like(mask)
        nxt[:, :-1] = labels[:, 1:] != -100
        mask = mask & nxt
    return per_token[mask].mean().float()


@pytest.mark.parametrize("tokens", ["all", "response"])
def test_kl_matches_direct_computation_and_gradient(tiny_llama_dir, smollm2_tokenizer, tokens):
    model = lora_model(tiny_llama_dir)
    inputs, seg = padded_batch(smollm2_tokenizer)
    ours, _ = run_step(KLRegularizer(KLConfig(weight=1.0, tokens=tokens)), model, inputs, seg)
    ours.backward()
    g_ours = grads(model)
    model.zero_grad()
    theirs = direct_kl(model, inputs, tokens)
    theirs.backward()
    g_theirs = grads(model)
    assert float(ours.detach()) > 1e-5
    # fp32 vs the float64 truth: fp32 F.kl_div itself is off by ~5e-5 relative here
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-8)
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_theirs[name], rtol=1e-4, atol=1e-8, msg=name)


def test_kl_is_zero_at_lora_initialization(tiny_llama_dir, smollm2_tokenizer):
    model = lora_model(tiny_llama_dir, nonzero_b=False)
    inputs, seg = padded_batch(smollm2_tokenizer)
    kl, _ = run_step(KLRegularizer(KLConfig(weight=1.0)), model, inputs, seg)
    assert abs(float(kl.detach())) < 1e-7


def direct_ldifs(model, inputs, layer_ids):
    """Per sample: flatten each chosen layer's output over the real tokens, F.normalize, concat, ‖·‖²."""
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    hs = model(**inputs, use_cache=False, output_hidden_states=True).hidden_states
    ref = reference_outputs(model, inputs, output_hidden_states=True).hidden_states
    mask = inputs["attention_mask"].bool()
    dists = []
    for b in range(mask.shape[0]):
        phi = torch.cat([F.normalize(hs[i + 1][b][mask[b]].flatten(), dim=0) for i in layer_ids])
        phi0 = torch.cat([F.normalize(ref[i + 1][b][mask[b]].flatten(), dim=0) for i in layer_ids])
        dists.append(((phi - phi0) ** 2).sum())
    return torch.stack(dists).mean()


def test_feature_l2_matches_direct_computation_and_moves_the_gradient(tiny_llama_dir, smollm2_tokenizer):
    model = lora_model(tiny_llama_dir)
    inputs, seg = padded_batch(smollm2_tokenizer)

    def step():
        return run_step(FeatureL2Regularizer(FeatureL2Config(weight=1.0, layers=[0])), model, inputs, seg)

    term, _ = step()
    term.backward()
    g_term = grads(model)
    model.zero_grad()
    # hidden_states[i + 1] is block i's raw output except for the last block (final norm applied): layer 0
    theirs = direct_ldifs(model, inputs, [0])
    theirs.backward()
    g_theirs = grads(model)
    model.zero_grad()
    assert float(term.detach()) > 1e-6
    torch.testing.assert_close(term, theirs, rtol=1e-5, atol=1e-8)
    assert g_term.keys() == g_theirs.keys()
    for name in g_theirs:
        torch.testing.assert_close(g_term[name], g_theirs[name], rtol=1e-4, atol=1e-6, msg=name)

    # the term changes the SFT update (it would not if the trained model's features were detached)
    term, sft = step()
    (sft + 10.0 * term).backward()
    g_total = grads(model)
    model.zero_grad()
    _, sft = step()
    sft.backward()
    g_sft = grads(model)
    assert any(not torch.allclose(g_total[n], g_sft[n], rtol=1e-3, atol=1e-7) for n in g_sft)


def test_layer_selection():
    assert layer_indices(5, 28) == [0, 7, 14, 20, 27]
    assert layer_indices(5, 3) == [0, 1, 2]
    assert layer_indices([0, -1], 30) == [0, 29]


def test_reference_head_at_selected_positions_equals_full_logits(tiny_llama_dir, smollm2_tokenizer):
    model = lora_model(tiny_llama_dir)
    inputs, _ = padded_batch(smollm2_tokenizer)
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    reference = Reference(fake_trainer(model))
    sub = SubBatch(rows=torch.arange(2), length=inputs["input_ids"].shape[1])
    full = ReferenceResult(sub=sub, logits=reference.forward(model_inputs, logits=True))
    pairs = inputs["attention_mask"].bool().nonzero()[::3]
    kept = sub.flat_index(pairs[:, 0], pairs[:, 1])
    part = ReferenceResult(sub=sub, logits=reference.forward(model_inputs, logits=True, keep=kept), kept=kept)
    assert part.logits.shape == (len(pairs), full.logits.shape[-1])
    torch.testing.assert_close(part.logits_at(pairs[:, 0], pairs[:, 1]), full.logits_at(pairs[:, 0], pairs[:, 1]))
    skipped = inputs["attention_mask"].bool().nonzero()[1:2]
    with pytest.raises(RuntimeError, match="skipped"):
        part.logits_at(skipped[:, 0], skipped[:, 1])


def test_reference_requests_merge_logit_positions():
    rows = torch.tensor([True, False])
    a = ReferenceRequest(rows, 5, logits=True, logit_pairs=torch.tensor([[0, 1], [0, 3]]))
    b = ReferenceRequest(torch.tensor([False, True]), 7, logits=True, logit_pairs=torch.tensor([[1, 2], [0, 3]]))
    merged = a.merge(b)
    assert merged.rows.tolist() == [True, True] and merged.length == 7 and merged.logits
    assert merged.logit_pairs.tolist() == [[0, 1], [0, 3], [1, 2]]
    no_logits = ReferenceRequest(rows, 9)
    assert a.merge(no_logits).logit_pairs.tolist() == [[0, 1], [0, 3]]
    assert not no_logits.merge(ReferenceRequest(rows, 2)).logits
    everything = ReferenceRequest(rows, 3, logits=True)  # logits at every position
    assert a.merge(everything).logits and a.merge(everything).logit_pairs is None
