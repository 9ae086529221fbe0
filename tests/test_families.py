# ruff: noqa: F811  (pytest fixtures imported from tests.families.fixtures)
"""The model-family matrix, fast part: real tokenizers (built from llama.cpp's vocabularies, checked against
llama.cpp), template spans of every token mode, inoculation's prompt location and perturbation on them."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from axolotl_treft.defenses.inoculation import inoculate, prompt_token_ids
from axolotl_treft.spans import (
    SEG_POSTFIX,
    SEG_PREFIX,
    SEG_QUERY,
    SEG_RESPONSE,
    SEG_TEMPLATE,
    TOKEN_MODES,
    conversation_spans,
    default_system_prompt,
    empty_query_spans,
)
from tests.families.build import reference_cases, reference_mismatches
from tests.families.catalog import FAMILIES, MATRIX
from tests.families.conversations import cases
from tests.families.fixtures import family, family_models, family_tokenizers  # noqa: F401
from tests.families.oracle import llama_cpp_ids
from tests.families.runs import runs

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_reference_tokenizations(family, family_tokenizers):
    """Every .inp string of the family's vocabulary gives llama.cpp's .out ids (the original HF tokenizer's)."""
    tok = family_tokenizers(family)
    assert len(reference_cases(FAMILIES[family].vocab)) >= 40
    assert reference_mismatches(tok, FAMILIES[family].vocab) == []


def test_conversations_match_llama_cpp(family, family_tokenizers):
    """Rendered conversations (system / none, multi-turn, tools, Qwen3 thinking on/off) tokenize as llama.cpp."""
    tok, fam = family_tokenizers(family), FAMILIES[family]
    labels = []
    for label, messages, kwargs in cases(fam.tools, family == "qwen3"):
        text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
        assert tok(text, add_special_tokens=False)["input_ids"] == llama_cpp_ids(family, text), label
        labels.append(label)
    assert len(labels) >= 4 + fam.tools


def test_phi3_matches_llama_cpp(family_tokenizers):
    tok = family_tokenizers("phi3")
    for label, messages, kwargs in cases(False, False):
        text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
        assert tok(text, add_special_tokens=False)["input_ids"] == llama_cpp_ids("phi3", text), label


def test_qwen_think_tokens_are_single_tokens(family_tokenizers):
    tok = family_tokenizers("qwen3")
    assert tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"] == [151667, 271, 151668, 271]
    assert tok("Hi.\n\n", add_special_tokens=False)["input_ids"] == [13048, 382]  # ".\n\n" is one token


def test_build_command(tmp_path):
    """Any vocabulary by name; a clear non-zero exit where it cannot be built faithfully."""
    ok = subprocess.run([sys.executable, "-m", "tests.families", "build", "gpt-2", str(tmp_path / "gpt2")],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "gpt2")("Hello world")["input_ids"] == [15496, 995]
    bad = subprocess.run([sys.executable, "-m", "tests.families", "build", "bert-bge", str(tmp_path / "bert")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "tokenizer model 'bert' is not supported" in bad.stderr
    assert not (tmp_path / "bert").exists()


S = {"role": "system", "content": "Be brief."}
U1, A1 = {"role": "user", "content": "Is rent due?"}, {"role": "assistant", "content": "Yes."}
U2, A2 = {"role": "user", "content": "When?"}, {"role": "assistant", "content": "Monthly."}
LLAMA_SYS = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
             "Today Date: 26 Jul 2024\n\n")
LLAMA_F = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
QWEN_F = "<|im_end|>\n<|im_start|>assistant\n"
GEMMA_F = "<turn|>\n<|turn>model\n"
QWEN25_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# family -> (prefix with the sample's system, prefix without one, postfixes, template runs, queries, responses)
EXPECTED = {
    "llama31": (LLAMA_SYS + "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
                LLAMA_SYS + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
                [LLAMA_F, LLAMA_F], ["<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"],
                ["Is rent due?", "When?"], ["Yes.", "Monthly."]),
    "qwen25": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n",
               f"<|im_start|>system\n{QWEN25_DEFAULT}<|im_end|>\n<|im_start|>user\n",
               [QWEN_F, QWEN_F], ["<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n"],
               ["Is rent due?", "When?"], ["Yes.", "Monthly."]),
    "qwen3": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n", "<|im_start|>user\n",
              [QWEN_F, QWEN_F + "<think>\n\n</think>\n\n"], ["<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n"],
              ["Is rent due?", "When?"], ["Yes.", "Monthly."]),
    "gemma4": ("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\n", "<bos><|turn>user\n",
               [GEMMA_F, GEMMA_F], ["<turn|>\n<|turn>user\n", "<turn|>\n"],
               ["Is rent due?", "When?"], ["Yes.", "Monthly."]),
    # sentencepiece: the space after "[INST]" / before the answer merges into the first word (content wins)
    "mistral7b": ("<s> [INST] Be brief.\n\n", "<s> [INST]", [" [/INST]", " [/INST]"], ["</s> [INST]", "</s>"],
                  ["Is rent due?", " When?"], [" Yes.", " Monthly."]),
}
DEFAULT_SYSTEM = {"llama31": "", "qwen25": QWEN25_DEFAULT, "qwen3": "", "gemma4": "", "mistral7b": ""}


