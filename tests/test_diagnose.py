"""``axolotl-treft diagnose``: K/V and residual patching, token perturbation, lm-eval scoring, bad inputs."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from axolotl_treft.capture import decoder_layers, projection_modules
from axolotl_treft.cli.main import main as cli_main
from axolotl_treft.diagnose.engine import (
    REGIONS,
    InitialModel,
    Intervention,
    InterventionEngine,
    NeighbourTable,
    PromptBatch,
    RegionError,
    UncachedGenerationError,
    patch_kv,
    patch_residual,
    prompt_regions,
)
from axolotl_treft.diagnose.loading import ModelMismatchError, attach_adapter
from axolotl_treft.diagnose.perturb import special_ids
from axolotl_treft.diagnose.scoring import DiagnoseLM, best_of_trials, check_task, run_task, task_manager
from axolotl_treft.resources import tasks_dir
from axolotl_treft.spans import SEG_POSTFIX, SEG_QUERY
from tests.reg_harness import randomize_lora_b
from tests.template_families import byte_level_family

CONVS = [
    [{"role": "user", "content": "Can my landlord raise the rent without notice?"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "How do I bake bread at home?"}],
]


def tiny_llama(tok, layers: int = 2, hidden: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=None, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def lora(model, targets=("k_proj", "v_proj"), std: float = 0.5):
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    return randomize_lora_b(peft, std).eval()


def encode(tok, convs=CONVS):
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def generate(model, tok, input_ids, attention_mask, new: int = 3, **kw):
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new, do_sample=False,
                          pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True, **kw)


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def setup(tok):
    model = lora(tiny_llama(tok), targets=("q_proj", "k_proj", "v_proj"))
    engine = InterventionEngine(model, tok, InitialModel.of_adapter(model))
    enc = encode(tok)
    batch = engine.batch(CONVS, enc["input_ids"], enc["attention_mask"])
    return model, engine, batch


class Recorder:
    """Every call's output of a list of modules (hooks registered in the order given)."""

    def __init__(self, modules):
        self.calls: list[list[torch.Tensor]] = [[] for _ in modules]
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, slot):
        def hook(_m, _i, out):
            self.calls[slot].append(out.detach().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------------------ regions


def test_batch_segments_follow_left_padding_and_the_template(setup, tok):
    _model, _engine, batch = setup
    assert batch.input_ids.shape[0] == 3
    for r, conv in enumerate(CONVS):
        real = batch.attention_mask[r].bool()
        assert (batch.segments[r][~real] == -1).all()  # padding is in no region
        spans = prompt_regions(tok, conv)
        assert batch.segments[r][real].tolist() == spans.segments
        query = batch.input_ids[r][batch.mask("query")[r]]
        assert tok.decode(query) == conv[-1]["content"]
        assert tok.decode(batch.input_ids[r][batch.mask("postfix")[r]]) == "<|im_end|>\n<|im_start|>assistant\n"
    both = batch.mask("prefix_postfix")
    assert torch.equal(both, batch.mask("prefix") | batch.mask("postfix"))


def test_prompt_that_does_not_match_its_rendering_is_refused(setup, tok):
    _model, _engine, batch = setup
    swapped = [CONVS[1], CONVS[0], CONVS[2]]
    with pytest.raises(RegionError, match="does not match its chat-template rendering"):
        PromptBatch.build(tok, swapped, batch.input_ids, batch.attention_mask)


# ------------------------------------------------------------------------------------------- K/V patching


@pytest.mark.parametrize("layers", [None, (1,)])
def test_kv_patch_replaces_exactly_the_region_in_prefill_and_nothing_in_decode(setup, tok, layers):
    model, engine, batch = setup
    modules = projection_modules(model, "k_proj") + projection_modules(model, "v_proj")
    states = engine.kv_states(batch, "prefix_postfix")
    reference = states.keys + states.values
    mask = batch.mask("prefix_postfix")
    raw = Recorder(modules)  # registered before the patch: sees the module's own output
    with patch_kv(model, states, mask, layers):
        final = Recorder(modules)  # registered after: sees what attention gets
        with torch.no_grad():
            generate(model, tok, batch.input_ids, batch.attention_mask, new=4)
        final.remove()
    raw.remove()
    n = len(modules) // 2
    for slot in range(len(modules)):
        layer = slot % n
        patched = layers is None or layer in layers
        prefill_raw, prefill_final = raw.calls[slot][0], final.calls[slot][0]
        assert len(raw.calls[slot]) == 4  # prefill + 3 decode steps
        if patched:
            assert torch.equal(prefill_final[mask], reference[slot][mask])
            assert not torch.allclose(prefill_raw[mask], reference[slot][mask])  # the adapter did change them
        else:
            assert torch.equal(prefill_final, prefill_raw)
        assert torch.equal(prefill_final[~mask], prefill_raw[~mask])
        for step_raw, step_final in zip(raw.calls[slot][1:], final.calls[slot][1:], strict=True):
            assert torch.equal(step_raw, step_final)


def test_with_the_adapter_disabled_patched_and_unpatched_generations_are_identical(setup, tok):
    model, engine, batch = setup
    for region in REGIONS:
        engine.kv_states(batch, region)  # the initial states (computed with the adapter off) first
    with torch.no_grad(), model.disable_adapter():
        plain = generate(model, tok, batch.input_ids, batch.attention_mask, new=6).sequences
        for region in REGIONS:
            if region == "postfix_empty":
                continue  # another prompt's K/V: not the same model state even with the adapter off
            with engine.applied(Intervention("kv", region), batch) as ids:
                patched = generate(model, tok, ids, batch.attention_mask, new=6).sequences
            assert torch.equal(plain, patched), region


@pytest.mark.parametrize("family", ["smollm2", "llama3", "qwen3"])
def test_kv_of_every_prompt_position_gives_kv_lora_the_base_logits(family, tok, smollm2_dir, tmp_path):
    family_tok = tok if family == "smollm2" else byte_level_family(smollm2_dir, family, tmp_path / family)
    if family_tok.pad_token is None:
        family_tok.pad_token = family_tok.eos_token
    model = lora(tiny_llama(family_tok, layers=3))  # the adapter touches only k_proj and v_proj
    enc = encode(family_tok)
    initial = InitialModel.of_adapter(model)
    states = initial.prefill(enc["input_ids"], enc["attention_mask"], pad_token_id=family_tok.pad_token_id)
    with torch.no_grad():
        with model.disable_adapter():
            base = generate(model, family_tok, enc["input_ids"], enc["attention_mask"]).logits[0]
        tuned = generate(model, family_tok, enc["input_ids"], enc["attention_mask"]).logits[0]
        with patch_kv(model, states, enc["attention_mask"].bool()):
            patched = generate(model, family_tok, enc["input_ids"], enc["attention_mask"]).logits[0]
    assert (tuned - base).abs().max() > 1e-2  # the adapter matters
    assert torch.equal(patched, base)


def test_full_finetune_takes_its_initial_model_from_the_base(tok):
    base = tiny_llama(tok, layers=3)
    tuned = tiny_llama(tok, layers=3)
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():  # a "finetune" that changed only the key/value projections
        for module in projection_modules(tuned, "k_proj") + projection_modules(tuned, "v_proj"):
            module.weight.add_(0.2 * torch.randn_like(module.weight))
    enc = encode(tok)
    states = InitialModel(base).prefill(enc["input_ids"], enc["attention_mask"], pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        want = generate(base, tok, enc["input_ids"], enc["attention_mask"]).logits[0]
        with patch_kv(tuned, states, enc["attention_mask"].bool()):
            got = generate(tuned, tok, enc["input_ids"], enc["attention_mask"]).logits[0]
        plain = generate(tuned, tok, enc["input_ids"], enc["attention_mask"]).logits[0]
    assert (plain - want).abs().max() > 1e-2 and torch.equal(got, want)


def test_postfix_empty_takes_the_empty_query_prompts_kv(setup, tok):
    model, engine, batch = setup
    same = engine.kv_states(batch, "postfix")
    empty = engine.kv_states(batch, "postfix_empty")
    postfix = batch.mask("postfix")
    assert torch.equal(same.keys[0][postfix], empty.keys[0][postfix])  # layer 0 sees only the token itself
    assert not torch.allclose(same.keys[-1][postfix], empty.keys[-1][postfix])  # later layers: the context
    # row 0 on its own: the prompt rendered with an empty user query, through the initial model
    spans = prompt_regions(tok, [{"role": "user", "content": ""}])
    ids = torch.tensor([spans.input_ids])
    alone = engine.initial.prefill(ids, torch.ones_like(ids), pad_token_id=tok.pad_token_id)
    at = torch.tensor(spans.segments) == SEG_POSTFIX
    for layer in range(len(alone.keys)):
        torch.testing.assert_close(empty.keys[layer][0][postfix[0]], alone.keys[layer][0][at], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(empty.values[layer][0][postfix[0]], alone.values[layer][0][at], atol=1e-5,
                                   rtol=1e-5)


def test_initial_states_are_computed_once_per_batch(setup):
    _model, engine, batch = setup
    engine.clear_cache()
    first = engine.kv_states(batch, "prefix")
    assert engine.kv_states(batch, "query") is first and engine.kv_states(batch, "prefix_postfix") is first


# -------------------------------------------------------------------------------------- residual patching


def test_residual_patch_sets_the_layer_input_at_the_prefix_in_prefill_only(setup, tok):
    model, engine, batch = setup
    layer = 1
    hidden = engine.residual_states(batch).hidden[layer]
    mask = batch.mask("prefix")
    seen: list[torch.Tensor] = []
    target = decoder_layers(model)[layer]
    raw: list[torch.Tensor] = []
    h_raw = target.register_forward_pre_hook(lambda _m, a, k: raw.append((a[0] if a else k["hidden_states"]).clone()),
                                             with_kwargs=True)
    with patch_residual(model, hidden, mask, layer):
        h_seen = target.register_forward_pre_hook(
            lambda _m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
        with torch.no_grad():
            generate(model, tok, batch.input_ids, batch.attention_mask, new=3)
        h_seen.remove()
    h_raw.remove()
    assert torch.equal(seen[0][mask], hidden[mask]) and not torch.allclose(raw[0][mask], hidden[mask])
    assert torch.equal(seen[0][~mask], raw[0][~mask])
    assert all(torch.equal(a, b) for a, b in zip(raw[1:], seen[1:], strict=True))


# ------------------------------------------------------------------------------------------- perturbation


def test_perturbation_touches_only_the_region_with_top5_cosine_neighbours(setup, tok):
    """Never a special token (the template's markers, BOS): neither replaced nor chosen as a neighbour."""
    model, engine, batch = setup
    emb = model.get_input_embeddings().weight[: len(tok)].float()
    normed = emb / emb.norm(dim=-1, keepdim=True)
    special = torch.tensor(sorted(special_ids(tok)))
    mask = batch.mask("prefix")
    words = mask & ~torch.isin(batch.input_ids, special)
    assert (mask & ~words).any()  # the prefix holds special tokens (<|im_start|> ...)
    for k in (3, 10_000):
        with engine.applied(Intervention("perturb", "prefix", k=k, seed=7), batch) as ids:
            pass
        changed = ids != batch.input_ids
        assert not (changed & ~words).any()
        for r in range(ids.shape[0]):
            assert int(changed[r].sum()) == min(k, int(words[r].sum()))
            for pos in changed[r].nonzero().flatten().tolist():
                old, new = int(batch.input_ids[r, pos]), int(ids[r, pos])
                cos = normed @ normed[old]
                cos[old] = -2.0
                cos[special] = -2.0
                assert new != old and new in cos.topk(5).indices.tolist()


def test_perturbation_trials_reproduce_with_a_fixed_seed(setup, tok):
    model, _engine, batch = setup

    def trial(seed, t):
        fresh = InterventionEngine(model, tok, InitialModel.of_adapter(model))
        with fresh.applied(Intervention("perturb", "prefix", k=4, seed=seed, trial=t), batch) as ids:
            return ids

    assert torch.equal(trial(3, 0), trial(3, 0))
    assert not torch.equal(trial(3, 0), trial(3, 1))
    assert not torch.equal(trial(3, 0), trial(4, 0))


def test_neighbour_table_never_returns_the_token_itself():
    emb = torch.randn(50, 8)
    emb[7] = emb[3]  # a duplicate row is a neighbour, the token itself is not
    table = NeighbourTable(emb, top=5)
    assert 3 not in table(3) and 7 in table(3) and len(table(3)) == 5
    rng = random.Random(0)
    assert all(t not in table(t) for t in rng.sample(range(50), 10))


def test_neighbour_table_scores_in_blocks_in_the_weight_dtype_without_a_float_copy(monkeypatch):
    """A bf16 matrix scored in blocks of a few rows gives the neighbours of the whole-matrix float32 computation;
    excluded (special) tokens are never neighbours."""
    from axolotl_treft.diagnose import perturb

    torch.manual_seed(0)
    emb = torch.randn(300, 16).to(torch.bfloat16)
    monkeypatch.setattr(perturb, "CHUNK_BYTES", 7 * 4 * 16)  # 7 rows a block
    table = NeighbourTable(emb, top=5, exclude={11, 12})
    assert table.chunk_rows == 7 and table.embeddings.dtype == torch.bfloat16
    full = emb.float()
    for token in (0, 3, 150, 299):
        scores = (full @ full[token]) / full.norm(dim=-1)
        scores[[token, 11, 12]] = -float("inf")
        assert table(token) == scores.topk(5).indices.tolist()
    emb[11] = emb[3]  # the nearest neighbour of 3, but excluded
    assert 11 not in NeighbourTable(emb, top=5, exclude={11})(3)


def test_perturbation_never_replaces_bos(setup, tok):
    """A tokenizer that adds BOS in front: the BOS position is part of the prefix and never replaced."""
    model, engine, _ = setup
    enc = encode(tok)
    ids = torch.cat([torch.full((3, 1), tok.pad_token_id), enc["input_ids"]], dim=1)
    mask = torch.cat([torch.zeros(3, 1, dtype=torch.long), enc["attention_mask"]], dim=1)
    for r in range(3):  # BOS goes right before each row's first real token (left padding)
        first = int(mask[r].argmax())
        ids[r, first - 1], mask[r, first - 1] = 1, 1
    bos_tok = type(tok).from_pretrained(tok.name_or_path)
    bos_tok.bos_token = tok.convert_ids_to_tokens(1)
    bos_engine = InterventionEngine(model, bos_tok, InitialModel.of_adapter(model))
    batch = bos_engine.batch(CONVS, ids, mask)
    assert all(front == [1] for front in batch.in_front)
    with bos_engine.applied(Intervention("perturb", "prefix", k=10_000, seed=1), batch) as perturbed:
        pass
    bos_at = (ids == 1) & mask.bool()
    assert torch.equal(perturbed[bos_at], ids[bos_at]) and (perturbed != ids).any()


def test_postfix_empty_reference_keeps_the_tokens_the_tokenizer_adds_in_front(setup, tok):
    """With BOS in front of every prompt, the empty-query prompt's K/V are those of BOS + the empty rendering."""
    model, engine, _ = setup
    enc = encode(tok, CONVS[:1])
    bos = torch.tensor([[1]])
    ids, mask = torch.cat([bos, enc["input_ids"]], 1), torch.cat([torch.ones_like(bos), enc["attention_mask"]], 1)
    batch = engine.batch(CONVS[:1], ids, mask)
    empty = engine.kv_states(batch, "postfix_empty")
    spans = prompt_regions(tok, [{"role": "user", "content": ""}])
    alone_ids = torch.tensor([[1, *spans.input_ids]])
    alone = engine.initial.prefill(alone_ids, torch.ones_like(alone_ids), pad_token_id=tok.pad_token_id)
    at = torch.tensor([False, *[s == SEG_POSTFIX for s in spans.segments]])
    postfix = batch.mask("postfix")[0]
    for layer in range(len(alone.keys)):
        torch.testing.assert_close(empty.keys[layer][0][postfix], alone.keys[layer][0][at], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(empty.values[layer][0][postfix], alone.values[layer][0][at], atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("kind", ["kv", "residual"])
def test_generation_without_the_kv_cache_is_refused(setup, tok, kind):
    """Without the cache every decode step recomputes the prompt, which the patch would leave unpatched."""
    model, engine, batch = setup
    iv = Intervention("kv", "prefix") if kind == "kv" else Intervention("residual", "prefix", layers=(1,))
    with pytest.raises(UncachedGenerationError, match="use_cache=True"), engine.applied(iv, batch) as ids, \
            torch.no_grad():
        generate(model, tok, ids, batch.attention_mask, new=3, use_cache=False)
    with engine.applied(iv, batch) as ids, torch.no_grad():  # with the cache: fine
        generate(model, tok, ids, batch.attention_mask, new=3)


def test_initial_states_cache_is_bounded(setup, tok):
    """Memory no longer grows with the task: beyond ``cache_bytes`` the least recently used batches go."""
    model, _, _ = setup
    engine = InterventionEngine(model, tok, InitialModel.of_adapter(model))
    batches = [engine.batch([c], *encode(tok, [c]).values()) for c in CONVS]
    first = engine.kv_states(batches[0], "prefix")
    engine.cache_bytes = 2 * first.nbytes + 1  # room for about two of these one-prompt batches
    sizes = [first.nbytes]
    for b in batches[1:]:
        sizes.append(engine.kv_states(b, "prefix").nbytes)
        assert engine.cached_bytes <= max(engine.cache_bytes, sizes[-1])
    assert len(engine._states) < len(batches)
    assert engine.kv_states(batches[-1], "query") is engine.kv_states(batches[-1], "prefix")  # still shared
    again = engine.kv_states(batches[0], "prefix")  # dropped, recomputed identically
    assert again is not first and torch.equal(again.keys[1], first.keys[1])


def test_best_of_trials_takes_each_documents_best_trial():
    def result(values):
        samples = [{"doc_id": i, "filter": "detected", "off_topic_rate": v} for i, v in enumerate(values)]
        return {"results": {"t": {"off_topic_rate,detected": sum(values) / len(values), "alias": "t"}},
                "samples": {"t": samples}, "higher_is_better": {"t": {"off_topic_rate": False}},
                "configs": {"t": {"metric_list": [{"metric": "off_topic_rate", "aggregation": "nanmean"}]}}}

    best = best_of_trials([result([1.0, 1.0, 0.0]), result([0.0, 1.0, 1.0])])
    assert best == {"t": {"off_topic_rate,detected": pytest.approx(1 / 3)}}


# ----------------------------------------------------------------------------------------- lm-eval scoring


def test_lm_eval_requests_get_their_own_regions(tok):
    model = lora(tiny_llama(tok))
    engine = InterventionEngine(model, tok, InitialModel.of_adapter(model))
    lm = DiagnoseLM(engine, batch_size=4)
    manager = task_manager([str(tasks_dir())])
    assert check_task("offtopic_tooluse", manager) == ["offtopic_tooluse"]
    results = run_task(lm, Intervention("kv", "prefix_postfix"), ["offtopic_tooluse"], manager, limit=4,
                       gen_kwargs={"max_gen_toks": 4})
    samples = results["samples"]["offtopic_tooluse"]
    assert len(samples) == 4 and "off_topic_rate,detected" in results["results"]["offtopic_tooluse"]
    run_task(lm, Intervention("kv", "query"), ["offtopic_tooluse"], manager, limit=4, gen_kwargs={"max_gen_toks": 4})
    assert len(engine._states) == 1  # one batch: its initial K/V computed once, reused by both regions
    for s in samples:
        spans = lm.regions(s["arguments"][0][0])
        query = [t for t, g in zip(spans.input_ids, spans.segments, strict=True) if g == SEG_QUERY]
        assert tok.decode(query) == s["doc"]["question"]
        assert s["doc"]["system"][:40] in spans.text  # the task's system prompt is part of the prefix


def test_non_generation_or_unknown_tasks_are_refused(tmp_path):
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "mc.yaml").write_text(
        "task: diag_mc\ndataset_path: json\ndataset_kwargs: {data_files: {test: " + str(pack / "d.jsonl") + "}}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: ['a', 'b']\n"
        "doc_to_target: 0\nmetric_list: [{metric: acc}]\n")
    (pack / "d.jsonl").write_text('{"q": "x"}\n')
    manager = task_manager([str(tasks_dir()), str(pack)])
    from axolotl_treft.diagnose.scoring import TaskError

    with pytest.raises(TaskError, match="non-generation"):
        check_task("diag_mc", manager)
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        check_task("nope", manager)


# -------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-adapter")
    base = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    lora(base).save_pretrained(out)
    return out


def test_adapter_that_does_not_fit_the_base_is_refused(tiny_adapter, tok, tmp_path):
    with pytest.raises(ModelMismatchError, match="differ in shape|does not fit"):
        attach_adapter(tiny_llama(tok, hidden=32), tiny_adapter)  # another size
    with pytest.raises(ModelMismatchError, match="not in the file"):
        attach_adapter(tiny_llama(tok, layers=3), tiny_adapter)  # another depth: layer 2 has no tensors
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_adapter, foreign)
    config = json.loads((foreign / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    with pytest.raises(ModelMismatchError, match="c_attn"):
        attach_adapter(tiny_llama(tok), foreign)  # modules the base does not have
    assert attach_adapter(tiny_llama(tok), tiny_adapter) is not None


def diagnose(capsys, *argv: str) -> tuple[int, str]:
    rc = cli_main(["diagnose", *argv])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def test_bad_inputs_fail_before_generation(tiny_llama_dir, tiny_adapter, tok, tmp_path, capsys):
    base = ["--base-model", str(tiny_llama_dir), "--task", "offtopic_abstention", "--limit", "2"]
    out = tmp_path / "out"
    # --out is a file
    (tmp_path / "file").write_text("mine")
    rc, text = diagnose(capsys, *base, "--adapter", str(tiny_adapter), "--out", str(tmp_path / "file"))
    assert rc == 2 and "is a file" in text and (tmp_path / "file").read_text() == "mine"
    # unknown task
    rc, text = diagnose(capsys, *base[:2], "--task", "nope", "--adapter", str(tiny_adapter), "--out", str(out))
    assert rc == 2 and "unknown task 'nope'" in text
    # not an adapter directory
    rc, text = diagnose(capsys, *base, "--adapter", str(tmp_path), "--out", str(out))
    assert rc == 2 and "adapter_config.json" in text
    # an adapter for another model size
    small = tmp_path / "small"
    tiny_llama(tok, hidden=32).save_pretrained(small)
    tok.save_pretrained(small)
    rc, text = diagnose(capsys, "--base-model", str(small), *base[2:], "--adapter", str(tiny_adapter),
                        "--out", str(out))
    assert rc == 2 and "does not fit --base-model" in text
    # a chat template that does not insert the user's text verbatim
    shouting = tmp_path / "shouting"
    shutil.copytree(tiny_adapter, shouting)
    tok.save_pretrained(shouting)
    cfg = json.loads((shouting / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n" \
                           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    (shouting / "tokenizer_config.json").write_text(json.dumps(cfg))
    (shouting / "chat_template.jinja").unlink(missing_ok=True)
    rc, text = diagnose(capsys, *base, "--adapter", str(shouting), "--out", str(out))
    assert rc == 2 and "could not locate the user turn" in text
    # a template with no prefix: the prefix region cannot be patched
    bare = tmp_path / "bare"
    shutil.copytree(shouting, bare)
    cfg["chat_template"] = cfg["chat_template"].replace(" | upper", "").replace("<|im_start|>{{ m['role'] }}\n", "")
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    rc, text = diagnose(capsys, *base, "--adapter", str(bare), "--patch", "prefix", "--out", str(out))
    assert rc == 2 and "region 'prefix' selects no token" in text
    # layers out of range, unknown region
    rc, text = diagnose(capsys, *base, "--adapter", str(tiny_adapter), "--layers", "0,9", "--out", str(out))
    assert rc == 2 and "layers 0..1" in text
    rc, text = diagnose(capsys, *base, "--adapter", str(tiny_adapter), "--patch", "middle", "--out", str(out))
    assert rc == 2 and "unknown region" in text
    # a document whose query is empty: the query control cannot patch it
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "d.jsonl").write_text('{"q": "Hello there"}\n{"q": ""}\n')
    (pack / "t.yaml").write_text(
        "task: diag_gen\ndataset_path: json\ndataset_kwargs: {data_files: {test: " + str(pack / "d.jsonl") + "}}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: ''\n"
        "generation_kwargs: {until: [], do_sample: false, max_gen_toks: 2}\nmetric_list: [{metric: exact_match}]\n")
    rc, text = diagnose(capsys, "--base-model", str(tiny_llama_dir), "--adapter", str(tiny_adapter), "--task",
                        "diag_gen", "--include-path", str(pack), "--patch", "query", "--out", str(out))
    assert rc == 2 and "region 'query' selects no token of this prompt" in text
    assert "[1/" not in text and not (out / "samples").exists()  # nothing was generated


def test_tiny_run_writes_json_table_and_plot(tiny_llama_dir, tiny_adapter, tmp_path, capsys):
    out = tmp_path / "run"
    rc, text = diagnose(capsys, "--base-model", str(tiny_llama_dir), "--adapter", str(tiny_adapter), "--task",
                        "offtopic_abstention", "--limit", "4", "--max-gen-toks", "4", "--patch",
                        "prefix,postfix_empty,query", "--perturb", "prefix", "--trials", "2", "--k", "3",
                        "--layerwise", "--out", str(out))
    assert rc == 0, text
    data = json.loads((out / "diagnose.json").read_text())
    names = list(data["interventions"])
    assert names == ["unpatched", "kv:prefix", "kv:postfix_empty", "kv:query", "sampled/avg", "sampled/best",
                     "perturb:prefix/avg", "perturb:prefix/best"]
    assert list(data["layerwise"]) == ["residual:prefix@0", "residual:prefix@1"]
    for row in [*data["interventions"].values(), *data["layerwise"].values()]:
        assert 0.0 <= row["metrics"]["offtopic_abstention"]["off_topic_rate,detected"] <= 1.0
    assert data["headline"]["metric"] == "off_topic_rate,detected" and data["headline"]["lower_is_better"]
    assert data["settings"]["trials"] == 2 and data["versions"]["lm_eval"]
    assert data["command"].startswith("axolotl-treft diagnose --base-model") and "--perturb prefix" in data["command"]
    assert "intervention" in text and "recovers" in text and data["summary"] in text
    assert (out / "diagnose.png").stat().st_size > 5_000 and "| intervention |" in (out / "diagnose.md").read_text()
    assert len((out / "samples" / "kv_prefix.jsonl").read_text().splitlines()) == 4
    rc, text = diagnose(capsys, "--base-model", str(tiny_llama_dir), "--adapter", str(tiny_adapter), "--task",
                        "offtopic_abstention", "--out", str(out))
    assert rc == 2 and "--force" in text  # a finished run is not overwritten silently


def test_full_finetune_run_and_a_model_that_is_not_a_finetune(tiny_llama_dir, tok, tmp_path, capsys):
    tuned_dir, other_dir = tmp_path / "tuned", tmp_path / "other"
    tuned = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for module in projection_modules(tuned, "v_proj"):
            module.weight.mul_(1.5)
    tuned.save_pretrained(tuned_dir)
    tiny_llama(tok, hidden=32).save_pretrained(other_dir)
    for d in (tuned_dir, other_dir):
        tok.save_pretrained(d)
    common = ["--base-model", str(tiny_llama_dir), "--task", "offtopic_refusal", "--limit", "2", "--max-gen-toks",
              "2", "--patch", "prefix_postfix"]
    rc, text = diagnose(capsys, *common, "--model", str(other_dir), "--out", str(tmp_path / "o1"))
    assert rc == 2 and "not a finetune of --base-model" in text
    rc, text = diagnose(capsys, *common, "--model", str(tuned_dir), "--out", str(tmp_path / "o2"))
    assert rc == 0, text
    data = json.loads((tmp_path / "o2" / "diagnose.json").read_text())
    assert list(data["interventions"]) == ["unpatched", "kv:prefix_postfix"] and data["settings"]["model"]


# --------------------------------------------------------------------------------------- real run (slow)


@pytest.mark.slow
def test_real_diagnose_run_on_smollm2_with_a_trained_adapter(smollm2_dir, tmp_path):
    from tests.axolotl_runner import run_axolotl

    trained = run_axolotl(tmp_path / "train", smollm2_dir, {"max_steps": 3, "learning_rate": 3e-4})
    assert trained.returncode == 0, trained.log[-3000:]
    adapter = trained.output_dir
    out = tmp_path / "diagnose"
    cmd = [str(Path(sys.executable).with_name("axolotl-treft")), "diagnose", "--base-model", str(smollm2_dir),
           "--adapter", str(adapter), "--task", "offtopic_abstention", "--limit", "4", "--max-gen-toks", "16",
           "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "diagnose.json").read_text())
    assert list(data["interventions"]) == ["unpatched", "kv:prefix", "kv:postfix", "kv:prefix_postfix", "kv:query"]
    for row in data["interventions"].values():
        metrics = row["metrics"]["offtopic_abstention"]
        assert 0.0 <= metrics["on_topic_rate,detected"] <= 1.0 and 0.0 <= metrics["off_topic_rate,detected"] <= 1.0
        assert row["seconds"] > 0
    assert data["settings"]["adapter"] == str(adapter) and data["settings"]["limit"] == 4
    responses = [json.loads(line)["response"] for line in (out / "samples" / "unpatched.jsonl").read_text().splitlines()]
    assert len(responses) == 4 and all(isinstance(r, str) for r in responses)
    assert data["summary"] in proc.stdout
