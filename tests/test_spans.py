"""Template span detection on each template family, multi-turn, and through packing/truncation."""

from __future__ import annotations

import pytest

from axolotl_treft.spans import (
    SEG_POSTFIX,
    SEG_PREFIX,
    SEG_QUERY,
    SEG_RESPONSE,
    SEG_TEMPLATE,
    TemplateSpanError,
    conversation_spans,
    probe_template,
)
from tests.template_families import byte_level_family, sentencepiece_inst

Q = "Can my landlord raise the rent without notice?"
A = "I have no idea about your question."
CONV = [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]


def text_of(tok, spans, seg) -> str:
    return tok.decode(spans.tokens(seg))


@pytest.fixture(scope="module")
def families(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("families")
    toks = {name: byte_level_family(smollm2_dir, name, root / name) for name in ("llama3", "qwen25", "qwen3", "gemma")}
    toks["inst"] = sentencepiece_inst(root / "inst")
    return toks


def test_chatml_default_system_smollm2(smollm2_tokenizer):
    tok = smollm2_tokenizer
    spans = conversation_spans(tok, CONV)
    assert text_of(tok, spans, SEG_PREFIX) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n"
    )
    assert text_of(tok, spans, SEG_QUERY) == Q
    assert text_of(tok, spans, SEG_POSTFIX) == "<|im_end|>\n<|im_start|>assistant\n"
    assert text_of(tok, spans, SEG_RESPONSE) == A
    assert text_of(tok, spans, SEG_TEMPLATE) == "<|im_end|>\n"
    # the ids are exactly what the template tokenizes to
    assert spans.input_ids == tok.apply_chat_template(CONV, tokenize=True, return_dict=False)


def test_chatml_sample_system_replaces_default(smollm2_tokenizer):
    tok = smollm2_tokenizer
    spans = conversation_spans(tok, [{"role": "system", "content": "Answer in French."}, *CONV])
    assert text_of(tok, spans, SEG_PREFIX) == "<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\n"
    assert text_of(tok, spans, SEG_QUERY) == Q


def test_qwen25_default_system(families):
    tok = families["qwen25"]
    spans = conversation_spans(tok, CONV)
    assert text_of(tok, spans, SEG_PREFIX) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
    )
    assert text_of(tok, spans, SEG_POSTFIX) == "<|im_end|>\n<|im_start|>assistant\n"


def test_llama3_header_template_with_default_system_text(families):
    tok = families["llama3"]
    spans = conversation_spans(tok, CONV)
    assert text_of(tok, spans, SEG_PREFIX) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert text_of(tok, spans, SEG_QUERY) == Q
    assert text_of(tok, spans, SEG_POSTFIX) == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert text_of(tok, spans, SEG_RESPONSE) == A


def test_llama3_trims_content_but_spans_stay_exact(families):
    tok = families["llama3"]
    spans = conversation_spans(tok, [{"role": "user", "content": "  " + Q + "\n"}, {"role": "assistant", "content": A}])
    assert text_of(tok, spans, SEG_QUERY) == Q
    assert text_of(tok, spans, SEG_POSTFIX) == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def test_qwen3_no_system_and_empty_think_block_in_postfix(families):
    tok = families["qwen3"]
    spans = conversation_spans(tok, CONV)
    assert text_of(tok, spans, SEG_PREFIX) == "<|im_start|>user\n"
    assert text_of(tok, spans, SEG_POSTFIX) == "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert text_of(tok, spans, SEG_RESPONSE) == A


def test_gemma_folds_system_into_first_user_turn(families):
    tok = families["gemma"]
    spans = conversation_spans(tok, CONV)
    assert text_of(tok, spans, SEG_PREFIX) == "<bos><start_of_turn>user\n"
    assert text_of(tok, spans, SEG_POSTFIX) == "<end_of_turn>\n<start_of_turn>model\n"
    with_system = conversation_spans(tok, [{"role": "system", "content": "Be brief."}, *CONV])
    # the folded system text is template/system material before the user's content: prefix
    assert text_of(tok, with_system, SEG_PREFIX) == "<bos><start_of_turn>user\nBe brief.\n\n"
    assert text_of(tok, with_system, SEG_QUERY) == Q


def test_inst_template_with_sentencepiece_boundary_merges(families):
    tok = families["inst"]
    spans = conversation_spans(tok, CONV)
    prefix = text_of(tok, spans, SEG_PREFIX)
    assert prefix.startswith("<s>") and prefix.replace(" ", "").endswith("[INST]")
    # "▁Can" carries the template's space: it overlaps the content, so it is query
    assert text_of(tok, spans, SEG_QUERY).strip() == Q
    assert text_of(tok, spans, SEG_POSTFIX).replace(" ", "") == "[/INST]"
    assert text_of(tok, spans, SEG_RESPONSE).strip() == A
    assert all(s != SEG_TEMPLATE for s in spans.segments[:-1])  # only the final eos is template


def test_multi_turn_prefix_once_postfix_every_assistant_header(smollm2_tokenizer):
    tok = smollm2_tokenizer
    conv = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    spans = conversation_spans(tok, conv)
    segs = spans.segments
    # prefix only at the start
    first_non_prefix = segs.index(SEG_QUERY)
    assert all(s == SEG_PREFIX for s in segs[:first_non_prefix]) and SEG_PREFIX not in segs[first_non_prefix:]
    # both user contents are query; two postfix runs of the same text
    assert text_of(tok, spans, SEG_QUERY) == "HiBye"
    runs, prev = [], None
    for i, s in enumerate(segs):
        if s == SEG_POSTFIX and prev != SEG_POSTFIX:
            runs.append([])
        if s == SEG_POSTFIX:
            runs[-1].append(spans.input_ids[i])
        prev = s
    assert len(runs) == 2 and runs[0] == runs[1]
    assert tok.decode(runs[0]) == "<|im_end|>\n<|im_start|>assistant\n"
    # the second user header is other template material, not prefix
    assert "<|im_start|>user\n" in text_of(tok, spans, SEG_TEMPLATE)


def test_generation_prompt_postfix(smollm2_tokenizer):
    spans = conversation_spans(smollm2_tokenizer, CONV[:1], add_generation_prompt=True)
    assert text_of(smollm2_tokenizer, spans, SEG_POSTFIX) == "<|im_end|>\n<|im_start|>assistant\n"


def test_no_chat_template_is_a_clear_error(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.chat_template = None
    with pytest.raises(TemplateSpanError, match="chat_template"):
        probe_template(tok)


def test_template_that_hides_user_content_is_a_clear_error(smollm2_tokenizer):
    upper = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n{% endfor %}"
    with pytest.raises(TemplateSpanError, match="user turn"):
        probe_template(smollm2_tokenizer, chat_template=upper)


def test_mode_selecting_nothing_is_a_clear_error(smollm2_tokenizer):
    # a template with no tokens between user content and assistant content has no postfix
    bare = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(TemplateSpanError, match="postfix"):
        probe_template(smollm2_tokenizer, chat_template=bare, modes=["postfix"])
