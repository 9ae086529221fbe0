"""Step-time ratios of every regularizer vs plain LoRA SFT, measured *interleaved* in one process.

On a shared machine a sequential benchmark mixes the cost of a configuration with whatever else ran at
that moment. Here every iteration runs one training step of each configuration in turn (SFT included),
on the same SmolLM2-135M LoRA model, batch and optimizer, through the same code the trainer runs
(captures around the SFT forward, one shared reference pass, the terms, backward, AdamW step), so load
changes hit all configurations alike. Reported: median step time and the ratio to SFT.

    python bench/bench_interleaved.py --iters 8 --batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from axolotl_treft.args import FeatureL2Config, KLConfig, KVConfig  # noqa: E402
from axolotl_treft.models import materialize_smollm2  # noqa: E402
from axolotl_treft.reference import Reference  # noqa: E402
from axolotl_treft.regularizers.base import ReferenceResult, StepBatch, SubBatch  # noqa: E402
from axolotl_treft.regularizers.feature_l2 import FeatureL2Regularizer  # noqa: E402
from axolotl_treft.regularizers.kl import KLRegularizer  # noqa: E402
from axolotl_treft.regularizers.kv import KVRegularizer  # noqa: E402
from axolotl_treft.spans import SEGMENTS_KEY, conversation_spans  # noqa: E402
from tests.reg_harness import fake_trainer, lora_model, padded_batch  # noqa: E402


def build(tok, convs):
    from datasets import Dataset

    spans = [conversation_spans(tok, c) for c in convs]
    dataset = Dataset.from_dict({"input_ids": [s.input_ids for s in spans], SEGMENTS_KEY: [s.segments for s in spans]})
    regs = {"sft": None}
    for mode in ("prefix", "postfix", "prefix_postfix", "query", "all"):
        regs[f"kv_{mode}"] = KVRegularizer(KVConfig(weight=5.0, tokens=mode), train_dataset=dataset)
    regs["kl_train"] = KLRegularizer(KLConfig(weight=0.5))
    regs["feature_l2"] = FeatureL2Regularizer(FeatureL2Config(weight=1.0, layers=5))
    return regs


def step(model, opt, reference, reg, inputs, segments):
    batch = StepBatch.from_inputs(inputs, segments)
    if reg is None:
        loss = model(**inputs, use_cache=False).loss
    else:
        with reg.policy_capture(batch):
            out = model(**inputs, use_cache=False)
        result, request = None, reg.reference_request(batch)
        if request is not None:
            sub = SubBatch(rows=request.rows.nonzero().squeeze(-1), length=request.length)
            with reg.reference_capture(batch, sub):
                logits = reference.forward(batch.sub_inputs(sub), logits=request.logits)
            result = ReferenceResult(sub=sub, logits=logits)
        loss = out.loss + reg.weight * reg.compute(batch, out, result, model)
    loss.backward()
    opt.step()
    opt.zero_grad()
    if reg is not None:
        reg.end_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model_dir = materialize_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(REPO / "axolotl_treft" / "data" / "abstention_legal_train.jsonl") as f:
        rows = [json.loads(line) for line in f]
    convs = [r["messages"] for r in rows[: args.batch]]
    model = lora_model(model_dir, nonzero_b=False)
    inputs, segments = padded_batch(tok, convs)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    reference = Reference(fake_trainer(model))
    regs = build(tok, convs)
    for reg in regs.values():
        if reg is not None:
            reg.setup(model, reference)
    times: dict[str, list[float]] = {name: [] for name in regs}
    for _ in range(args.iters + 1):  # the first round is warm-up
        for name, reg in regs.items():
            start = time.perf_counter()
            step(model, opt, reference, reg, inputs, segments)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["sft"][1:])
    print(f"SmolLM2-135M LoRA r=4 (q,k,v,o), batch {args.batch} x {inputs['input_ids'].shape[1]} tokens, "
          f"{args.iters} interleaved rounds, torch threads {torch.get_num_threads()}")
    print(f"{'config':<20}{'s/step':>9}{'x SFT':>8}")
    out = []
    for name, values in times.items():
        med = statistics.median(values[1:])
        out.append({"config": name, "step_s": med, "time_ratio": med / base})
        print(f"{name:<20}{med:>9.3f}{med / base:>8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