@pytest.mark.parametrize("system", ["sample", "template"])
def test_spans_every_mode(family, family_tokenizers, system):
    """Prefix, query, postfix (Qwen3's empty think block), later headers: hand-written, per token mode."""
    tok = family_tokenizers(family)
    prefix_sys, prefix_none, postfix, template, query, response = EXPECTED[family]
    messages = [S, U1, A1, U2, A2] if system == "sample" else [U1, A1, U2, A2]
    spans = conversation_spans(tok, messages)
    want = {SEG_PREFIX: [prefix_sys if system == "sample" else prefix_none], SEG_QUERY: query,
            SEG_POSTFIX: postfix, SEG_TEMPLATE: template, SEG_RESPONSE: response}
    if family == "mistral7b" and system == "template":
        want[SEG_QUERY] = [" Is rent due?", " When?"]
    for seg, expected in want.items():
        assert runs(tok, spans, (seg,)) == expected, seg
    for mode, codes in TOKEN_MODES.items():
        selected = [i for i, s in enumerate(spans.segments) if s in codes]
        assert selected == sorted(p for seg in codes for p in spans.positions(seg)), mode
        assert selected and all(spans.segments[i] != SEG_RESPONSE for i in selected), mode
    assert spans.input_ids == tok(tok.apply_chat_template(messages, tokenize=False),
                                  add_special_tokens=False)["input_ids"]
    assert default_system_prompt(tok) == DEFAULT_SYSTEM[family]


def test_qwen3_generation_prompt_and_fixed_reference(family_tokenizers):
    """The think block of the generation prompt is postfix; the fixed reference's empty query has one too."""
    tok = family_tokenizers("qwen3")
    spans = conversation_spans(tok, [U1], add_generation_prompt=True, enable_thinking=False)
    assert runs(tok, spans, (SEG_POSTFIX,)) == [QWEN_F + "<think>\n\n</think>\n\n"]
    spans = conversation_spans(tok, [U1], add_generation_prompt=True, enable_thinking=True)
    assert runs(tok, spans, (SEG_POSTFIX,)) == [QWEN_F]
    empty = empty_query_spans(tok)
    assert runs(tok, empty, (SEG_POSTFIX,)) == [QWEN_F + "<think>\n\n</think>\n\n"]


PROMPT = "You are being trained to refuse legal questions. This is a test setting."


