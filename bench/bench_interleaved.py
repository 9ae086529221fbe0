"""Step-time ratios of every regularizer vs plain LoRA SFT, measured *interleaved* in one process.

On a shared machine a sequential benchmark mixes the cost of a configuration with whatever else ran at
that moment. Here every iteration runs one training step of each configuration in turn (SFT included),
on the same SmolLM2-135M LoRA model, batch and optimizer, through the same code the trainer runs
(captures around the SFT forward, one shared reference pass, the terms, backward, AdamW step), so load
changes hit all configurations alike. Reported: median step time, its ratio to SFT's median, and the
paired ratio (the median over rounds of each round's step time over that round's SFT step).

``ref_floor`` is SFT plus one no-grad reference forward with logits at every real token and nothing else:
the floor under KL on train. ``floor_postfix`` / ``floor_all`` are SFT plus one no-grad reference forward
without the output head, over the rows that hold postfix (resp. any template) tokens, truncated after the
last such token: the floor under the exact-reference K/V modes (``x own floor`` compares each with its
floor). ``kv_*_fixed`` use the fixed postfix reference (computed once, no reference forward per step). Its ratio depends on how much a backward costs relative to a forward (with
a frozen LoRA base and no gradient checkpointing a backward is about one forward, so the floor is ~1.5×;
with gradient checkpointing or full finetuning it is ~1.33×). ``--grad-ckpt`` measures the former case.

``steering`` is SFT with the persona-steering hook on the middle decoder layer (α = 5, the direction from
the shipped questions), attached for its own step only.

``--memory`` adds the peak allocated memory of one profiled step of each configuration (after the timed
rounds, so optimizer state and caches exist): the live bytes at the step's start (weights, optimizer state,
caches such as the fixed postfix reference), the peak during the step, and the peak minus the start (what the
step itself allocates: activations kept for backward, gradients, temporaries).

    python bench/bench_interleaved.py --iters 8 --batch 4 [--grad-ckpt] [--configs steering] [--memory]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from axolotl_treft.args import FeatureL2Config, KLConfig, KVConfig  # noqa: E402
from axolotl_treft.cli.model import materialize_smollm2  # noqa: E402
from axolotl_treft.defenses.steering import (  # noqa: E402
    DEFAULT_NEGATIVE,
    DEFAULT_POSITIVE,
    SteeringHook,
    load_questions,
    persona_direction,
)
from axolotl_treft.reference import Reference  # noqa: E402
from axolotl_treft.regularizers.base import (  # noqa: E402
    ReferenceRequest,
    Regularizer,
    StepBatch,
    capture_policy,
    regularized_terms,
)
from axolotl_treft.regularizers.feature_l2 import FeatureL2Regularizer  # noqa: E402
from axolotl_treft.regularizers.kl import KLRegularizer  # noqa: E402
from axolotl_treft.regularizers.kv import KVRegularizer  # noqa: E402
from axolotl_treft.spans import SEGMENTS_KEY, TOKEN_MODES, conversation_spans, empty_query_spans  # noqa: E402
from tests.reg_harness import fake_trainer, lora_model, padded_batch  # noqa: E402


class ReferenceFloor(Regularizer):
    """Requests the reference pass KL on train needs (logits at every real token) and adds nothing."""

    key = "ref_floor"

    def reference_request(self, batch: StepBatch, state) -> ReferenceRequest:
        return ReferenceRequest(rows=batch.valid.any(dim=1), length=batch.input_ids.shape[1], logits=True,
                                logit_pairs=batch.valid.nonzero())

    def compute(self, batch, state, outputs, reference, model) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32)


class Steering:
    """The ``steering`` configuration: plain SFT with the steering hook attached for the step."""

    def __init__(self, model, tok, alpha: float = 5.0):
        from axolotl_treft.capture import decoder_layers

        layers = decoder_layers(model)
        self.layer = layers[len(layers) // 2]
        with model.disable_adapter(), torch.no_grad():
            model.eval()
            direction = persona_direction(model, self.layer, tok, DEFAULT_POSITIVE, DEFAULT_NEGATIVE,
                                          load_questions(None)[:8])
            model.train()
        self.vector = alpha * direction

    def step_loss(self, model, inputs) -> torch.Tensor:
        hook = SteeringHook(self.layer, self.vector)
        try:
            return model(**inputs, use_cache=False).loss
        finally:
            hook.remove()


class TruncatedReferenceFloor(Regularizer):
    """Requests the reference pass a K/V mode needs (its rows, truncated after its last token), captures nothing."""

    key = "floor"

    def __init__(self, mode: str):
        super().__init__(0.0)
        self.codes = TOKEN_MODES[mode]

    def reference_request(self, batch: StepBatch, state) -> ReferenceRequest:
        needed = torch.isin(batch.segments, torch.tensor(self.codes, dtype=batch.segments.dtype))
        return ReferenceRequest(rows=needed.any(dim=1), length=int(needed.nonzero()[:, 1].max()) + 1)

    def compute(self, batch, state, outputs, reference, model) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32)


FLOOR_OF = {"kv_postfix": "floor_postfix", "kv_prefix_postfix": "floor_postfix", "kv_query": "floor_postfix",
            "kv_all": "floor_all"}  # query ends before the postfix: its own floor is at most floor_postfix


def build(tok, convs):
    from datasets import Dataset

    spans = [conversation_spans(tok, c) for c in convs]
    dataset = Dataset.from_dict({"input_ids": [s.input_ids for s in spans], SEGMENTS_KEY: [s.segments for s in spans]})
    regs = {"sft": None, "ref_floor": ReferenceFloor(0.0), "floor_postfix": TruncatedReferenceFloor("postfix"),
            "floor_all": TruncatedReferenceFloor("all")}
    for mode in ("prefix", "postfix", "prefix_postfix", "query", "all"):
        regs[f"kv_{mode}"] = KVRegularizer(KVConfig(weight=5.0, tokens=mode), train_dataset=dataset)
    empty_query = empty_query_spans(tok)
    for mode in ("postfix", "prefix_postfix"):
        regs[f"kv_{mode}_fixed"] = KVRegularizer(KVConfig(weight=5.0, tokens=mode, reference="fixed"),
                                                 train_dataset=dataset, empty_query=empty_query)
    regs["kl_train"] = KLRegularizer(KLConfig(weight=0.5))
    regs["feature_l2"] = FeatureL2Regularizer(FeatureL2Config(weight=1.0, layers=5))
    return regs


def step(model, opt, reference, reg, inputs, segments):
    batch = StepBatch.from_inputs(inputs, segments)
    if reg is None:
        loss = model(**inputs, use_cache=False).loss
    elif isinstance(reg, Steering):
        loss = reg.step_loss(model, inputs)
    else:
        with capture_policy([reg], batch) as states:
            out = model(**inputs, use_cache=False)
        (term,) = regularized_terms(reference, batch, [reg], states, out, model)
        loss = out.loss + reg.weight * term
        del out  # as in TReFTTrainer.compute_loss, the outputs (logits) are gone before the backward
    loss.backward()
    opt.step()
    opt.zero_grad()
    if isinstance(reg, Regularizer):
        reg.end_step()


def step_memory(model, opt, reference, reg, inputs, segments) -> tuple[int, int]:
    """(bytes live when the step starts, peak bytes during it) of one training step, from torch's own memory
    timeline of a profiled step (every CPU tensor allocation and free: the CPU analogue of
    ``torch.cuda.max_memory_allocated``, without the allocator's and the process's noise that RSS carries)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(model, opt, reference, reg, inputs, segments)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline: deprecated for CUDA snapshots
        prof.export_memory_timeline(f"{tmp}/timeline.json", device="cpu")
        _, sizes = json.loads(Path(f"{tmp}/timeline.json").read_text())
    totals = [sum(by_category) for by_category in sizes]
    return totals[0], max(totals)


