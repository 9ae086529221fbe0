"""Drive a regularizer through one training micro-step the way TReFTTrainer does, on a tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from axolotl_treft.reference import Reference
from axolotl_treft.regularizers.base import StepBatch, run_reference_pass
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


def padded_batch(tok, convs=CONVS):
    spans = [conversation_spans(tok, c) for c in convs]
    width = max(len(s.input_ids) for s in spans)
    ids = torch.full((len(spans), width), tok.pad_token_id or 0)
    seg = torch.full((len(spans), width), -1, dtype=torch.int8)
    mask = torch.zeros((len(spans), width), dtype=torch.long)
    labels = torch.full((len(spans), width), -100)
    for i, s in enumerate(spans):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        seg[i, :n] = torch.tensor(s.segments, dtype=torch.int8)
        mask[i, :n] = 1
        resp = torch.tensor(s.segments) == 0
        labels[i, :n] = torch.where(resp, torch.tensor(s.input_ids), torch.tensor(-100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, seg


def fake_trainer(model):
    return SimpleNamespace(model=model, accelerator=Accelerator(cpu=True), state=SimpleNamespace(global_step=0))


def run_step(reg, model, inputs, segments):
    """Policy forward with captures, shared reference pass, term. Returns (term, sft_loss)."""
    reference = Reference(fake_trainer(model))
    reg.setup(model, reference)
    batch = StepBatch.from_inputs(inputs, segments)
    with reg.policy_capture(batch):
        out = model(**inputs, use_cache=False)  # as in training (Axolotl disables the cache)
    result = run_reference_pass(reference, batch, [reg])
    term = reg.compute(batch, out, result, model)
    reg.end_step()
    reg.close()
    return term, out.loss


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
