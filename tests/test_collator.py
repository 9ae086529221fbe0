"""Segments stay aligned with tokens through Axolotl's own collators: padding, packing, truncation."""

from __future__ import annotations

import torch
from axolotl.utils.collators.batching import DataCollatorForSeq2Seq, V2BatchSamplerDataCollatorForSeq2Seq

from axolotl_treft.collator import PAD_SEGMENT, SegmentsCollator
from axolotl_treft.regularizers.base import StepBatch
from axolotl_treft.spans import SEG_PREFIX, SEG_QUERY, SEGMENTS_KEY, conversation_spans


def samples(tok):
    out = []
    for q in ("Can my landlord raise the rent?", "Is a verbal agreement binding in Texas?", "Do I need a lawyer?"):
        conv = [{"role": "user", "content": q}, {"role": "assistant", "content": "I have no idea about your question."}]
        s = conversation_spans(tok, conv)
        out.append({"input_ids": list(s.input_ids), "attention_mask": [1] * len(s.input_ids),
                    "labels": [-100] * len(s.input_ids), SEGMENTS_KEY: list(s.segments)})
    return out


def test_padding_collator_pads_segments_with_minus_one(smollm2_tokenizer):
    tok = smollm2_tokenizer
    feats = samples(tok)
    coll = SegmentsCollator(DataCollatorForSeq2Seq(tok, padding=True, pad_to_multiple_of=64), padding_side="right")
    batch = coll([dict(f) for f in feats])
    seg = batch[SEGMENTS_KEY]
    assert seg.shape == batch["input_ids"].shape and seg.shape[1] == 64
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert seg[i, :n].tolist() == f[SEGMENTS_KEY]
        assert (seg[i, n:] == PAD_SEGMENT).all()
        assert batch["input_ids"][i, :n].tolist() == f["input_ids"]
    assert SEGMENTS_KEY in feats[0]  # the dataset's rows are not mutated


def test_packing_collator_concatenates_and_respects_truncation(smollm2_tokenizer):
    tok = smollm2_tokenizer
    feats = samples(tok)
    for f in feats:
        f["position_ids"] = list(range(len(f["input_ids"])))
    # Axolotl's `excess_length_strategy: truncate` cuts input_ids/labels/... but not extra columns:
    truncated = dict(feats[2])
    for key in ("input_ids", "attention_mask", "labels", "position_ids"):
        truncated[key] = truncated[key][:30]
    bins = [[feats[0], feats[1]], [truncated]]
    coll = SegmentsCollator(V2BatchSamplerDataCollatorForSeq2Seq(tok, padding=True, pad_to_multiple_of=64))
    batch = coll(bins)
    seg, ids = batch[SEGMENTS_KEY], batch["input_ids"]
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert seg[0, :n0].tolist() == feats[0][SEGMENTS_KEY]
    assert seg[0, n0:n0 + n1].tolist() == feats[1][SEGMENTS_KEY]
    assert (seg[0, n0 + n1:] == PAD_SEGMENT).all()
    assert seg[1, :30].tolist() == feats[2][SEGMENTS_KEY][:30] and (seg[1, 30:] == PAD_SEGMENT).all()
    assert ids[0, n0:n0 + n1].tolist() == feats[1]["input_ids"]

    # the per-step view finds three samples, each with its own prefix and query
    inputs = {k: v for k, v in batch.items() if k != SEGMENTS_KEY}
    step = StepBatch.from_inputs(inputs, seg)
    assert step.n_samples == 3
    for sid in range(3):
        in_sample = step.sample_index == sid
        assert ((step.segments == SEG_PREFIX) & in_sample).any()
        assert ((step.segments == SEG_QUERY) & in_sample).any()
    assert (step.sample_index[~step.valid] == -1).all()
    assert torch.equal(step.valid, seg != PAD_SEGMENT)
