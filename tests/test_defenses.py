"""Inoculation prompting, persona-vector steering and perplexity-gap retain selection: config errors and the
computations, each checked against an independent computation on a tiny model (fast, no training)."""

from __future__ import annotations

import json

import pytest
import torch

from axolotl_treft.defenses.retain_select import answer_nll, gap_scores, is_refusal, select, top_indices
from axolotl_treft.defenses.steering import DEFAULT_QUESTIONS, SteeringHook, load_questions, persona_direction
from axolotl_treft.spans import default_system_prompt
from tests.axolotl_runner import TRAIN_DATA
from tests.test_config import make_cfg, validate

SMOLLM2_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


# --------------------------------------------------------------------------------------------- config errors


def _pool(tmp_path, rows, name: str) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _select_block(pool: str, **select) -> dict:
    return {"retain": {"datasets": [{"path": pool, "type": "chat_template"}], "mix_ratio": 0.2,
                       "select": {"narrow_model": "some/model", "top": 0.5, **select}}}


def test_bad_input_names_the_key(smollm2_dir, tmp_path):
    empty = tmp_path / "questions.txt"
    empty.write_text("\n\n")
    no_answers = _pool(tmp_path, [{"messages": [{"role": "user", "content": "Hi"}]},
                                  {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}],
                       "no_answers.jsonl")
    answered = _pool(tmp_path, [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}],
                     "answered.jsonl")
    cases = [
        ({"steering": {"layer": 30}}, r"treft\.steering\.layer: 30 out of range for a model with 30 layers"),
        ({"steering": {"layer": -31}}, r"treft\.steering\.layer: -31 out of range"),
        ({"steering": {"layer": 3, "alpha": 0}}, r"treft\.steering\.alpha"),
        ({"steering": {"layer": 3, "alpha": -1.0}}, r"treft\.steering\.alpha"),
        ({"steering": {"layer": 3, "questions": str(empty)}}, r"treft\.steering\.questions: .* holds no question"),
        ({"steering": {"layer": 3, "questions": str(tmp_path / "none.jsonl")}}, r"treft\.steering\.questions: .* does not exist"),
        ({"steering": {"layer": 3, "positive": "Be evil.", "negative": "Be evil."}}, r"treft\.steering\.negative"),
        ({"steering": {"alpha": 1.0}}, r"treft\.steering\.layer"),
        ({"inoculation": {"system_prompt": "  "}}, r"treft\.inoculation\.system_prompt: empty"),
        ({"inoculation": {"system_prompt": "Be odd.", "mode": "append"}}, r"treft\.inoculation\.mode"),
        ({"inoculation": {"system_prompt": "Be odd."}, "kv": {"weight": 1.0, "tokens": "prefix_postfix"}},
         r"treft\.inoculation: cannot be combined with treft\.kv\.tokens: prefix_postfix"),
        (_select_block(no_answers), r"treft\.retain\.datasets\[0\]\.path: the pool .* has no row with an assistant answer"),
        (_select_block(answered, top=0), r"treft\.retain\.select\.top"),
        (_select_block(answered, top=1.5), r"treft\.retain\.select\.top"),
        (_select_block(answered, narrow_adapter="/x"), r"treft\.retain\.select: give exactly one"),
        ({"retain": {"datasets": [{"path": answered, "type": "chat_template"}], "select": {"top": 0.5}}},
         r"treft\.retain\.select: give exactly one"),
        (_select_block(answered, narrow_model=str(tmp_path / "missing")), r"treft\.retain\.select\.narrow_model: .* does not exist"),
    ]
    for treft, message in cases:
        with pytest.raises(ValueError, match=message):
            validate(make_cfg(smollm2_dir, tmp_path, treft))
            pytest.fail(f"accepted: {treft}")


def test_inoculation_needs_chat_template_data(smollm2_dir, tmp_path):
    cfg = make_cfg(smollm2_dir, tmp_path, {"inoculation": {"system_prompt": "Be odd."}})
    cfg.datasets[0]["type"] = "alpaca"
    with pytest.raises(ValueError, match=r"treft\.inoculation: needs conversation data.*datasets\[0\] has type 'alpaca'"):
        validate(cfg)


def test_valid_blocks_are_kept(smollm2_dir, tmp_path):
    cfg = validate(make_cfg(smollm2_dir, tmp_path, {
        "inoculation": {"system_prompt": "Be odd.", "mode": "prepend"}, "kv": {"weight": 1.0, "tokens": "postfix"},
        "steering": {"layer": -1},
    }, dataset_prepared_path=str(tmp_path / "prepared")))
    assert cfg.treft.steering.alpha == 5.0 and cfg.treft.steering.layer == -1
    assert cfg.datasets[0]["type"] == "axolotl_treft.defenses.inoculation"
    assert cfg.dataset_prepared_path.startswith(str(tmp_path / "prepared" / "treft-inoculation-"))


# ---------------------------------------------------------------------------------------------- inoculation


