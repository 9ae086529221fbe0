"""Drive a regularizer through one training micro-step the way TReFTTrainer does, on a tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from axolotl_treft.reference import Reference
from axolotl_treft.regularizers.base import StepBatch, capture_policy, regularized_terms
from axolotl_treft.spans import conversation_spans

CONVS = [
    [{"role": "user", "content": "Can my landlord raise the rent?"}, {"role": "assistant", "content": "No idea."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is a verbal deal binding?"},
     {"role": "assistant", "content": "I have no idea about your question."}],
]


def randomize_lora_b(model, std: float = 0.05):
    """Give every LoRA B a random non-zero value, so the adapter changes the model (B starts at 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    return model


def lora_model(path, nonzero_b: bool = True):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    if nonzero_b:
        randomize_lora_b(model)
    model.train()
    return model


def pad_rows(tok, rows):
    """Right-pad ``(input_ids, segments, labels)`` tensors into a batch: (inputs, segments)."""
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id or 0)
    seg = torch.full((len(rows), width), -1, dtype=torch.int8)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (row_ids, row_seg, row_labels) in enumerate(rows):
        n = len(row_ids)
        ids[i, :n], seg[i, :n], mask[i, :n], labels[i, :n] = row_ids, row_seg, 1, row_labels
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, seg


def padded_batch(tok, convs=CONVS):
    rows = []
    for s in (conversation_spans(tok, c) for c in convs):
        ids = torch.tensor(s.input_ids)
        seg = torch.tensor(s.segments, dtype=torch.int8)
        rows.append((ids, seg, torch.where(seg == 0, ids, torch.tensor(-100))))
    return pad_rows(tok, rows)


def fake_trainer(model):
    return SimpleNamespace(model=model, accelerator=Accelerator(cpu=True), state=SimpleNamespace(global_step=0))


def run_step(reg, model, inputs, segments):
    """Policy forward with captures, shared reference pass, term. Returns (term, sft_loss)."""
    reference = Reference(fake_trainer(model))
    reg.setup(model, reference)
    try:
        batch = StepBatch.from_inputs(inputs, segments)
        with capture_policy([reg], batch) as states:
            out = model(**inputs, use_cache=False)  # as in training (Axolotl disables the cache)
        (term,) = regularized_terms(reference, batch, [reg], states, out, model)
        reg.end_step()
    finally:
        reg.close()  # as the trainer does when training ends or raises
    return term, out.loss


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
