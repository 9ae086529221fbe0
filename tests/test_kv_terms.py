"""Several K/V terms, the fixed postfix reference, the hinge and the step window (issue #16).

Unit tests drive the regularizer through the trainer's step on the tiny Llama and compare with an independent
computation; the slow test is a real ``axolotl train`` run compared with plain SFT, adapter for adapter.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from axolotl_treft.args import KVConfig, TReFTConfig
from axolotl_treft.regularizers import kv_term_names
from axolotl_treft.regularizers.kv import KVRegularizer
from axolotl_treft.spans import SEG_POSTFIX, SEG_PREFIX, TOKEN_MODES, conversation_spans, empty_query_spans
from tests.axolotl_runner import run_axolotl
from tests.reg_harness import CONVS, lora_model, padded_batch, run_step
from tests.reg_harness import grads as lora_grads


def spans_dataset(tok, convs=CONVS):
    from datasets import Dataset

    spans = [conversation_spans(tok, c) for c in convs]
    return Dataset.from_dict({"input_ids": [s.input_ids for s in spans], "treft_segments": [s.segments for s in spans]})


def layer_kv(model, input_ids):
    """Independent K/V: k_proj/v_proj(input_layernorm(h_l)) per layer, from output_hidden_states: [(K, V)]."""
    layers = model.get_base_model().model.layers
    hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    return [(layer.self_attn.k_proj(layer.input_layernorm(hidden[i])), layer.self_attn.v_proj(
        layer.input_layernorm(hidden[i]))) for i, layer in enumerate(layers)]


def initial_kv(model, input_ids):
    with torch.no_grad(), model.disable_adapter():
        model.eval()
        out = layer_kv(model, input_ids)
        model.train()
    return out


def relsq_mean(pol, ref):
    per_layer = [(((k - kr) ** 2).sum(-1) / (kr**2).sum(-1)).mean() + (((v - vr) ** 2).sum(-1) / (vr**2).sum(-1)).mean()
                 for (k, v), (kr, vr) in zip(pol, ref, strict=True)]
    return torch.stack(per_layer).mean()


# -- configuration -------------------------------------------------------------------------------------
def test_list_form_and_names():
    cfg = TReFTConfig.model_validate({"kv": [{"tokens": "prefix", "weight": 30},
                                             {"tokens": "postfix", "weight": 5, "reference": "fixed"},
                                             {"tokens": "postfix", "weight": 1, "layers": [0]}]})
    assert [t.tokens for t in cfg.kv_terms()] == ["prefix", "postfix", "postfix"]
    assert kv_term_names(cfg.kv_terms()) == ["kv_prefix", "kv_postfix_1", "kv_postfix_2"]
    single = TReFTConfig.model_validate({"kv": {"weight": 5}})
    assert len(single.kv_terms()) == 1 and single.kv.reference == "exact" and single.kv.fixed_source is None
    assert cfg.kv_terms()[1].fixed_source == "empty_query"


@pytest.mark.parametrize(("kv", "message"), [
    ({"weight": 1, "tokens": "query", "reference": "fixed"}, r"treft\.kv\.reference: `fixed` .* `tokens: query`"),
    ([{"weight": 1}, {"weight": 1, "tokens": "all", "reference": "fixed"}], r"treft\.kv\[1\]\.reference"),
    ({"weight": 1, "fixed_from": "first_example"}, r"treft\.kv\.fixed_from"),
    ({"weight": 1, "threshold": -0.1}, r"treft\.kv\.threshold"),
    ({"weight": 1, "threshold": float("inf")}, r"treft\.kv\.threshold: Input should be a finite number"),
    ({"weight": 1, "active_steps": float("nan")}, r"treft\.kv\.active_steps: the fraction nan"),
    ({"weight": 1, "active_steps": 0.0}, r"treft\.kv\.active_steps: the fraction 0\.0"),
    ({"weight": 1, "active_steps": 1.5}, r"treft\.kv\.active_steps"),
    ([{"weight": 1, "active_steps": [4, 4]}], r"treft\.kv\[0\]\.active_steps: \[4, 4\) is an empty"),
    ({"weight": 1, "active_steps": [-1, 3]}, r"treft\.kv\.active_steps"),
    ([], r"treft\.kv: empty list"),
])
def test_bad_terms_name_the_key(kv, message):
    with pytest.raises(ValueError, match=message):
        TReFTConfig.model_validate({"kv": kv})


def test_active_steps_window():
    frac = KVConfig(weight=1, active_steps=0.5)
    assert [frac.is_active(s, 10) for s in (0, 4, 5, 9)] == [True, True, False, False]
    window = KVConfig(weight=1, active_steps=[2, 4])
    assert [window.is_active(s, 10) for s in range(5)] == [False, False, True, True, False]
    assert KVConfig(weight=1).is_active(10**6, 1)


def test_hinge_and_window_shape_the_penalty_and_its_gradient():
    reg = KVRegularizer(KVConfig(weight=10.0, threshold=1.0, active_steps=[1, 3]), name="kv_prefix")
    x = torch.tensor(0.5**5, requires_grad=True)  # exact in fp32
    penalty, logged = reg.weighted(x * 1.0, step=0, max_steps=4)  # outside the window: nothing added
    assert penalty is None and logged == {"treft/kv_prefix": 0.5**5, "treft/kv_prefix_active": 0.0,
                                          "treft/kv_prefix_penalty": 0.0}
    penalty, logged = reg.weighted(x * 1.0, step=1, max_steps=4)  # 10 · 0.03 < 1: hinge at 0
    assert float(penalty) == 0.0 and logged["treft/kv_prefix_active"] == 1.0
    penalty.backward()
    assert float(x.grad) == 0.0
    y = torch.tensor(0.25, requires_grad=True)
    penalty, logged = reg.weighted(y * 1.0, step=2, max_steps=4)  # 10 · 0.25 − 1 = 1.5
    assert float(penalty) == pytest.approx(1.5) and logged["treft/kv_prefix_penalty"] == pytest.approx(1.5)
    penalty.backward()
    assert float(y.grad) == pytest.approx(10.0)
    plain = KVRegularizer(KVConfig(weight=2.0))
    penalty, logged = plain.weighted(torch.tensor(0.5), 0, 1)
    assert float(penalty) == 1.0 and logged == {"treft/kv": 0.5}  # the single form logs as before


# -- the fixed postfix reference -------------------------------------------------------------------------
def count_forwards(model):
    calls = []
    handle = model.get_base_model().model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("mode", ["postfix", "prefix_postfix"])
def test_fixed_empty_query_reference_value_gradient_and_no_reference_pass(tiny_llama_dir, smollm2_tokenizer, mode):
    tok = smollm2_tokenizer
    model = lora_model(tiny_llama_dir)
    inputs, segments = padded_batch(tok, CONVS)
    empty = empty_query_spans(tok)
    reg = KVRegularizer(KVConfig(weight=1.0, tokens=mode, reference="fixed"), train_dataset=spans_dataset(tok),
                        empty_query=empty)
    calls, handle = count_forwards(model)
    try:
        ours, _ = run_step(reg, model, inputs, segments)
    finally:
        handle.remove()
    # cache build: the empty-query render (+ one forward per distinct prefix), then exactly the SFT forward
    assert len(calls) == 1 + (2 if mode == "prefix_postfix" else 0) + 1
    assert not reg.needs_reference_each_step and reg.postfixes_seen == 2 and reg.postfixes_mismatched == 0
    ours.backward()
    g_ours = lora_grads(model)
    model.zero_grad()

    # independent: postfix positions against the empty-query render's postfix, prefix positions exact
    empty_ids = torch.tensor([empty.input_ids])
    empty_post = torch.tensor(empty.segments) == SEG_POSTFIX
    ref_empty = [(k[0, empty_post], v[0, empty_post]) for k, v in initial_kv(model, empty_ids)]
    ref_exact = initial_kv(model, inputs["input_ids"])
    pol = layer_kv(model, inputs["input_ids"])
    pols, refs = [[], []], [[], []]
    for row in range(len(CONVS)):
        for pos in torch.isin(segments[row], torch.tensor(TOKEN_MODES[mode], dtype=segments.dtype)).nonzero()[:, 0]:
            for layer, ((k, v), (ke, ve), (kx, vx)) in enumerate(zip(pol, ref_empty, ref_exact, strict=True)):
                if layer >= len(pols[0]):
                    pols[0].append([]), pols[1].append([]), refs[0].append([]), refs[1].append([])
                pols[0][layer].append(k[row, pos])
                pols[1][layer].append(v[row, pos])
                if int(segments[row, pos]) == SEG_PREFIX:
                    refs[0][layer].append(kx[row, pos]), refs[1][layer].append(vx[row, pos])
                else:
                    offset = int((segments[row, :pos] == SEG_POSTFIX).sum())  # index within the postfix
                    refs[0][layer].append(ke[offset]), refs[1][layer].append(ve[offset])
    theirs = relsq_mean([(torch.stack(k), torch.stack(v)) for k, v in zip(*pols, strict=True)],
                        [(torch.stack(k), torch.stack(v)) for k, v in zip(*refs, strict=True)])
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    g_theirs = lora_grads(model)
    assert g_ours.keys() == g_theirs.keys()
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_theirs[name], rtol=1e-4, atol=1e-7, msg=name)


def test_fixed_reference_is_not_zero_at_the_first_step(tiny_llama_dir, smollm2_tokenizer):
    """Policy = initial model (LoRA B = 0), yet a real example's postfix K/V depend on its query: term > 0;
    with ``first_example`` the first example itself matches its own reference exactly."""
    tok = smollm2_tokenizer
    model = lora_model(tiny_llama_dir, nonzero_b=False)
    inputs, segments = padded_batch(tok, CONVS)
    fixed = KVRegularizer(KVConfig(weight=1.0, tokens="postfix", reference="fixed"), empty_query=empty_query_spans(tok))
    term, _ = run_step(fixed, model, inputs, segments)
    assert float(term) > 1e-6
    first = KVRegularizer(KVConfig(weight=1.0, tokens="postfix", reference="fixed", fixed_from="first_example"),
                          train_dataset=spans_dataset(tok))
    one_inputs, one_segments = padded_batch(tok, CONVS[:1])
    term, _ = run_step(first, model, one_inputs, one_segments)
    assert float(term) < 1e-10 and first.last_selected > 0


def test_postfix_differing_from_the_fixed_reference_is_counted_not_compared(tiny_llama_dir, smollm2_tokenizer, caplog):
    tok = smollm2_tokenizer
    model = lora_model(tiny_llama_dir)
    inputs, segments = padded_batch(tok, CONVS)
    post = (segments[1] == SEG_POSTFIX).nonzero()[:, 0]
    inputs["input_ids"][1, post[-1]] = tok.convert_tokens_to_ids("Hello")  # the second example's postfix differs
    reg = KVRegularizer(KVConfig(weight=1.0, tokens="postfix", reference="fixed"), empty_query=empty_query_spans(tok))
    with caplog.at_level(logging.WARNING):
        term, _ = run_step(reg, model, inputs, segments)
    assert reg.postfixes_mismatched == 1 and reg.postfixes_seen == 2
    assert reg.last_selected == int((segments[0] == SEG_POSTFIX).sum())  # only the first example's postfix
    assert "differ from the fixed reference postfix" in caplog.text
    assert "1 of 2 postfix spans differed" in reg.summary()
    assert torch.isfinite(term) and float(term) > 0


# -- a real axolotl train run --------------------------------------------------------------------------
@pytest.mark.slow
def test_window_and_threshold_on_a_real_run(tmp_path_factory, tiny_llama_dir):
    """Two terms: prefix held below a huge threshold, fixed postfix active on steps [2, 4). Over the first two
    steps the adapter equals plain SFT's bit for bit; afterwards the postfix term trains it."""
    seed = "axolotl_treft.SeedPlugin"
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "learning_rate": 1e-2}
    treft = {"kv": [{"tokens": "prefix", "weight": 100.0, "threshold": 1e6},
                    {"tokens": "postfix", "weight": 100.0, "reference": "fixed", "active_steps": [2, 4]}]}
    runs = {}
    for name, extra in {"plain": {"plugins": [seed]},
                        "terms": {"plugins": [seed, "axolotl_treft.TReFTPlugin"], "treft": treft}}.items():
        runs[name] = run = run_axolotl(tmp_path_factory.mktemp(name), tiny_llama_dir, {**common, **extra})
        assert run.returncode == 0, run.log[-4000:]
    plain, terms = runs["plain"], runs["terms"]
    assert "fixed postfix reference from empty_query" in terms.log
    assert terms.series("treft/kv_postfix_active") == [0.0, 0.0, 1.0, 1.0]
    assert terms.series("treft/kv_postfix_penalty")[:2] == [0.0, 0.0]
    assert all(p > 0 for p in terms.series("treft/kv_postfix_penalty")[2:])
    assert terms.series("treft/kv_prefix_penalty") == [0.0] * 4 and all(v > 0 for v in terms.series("treft/kv_prefix")[1:])
    summed = [a + b for a, b in zip(terms.series("treft/kv_prefix"), terms.series("treft/kv_postfix"), strict=True)]
    assert terms.series("treft/kv") == pytest.approx(summed, rel=1e-3, abs=1e-4)  # logs keep 4 digits
    assert plain.series("loss")[:2] == terms.series("loss")[:2]

    def adapter(run, step):
        return load_file(run.output_dir / f"checkpoint-{step}" / "adapter_model.safetensors")

    a, b = adapter(plain, 2), adapter(terms, 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = adapter(plain, 4), adapter(terms, 4)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_list_form_through_axolotls_validation(smollm2_dir, tmp_path):
    """Axolotl's own validation keeps the list and checks each term's layers against the model (30 layers)."""
    from axolotl_treft.args import kv_terms
    from tests.test_config import make_cfg, validate

    treft = {"kv": [{"tokens": "prefix", "weight": 30}, {"tokens": "postfix", "weight": 5, "reference": "fixed"}]}
    cfg = validate(make_cfg(smollm2_dir, tmp_path, treft))
    assert [(t.tokens, t.reference) for t in kv_terms(cfg.treft)] == [("prefix", "exact"), ("postfix", "fixed")]
    bad = {"kv": [{"tokens": "prefix", "weight": 30}, {"tokens": "postfix", "weight": 5, "layers": [0, 30]}]}
    with pytest.raises(ValueError, match=r"treft\.kv\[1\]\.layers: index 30 out of range"):
        validate(make_cfg(smollm2_dir, tmp_path, bad))