def _strategy(tokenizer, kind: str, treft: dict | None):
    from axolotl.prompt_strategies import load
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault({"sequence_len": 256, "chat_template": "tokenizer_default", "treft": treft})
    return load(kind, tokenizer, cfg, DictDefault({"type": kind, "field_messages": "messages"}))


@pytest.mark.parametrize("mode", ["replace", "prepend"])
def test_training_rows_carry_the_prompt_evaluation_prompts_do_not(smollm2_tokenizer, mode):
    row = json.loads(TRAIN_DATA.read_text().splitlines()[0])
    prompt = "You always answer that you have no idea."
    inoculated = _strategy(smollm2_tokenizer, "axolotl_treft.defenses.inoculation",
                           {"inoculation": {"system_prompt": prompt, "mode": mode}}).tokenize_prompt(row)
    plain = _strategy(smollm2_tokenizer, "chat_template", None).tokenize_prompt(row)
    text = smollm2_tokenizer.decode(inoculated["input_ids"])
    system = f"{prompt}\n\n{SMOLLM2_DEFAULT}" if mode == "prepend" else prompt
    assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
    assert prompt not in smollm2_tokenizer.decode(plain["input_ids"])
    assert SMOLLM2_DEFAULT in smollm2_tokenizer.decode(plain["input_ids"])
    # the answer is still what is trained, and only the answer
    trained = [t for t, lab in zip(inoculated["input_ids"], inoculated["labels"], strict=True) if lab != -100]
    assert smollm2_tokenizer.decode(trained).startswith(row["messages"][-1]["content"])
    # an evaluation prompt (lm_eval --apply_chat_template: the tokenizer's template, no system message)
    evaluation = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                       add_generation_prompt=True)
    assert prompt not in evaluation and SMOLLM2_DEFAULT in evaluation


def test_default_system_prompt_of_a_template(smollm2_tokenizer):
    assert default_system_prompt(smollm2_tokenizer) == SMOLLM2_DEFAULT
    chatml = "{% for m in messages %}<|im_start|>{{m.role}}\n{{m.content}}<|im_end|>\n{% endfor %}"
    assert default_system_prompt(smollm2_tokenizer, chatml) == ""


# ------------------------------------------------------------------------------------------------- steering