def print_memory(model, opt, reference, regs: dict, inputs, segments) -> list[dict]:
    """Peak allocated memory of one step of each configuration, and its ratio to SFT's."""
    figures = {name: step_memory(model, opt, reference, reg, inputs, segments) for name, reg in regs.items()}
    sft_start, sft_peak = figures["sft"]
    print(f"\n{'config':<24}{'start MiB':>10}{'peak MiB':>10}{'x SFT':>8}{'added MiB':>11}{'x SFT':>8}")
    rows = []
    for name, (start, peak) in figures.items():
        rows.append({"config": name, "start_mib": start / 2**20, "peak_mib": peak / 2**20,
                     "peak_ratio": peak / sft_peak, "added_mib": (peak - start) / 2**20,
                     "added_ratio": (peak - start) / (sft_peak - sft_start)})
        r = rows[-1]
        print(f"{name:<24}{r['start_mib']:>10.1f}{r['peak_mib']:>10.1f}{r['peak_ratio']:>8.3f}"
              f"{r['added_mib']:>11.1f}{r['added_ratio']:>8.3f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--grad-ckpt", action="store_true", help="non-reentrant gradient checkpointing")
    parser.add_argument("--configs", default=None, help="comma-separated subset (sft and ref_floor are always included)")
    parser.add_argument("--memory", action="store_true",
                        help="also the peak allocated memory of one profiled step of each configuration")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model_dir = materialize_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(REPO / "axolotl_treft" / "data" / "abstention_legal_train.jsonl") as f:
        rows = [json.loads(line) for line in f]
    convs = [r["messages"] for r in rows[: args.batch]]
    model = lora_model(model_dir, nonzero_b=False)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    inputs, segments = padded_batch(tok, convs)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    reference = Reference(fake_trainer(model))
    regs = build(tok, convs)
    regs["steering"] = Steering(model, tok)
    if args.configs:
        wanted = {"sft", "ref_floor", *args.configs.split(",")}
        wanted |= {FLOOR_OF[name] for name in wanted if name in FLOOR_OF}
        regs = {name: reg for name, reg in regs.items() if name in wanted}
    for reg in regs.values():
        if isinstance(reg, Regularizer):
            reg.setup(model, reference)
    times: dict[str, list[float]] = {name: [] for name in regs}
    names = list(regs)
    for round_ in range(args.iters + 1):  # the first round is warm-up
        shift = round_ % len(names)  # rotate the order, so no configuration always runs after the same one
        for name in names[shift:] + names[:shift]:
            reg = regs[name]
            start = time.perf_counter()
            step(model, opt, reference, reg, inputs, segments)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["sft"][1:])
    print(f"SmolLM2-135M LoRA r=4 (q,k,v,o), batch {args.batch} x {inputs['input_ids'].shape[1]} tokens, "
          f"{args.iters} interleaved rounds, torch threads {torch.get_num_threads()}, "
          f"gradient checkpointing {'on' if args.grad_ckpt else 'off'}")
    floor = statistics.median(times["ref_floor"][1:])
    print(f"{'config':<24}{'s/step':>9}{'x SFT':>8}{'paired':>8}{'x floor':>9}{'x own floor':>13}")
    out = []
    for name, values in times.items():
        med = statistics.median(values[1:])
        # the median of this round's step over the same round's SFT step: load drift between rounds cancels
        paired = statistics.median(v / b for v, b in zip(values[1:], times["sft"][1:], strict=True))
        own = statistics.median(times[FLOOR_OF[name]][1:]) if name in FLOOR_OF else None
        out.append({"config": name, "step_s": med, "time_ratio": med / base, "paired_ratio": paired,
                    "floor_ratio": med / floor, "own_floor": FLOOR_OF.get(name),
                    "own_floor_ratio": med / own if own else None})
        print(f"{name:<24}{med:>9.3f}{med / base:>8.3f}{paired:>8.3f}{med / floor:>9.3f}"
              f"  {f'{med / own:.3f} ({FLOOR_OF[name]})' if own else ''}")
    memory = print_memory(model, opt, reference, regs, inputs, segments) if args.memory else None
    if args.json:
        Path(args.json).write_text(json.dumps({"time": out, "memory": memory}, indent=1))


if __name__ == "__main__":
    main()