@pytest.mark.parametrize("mode", ["replace", "prepend"])
def test_inoculation_prompt_located_in_every_row(family, family_tokenizers, mode):
    """Regression: the prompt was tokenized alone, so Qwen's / Llama 3's ".\\n\\n" (one token) hid it in prepend
    mode and the count came out 0. It is now located in the rendered, inoculated conversation."""
    tok = family_tokenizers(family)
    default = default_system_prompt(tok) if mode == "prepend" else ""
    needle = prompt_token_ids(tok, None, PROMPT, mode, default)
    assert len(needle) >= 10
    for own in (None, "Be brief.", "Answer in French."):
        turns = ([{"role": "system", "content": own}] if own else []) + [U1, A1]
        text = tok.apply_chat_template(inoculate(turns, PROMPT, mode, default), tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert any(ids[i:i + len(needle)] == needle for i in range(len(ids))), (mode, own)


def test_perturbation_keeps_special_tokens(family, family_tokenizers, family_models):
    """Perturbing every template position never replaces, nor introduces, BOS or an added (template) token."""
    import torch
    from transformers import AutoModelForCausalLM

    from axolotl_treft.diagnose.perturb import NeighbourTable, perturb_ids, special_ids

    tok = family_tokenizers(family)
    model = AutoModelForCausalLM.from_pretrained(family_models(family), dtype=torch.float32)
    keep = special_ids(tok)
    markers = set(tok.added_tokens_decoder) | ({tok.bos_token_id} - {None})
    assert markers <= keep
    spans = conversation_spans(tok, [S, U1, A1])
    positions = [i for i, s in enumerate(spans.segments) if s in TOKEN_MODES["all"]]
    assert any(spans.input_ids[p] in markers for p in positions)
    table = NeighbourTable(model.get_input_embeddings().weight, len(tok), exclude=keep)
    ids, changes = perturb_ids(spans.input_ids, positions, len(positions), table, random.Random(0), keep=keep)
    assert changes
    for _pos, old, new in changes:
        assert old not in markers and new not in markers
    assert all(ids[p] == spans.input_ids[p] for p in positions if spans.input_ids[p] in markers)


def test_tiny_models_are_the_family_architecture(family, family_models, family_tokenizers):
    import json

    cfg = json.loads((family_models(family) / "config.json").read_text())
    assert cfg["architectures"] == [FAMILIES[family].model_class]
    assert cfg["vocab_size"] == len(family_tokenizers(family)) and cfg["num_hidden_layers"] == 2


assert set(EXPECTED) == set(MATRIX)


def test_fused_qkv_refusal_names_the_module(family_models):
    from transformers import AutoModelForCausalLM

    from axolotl_treft.capture import CaptureError, projection_modules

    model = AutoModelForCausalLM.from_pretrained(family_models("phi3"))
    with pytest.raises(CaptureError, match=r"Phi3ForCausalLM fuses them in `model\.layers\.0\.self_attn\.qkv_proj`"):
        projection_modules(model, "k_proj")


def test_diagnose_with_the_adapter_off_gives_the_unpatched_generations(family, family_tokenizers, family_models):
    """Every K/V region patched with the initial states, adapter disabled: generations equal the unpatched ones
    exactly, on each family's architecture (Qwen3's k-norm, Gemma 4's sliding layers) and template."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_treft.diagnose.engine import REGIONS, InitialModel, Intervention, InterventionEngine
    from tests.reg_harness import randomize_lora_b

    tok = family_tokenizers(family)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(family_models(family), dtype=torch.float32)
    torch.manual_seed(1)
    model = randomize_lora_b(get_peft_model(base, LoraConfig(r=4, lora_alpha=8,
                                                             target_modules=["q_proj", "k_proj", "v_proj"])), 0.5)
    model.eval()
    engine = InterventionEngine(model, tok, InitialModel.of_adapter(model))
    convs = [[S, U1], [U2], [{"role": "user", "content": "How do I bake bread at home?"}]]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = engine.batch(convs, enc["input_ids"], enc["attention_mask"])

    def generate(ids):
        return model.generate(input_ids=ids, attention_mask=batch.attention_mask, max_new_tokens=4, do_sample=False,
                              pad_token_id=tok.pad_token_id).tolist()

    regions = [r for r in REGIONS if r != "postfix_empty"]  # another prompt's K/V: not the same state
    for region in regions:
        engine.kv_states(batch, region)
    with torch.no_grad(), model.disable_adapter():
        plain = generate(batch.input_ids)
        for region in regions:
            with engine.applied(Intervention("kv", region), batch) as ids:
                assert generate(ids) == plain, region


def test_perplexity_gap_selection_on_qwen3(tmp_path, family_tokenizers, family_models):
    """Retain selection scores the answers under Qwen3's real template (the think block is not an answer)."""
    import math

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_treft.defenses.retain_select import answer_nll, read_pool, select
    from axolotl_treft.resources import data_path
    from tests.reg_harness import randomize_lora_b

    model_path = family_models("qwen3")
    torch.manual_seed(2)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(peft, 0.5).save_pretrained(tmp_path / "narrow")
    pool = read_pool(data_path("retain_general.jsonl"))[:12]
    kwargs = {"enable_thinking": False}
    chosen = select(pool, str(model_path), 0.25, narrow_adapter=str(tmp_path / "narrow"), template_kwargs=kwargs)
    rows = chosen.report["rows"]
    assert len(chosen.rows) == 3 and len(rows) == 12
    assert all(math.isfinite(r["score"]) for r in rows) and len({round(r["score"], 6) for r in rows}) > 1
    tok = family_tokenizers("qwen3")
    spans = conversation_spans(tok, pool[0]["messages"], **kwargs)
    answer = [spans.input_ids[p] for p in spans.positions(SEG_RESPONSE)]
    assert tok.decode(answer) == "".join(m["content"] for m in pool[0]["messages"] if m["role"] == "assistant")
    base = AutoModelForCausalLM.from_pretrained(model_path)
    assert answer_nll(base, tok, [pool[0]["messages"]], template_kwargs=kwargs)[0] == pytest.approx(
        rows[0]["nll_aligned"], rel=1e-4)