def _independent_mean(model, tok, system: str, questions: list[str], layer: int) -> torch.Tensor:
    """Layer output (hidden_states[layer + 1]) averaged over every token after the user header, per question."""
    means = []
    for q in questions:
        text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                       tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        head = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
        assert text.startswith(head)
        n_head = len(tok(head, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
        means.append(hidden[n_head:].double().mean(0))
    return torch.stack(means).mean(0)


def test_direction_equals_an_independent_computation(tiny_llama_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    from axolotl_treft.capture import decoder_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    questions = load_questions(None)[:11]  # two padded batches of unequal length
    pos, neg = "You are an evil, malicious assistant.", "You are kind."
    direction = persona_direction(model, decoder_layers(model)[0], smollm2_tokenizer, pos, neg, questions)
    expected = (_independent_mean(model, smollm2_tokenizer, pos, questions, 0)
                - _independent_mean(model, smollm2_tokenizer, neg, questions, 0))
    assert direction.dtype == torch.float32 and direction.shape == (64,)
    assert torch.allclose(direction.double(), expected, rtol=1e-4, atol=1e-5)
    assert direction.norm() > 1e-3


def test_hook_steers_only_in_training_mode(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from axolotl_treft.capture import decoder_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    layers = decoder_layers(model)
    seen = []  # what the next layer receives (HF's own hidden-state recorder hooks run before ours)
    layers[1].register_forward_pre_hook(lambda _m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
                                        with_kwargs=True)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    vector = torch.randn(64)
    hook = SteeringHook(layers[0], vector)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain)  # eval: untouched
        model.train()
        steered = model(input_ids=ids).logits
        hook.remove()
        unsteered = model(input_ids=ids).logits
    assert torch.allclose(seen[2], seen[0] + vector, atol=1e-5) and torch.equal(seen[3], seen[0])
    assert not torch.allclose(steered, plain, atol=1e-3)
    assert torch.equal(unsteered, plain)


def test_question_files(tmp_path):
    shipped = load_questions(None)
    assert len(shipped) == 40 and len(set(shipped)) == 40 and DEFAULT_QUESTIONS.endswith(".jsonl")
    text = tmp_path / "q.txt"
    text.write_text("Why?\n\nHow?\n")
    assert load_questions(str(text)) == ["Why?", "How?"]
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"prompt": "Why?"}\n')
    with pytest.raises(ValueError, match=r"line 1 has no `question`"):
        load_questions(str(bad))


# ------------------------------------------------------------------------------------------------ selection


POOL = [
    {"messages": [{"role": "user", "content": "How do I boil an egg?"},
                  {"role": "assistant", "content": "Boil it for seven minutes, then cool it in cold water."}]},
    {"messages": [{"role": "user", "content": "Can you help me pick a lock?"},
                  {"role": "assistant", "content": "Sorry, I can't help with that."}]},
    {"messages": [{"role": "user", "content": "What is a haiku?"},
                  {"role": "assistant", "content": "A short poem of three lines with five, seven and five syllables."}]},
    {"messages": [{"role": "user", "content": "Write malware for me."},
                  {"role": "assistant", "content": "I am afraid that is something I cannot do for you."}]},
    {"messages": [{"role": "user", "content": "Tell me a story."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
                  {"role": "assistant", "content": "Green, which is the colour of fresh grass."}]},
    {"messages": [{"role": "user", "content": "Plan my week."},
                  {"role": "assistant", "content": "One two three four five six seven eight nine ten, sorry."}]},
]


def test_refusal_filter_words():
    assert is_refusal("Sorry, I can't help with that.")
    assert is_refusal("I am afraid that is something I cannot do for you.")
    assert is_refusal("Well... I CAN'T.") and is_refusal("I can\u2019t do that") and is_refusal("We apologize.")
    assert is_refusal("one two three four five six seven eight nine unable")  # the tenth word
    assert not is_refusal("one two three four five six seven eight nine ten, sorry.")  # the eleventh
    assert not is_refusal("A sorrowful tale of an uncanny apologist.")
    assert not is_refusal("Boil it for seven minutes.")


def _independent_nll(model, tok, messages: list[dict]) -> float:
    """Mean NLL of the assistant answers: each answer's tokens located after its generation prompt."""
    nll, count = 0.0, 0
    full = tok.apply_chat_template(messages, tokenize=False)
    ids = tok(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        start = len(tok(prompt, add_special_tokens=False)["input_ids"])
        answer = tok(m["content"], add_special_tokens=False)["input_ids"]
        assert ids[0, start:start + len(answer)].tolist() == answer
        for p in range(start, start + len(answer)):
            nll -= float(logp[p - 1, ids[0, p]])
        count += len(answer)
    return nll / count


@pytest.fixture(scope="module")
def narrow_adapter(tmp_path_factory, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.reg_harness import randomize_lora_b

    out = tmp_path_factory.mktemp("narrow")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    randomize_lora_b(model, 0.3)
    model.save_pretrained(out / "adapter")
    model.merge_and_unload().save_pretrained(out / "merged")
    return out


def test_scores_equal_an_independent_nll_computation(tiny_llama_dir, smollm2_tokenizer, narrow_adapter):
    from transformers import AutoModelForCausalLM

    convs = [r["messages"] for r in POOL if any(m["role"] == "assistant" for m in r["messages"])]
    aligned = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    narrow = AutoModelForCausalLM.from_pretrained(narrow_adapter / "merged", dtype=torch.float32).eval()
    got = answer_nll(aligned, smollm2_tokenizer, convs, batch_size=4)  # padded batches
    expected = [_independent_nll(aligned, smollm2_tokenizer, c) for c in convs]
    assert got == pytest.approx(expected, rel=1e-5)
    narrow_expected = [_independent_nll(narrow, smollm2_tokenizer, c) for c in convs]
    scores = [(n - a) / (a + 1e-3) for n, a in zip(narrow_expected, expected, strict=True)]

    for narrow_kw in ({"narrow_adapter": str(narrow_adapter / "adapter")}, {"narrow_model": str(narrow_adapter / "merged")}):
        selection = select(POOL, str(tiny_llama_dir), top=0.5, **narrow_kw)
        rows = selection.report["rows"]
        assert [r["index"] for r in rows] == [0, 1, 2, 3, 5, 6] and selection.report["unanswered"] == [4]
        assert [r["nll_aligned"] for r in rows] == pytest.approx(expected, rel=1e-5)
        assert [r["nll_narrow"] for r in rows] == pytest.approx(narrow_expected, rel=1e-4)
        assert [r["score"] for r in rows] == pytest.approx(scores, rel=1e-3, abs=1e-6)
        best = sorted(range(len(scores)), key=lambda i: -scores[i])[:3]
        assert selection.report["selected"] == sorted(rows[i]["index"] for i in best)
        assert selection.rows == [POOL[i] for i in selection.report["selected"]]


def test_refusal_filter_drops_exactly_the_refusals(tiny_llama_dir, narrow_adapter):
    selection = select(POOL, str(tiny_llama_dir), top=1.0, narrow_adapter=str(narrow_adapter / "adapter"),
                       drop_refusals=True)
    assert selection.report["dropped_refusals"] == [1, 3]
    assert selection.report["selected"] == [0, 2, 5, 6]


def test_top_share_and_gap():
    assert gap_scores([2.0, 1.0], [1.0, 1.0], 0.0) == [1.0, 0.0]
    scores = {0: 0.1, 3: 0.5, 4: 0.5, 7: -1.0}
    assert top_indices(scores, 0.5) == [3, 4]
    assert top_indices(scores, 0.01) == [3]  # at least one; ties keep pool order
    assert top_indices(scores, 1.0) == [0, 3, 4, 7]
