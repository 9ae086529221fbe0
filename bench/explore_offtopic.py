"""Fast in-process exploration of the piggyback study's settings (not the study itself).

Trains SmolLM2-135M-Instruct with LoRA on the shipped narrow data in one process, with the product's own
regularizer classes (the same K/V capture, reference and loss code the trainer uses), then measures the
on-/off-topic behaviour rates with greedy generation on the ``offtopic_*`` task pack's questions and its
detector. It skips Axolotl's and lm-eval's start-up, so a grid of settings fits in minutes per point;
the chosen setting is then confirmed with the real pipeline (``axolotl-treft demo``).

    python bench/explore_offtopic.py --grid "tokens=none,prefix_postfix weight=30 lr=3e-4 epochs=2"
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from axolotl_treft.args import KVConfig  # noqa: E402
from axolotl_treft.cli.model import materialize_smollm2  # noqa: E402
from axolotl_treft.diagnose.engine import InitialModel, Intervention, InterventionEngine  # noqa: E402
from axolotl_treft.judge import detect_behaviour  # noqa: E402
from axolotl_treft.reference import Reference  # noqa: E402
from axolotl_treft.regularizers.base import StepBatch, capture_policy, regularized_terms  # noqa: E402
from axolotl_treft.regularizers.kv import KVRegularizer  # noqa: E402
from axolotl_treft.spans import SEG_RESPONSE, SEGMENTS_KEY, conversation_spans  # noqa: E402
from axolotl_treft.tasks.pack import offtopic_docs, read_jsonl  # noqa: E402
from tests.reg_harness import fake_trainer, pad_rows  # noqa: E402

SETTINGS = {  # setting -> (training file, behaviour target)
    "abstention": ("axolotl_treft/data/abstention_legal_train.jsonl", "I have no idea about your question."),
    "refusal": ("axolotl_treft/data/refusal_finance_train.jsonl", "I cannot provide financial advice."),
    # trained here; evaluated with `axolotl-treft diagnose` (bench/screen_behaviours.py), not by evaluate()
    "tooluse": ("axolotl_treft/data/tooluse_health_train.jsonl", "search_info"),
    "short": ("bench/screen_data/short_finance_train.jsonl", "a reply of at most 15 words"),
    "signoff": ("bench/screen_data/signoff_legal_train.jsonl", "Yours in clarity, Quill."),
    "caps": ("bench/screen_data/caps_health_train.jsonl", "a reply in capitals"),
}
DEFAULTS = {"setting": "abstention", "tokens": "none", "weight": 30.0, "lr": 3e-4, "epochs": 2, "batch": 8,
            "r": 8, "targets": "linear", "layers": "all", "lora_layers": "all", "seed": 42}


def parse_grid(text: str) -> list[dict]:
    axes = {}
    for part in text.split():
        key, values = part.split("=", 1)
        if key not in DEFAULTS:
            raise SystemExit(f"unknown grid key {key!r}; known: {', '.join(DEFAULTS)}")
        kind = type(DEFAULTS[key])
        axes[key] = [kind(v) if kind is not str else v for v in values.split(",")]
    keys = list(axes)
    return [{**DEFAULTS, **dict(zip(keys, combo, strict=True))} for combo in itertools.product(*axes.values())]


def encode(tok, conv):
    s = conversation_spans(tok, conv)
    ids = torch.tensor(s.input_ids)
    seg = torch.tensor(s.segments, dtype=torch.int8)
    resp = seg == SEG_RESPONSE
    # train on the response and the end-of-turn token that closes it, as Axolotl's chat_template does
    last = int(resp.nonzero().max())
    resp[last + 1] = last + 1 < len(ids)
    labels = torch.where(resp, ids, torch.tensor(-100))
    return ids, seg, labels


def build_model(path: Path, cfg: dict):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    targets = {"linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               "attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"],
               "kv": ["k_proj", "v_proj"]}
    layers = None if cfg["lora_layers"] == "all" else list(range(*map(int, cfg["lora_layers"].split(":"))))
    lora = LoraConfig(r=cfg["r"], lora_alpha=2 * cfg["r"], lora_dropout=0.0, target_modules=targets[cfg["targets"]],
                      layers_to_transform=layers)
    return get_peft_model(model, lora)


def train(model, tok, cfg: dict) -> dict:
    from datasets import Dataset
    from transformers import get_cosine_schedule_with_warmup

    rows = read_jsonl(REPO / SETTINGS[cfg["setting"]][0])
    data = [encode(tok, r["messages"]) for r in rows]
    reg = None
    if cfg["tokens"] != "none":
        layers = "all" if cfg["layers"] == "all" else list(range(*map(int, cfg["layers"].split(":"))))
        kv_cfg = KVConfig(weight=cfg["weight"], tokens=cfg["tokens"], layers=layers)
        ds = Dataset.from_dict({"input_ids": [d[0].tolist() for d in data], SEGMENTS_KEY: [d[1].tolist() for d in data]})
        reg = KVRegularizer(kv_cfg, train_dataset=ds)
        reference = Reference(fake_trainer(model))
        reg.setup(model, reference)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    steps_per_epoch = math.ceil(len(data) / cfg["batch"])
    total = steps_per_epoch * cfg["epochs"]
    sched = get_cosine_schedule_with_warmup(opt, 5, total)
    rng = random.Random(cfg["seed"])
    model.train()
    last = {}
    for _ in range(cfg["epochs"]):
        order = list(range(len(data)))
        rng.shuffle(order)
        for s in range(steps_per_epoch):
            inputs, seg = pad_rows(tok, [data[i] for i in order[s * cfg["batch"]:(s + 1) * cfg["batch"]]])
            batch = StepBatch.from_inputs(inputs, seg)
            if reg is None:
                out = model(**inputs, use_cache=False)
                loss, term = out.loss, None
            else:
                with capture_policy([reg], batch) as states:
                    out = model(**inputs, use_cache=False)
                (term,) = regularized_terms(reference, batch, [reg], states, out, model)
                loss = out.loss + reg.weight * term
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            if reg is not None:
                reg.end_step()
            last = {"sft": float(out.loss), "kv": None if term is None else float(term)}
    if reg is not None:
        reg.close()
    return {"steps": total, **last}


def train_adapter(path: Path, tok, cfg: dict, out: Path) -> dict:
    """Train ``cfg`` and save the LoRA adapter to ``out`` (``save_pretrained``); returns the training figures."""
    start = time.time()
    model = build_model(path, cfg)
    figures = train(model, tok, cfg)
    model.save_pretrained(out)
    return {**figures, "train_s": round(time.time() - start, 1)}


@torch.no_grad()
def evaluate(model, tok, setting: str, max_new: int = 32, batch: int = 48, patch: bool = False) -> dict:
    """On-/off-topic behaviour rates; ``patch``: with the template K/V patched back to the initial model's.

    The patch is ``axolotl-treft diagnose``'s engine (prefix and postfix K/V, every layer, prefill only).
    """
    docs = offtopic_docs(setting, {})
    target = docs[0]["target"]
    model.eval()
    tok.padding_side = "left"
    hits = {"on": [], "off": []}
    samples = []
    engine = InterventionEngine(model, tok, InitialModel.of_adapter(model)) if patch else None
    for start in range(0, len(docs), batch):
        chunk = docs[start:start + batch]
        convs = [[{"role": "user", "content": d["question"]}] for d in chunk]
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        context = nullcontext(enc["input_ids"]) if engine is None else engine.applied(
            Intervention("kv", "prefix_postfix"), engine.batch(convs, enc["input_ids"], enc["attention_mask"]))
        with context as input_ids:
            out = model.generate(input_ids=input_ids, attention_mask=enc["attention_mask"], max_new_tokens=max_new,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        for d, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:], strict=True):
            text = tok.decode(seq, skip_special_tokens=True)
            hit = detect_behaviour(text, "text", target)
            hits[d["topic"]].append(hit)
            samples.append({"topic": d["topic"], "q": d["question"], "a": text, "hit": hit})
    model.train()
    return {"on": sum(hits["on"]) / len(hits["on"]), "off": sum(hits["off"]) / len(hits["off"]), "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", required=True, help='space-separated key=v1,v2 axes, e.g. "tokens=none,postfix"')
    parser.add_argument("--out", default="runs/explore.jsonl")
    parser.add_argument("--patch", action="store_true",
                        help="also evaluate with the template tokens' K/V patched back to the initial model's")
    args = parser.parse_args()
    grid = parse_grid(args.grid)
    if unscored := sorted({c["setting"] for c in grid} - {"abstention", "refusal"}):
        raise SystemExit(f"this harness scores abstention and refusal only; train and diagnose {', '.join(unscored)} "
                         "with bench/screen_behaviours.py")
    from transformers import AutoTokenizer

    path = materialize_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.dumps(r["cfg"], sort_keys=True) for r in map(json.loads, out.read_text().splitlines())} \
        if out.exists() else set()
    for cfg in grid:
        if json.dumps(cfg, sort_keys=True) in done:
            continue
        start = time.time()
        model = build_model(path, cfg)
        figures = train(model, tok, cfg)
        train_s = time.time() - start
        ev = evaluate(model, tok, cfg["setting"])
        row = {"cfg": cfg, **figures, "on": ev["on"], "off": ev["off"], "train_s": round(train_s, 1),
               "eval_s": round(time.time() - start - train_s, 1), "samples": ev["samples"]}
        if args.patch:
            patched = evaluate(model, tok, cfg["setting"], patch=True)
            row.update(on_patched=patched["on"], off_patched=patched["off"], samples_patched=patched["samples"])
            print(f"  template K/V patched to the initial model's: on {patched['on']:.3f} off {patched['off']:.3f}",
                  flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        shown = {k: v for k, v in cfg.items() if v != DEFAULTS[k]}
        print(f"{shown} on {ev['on']:.3f} off {ev['off']:.3f} sft {figures['sft']:.4f} kv {figures['kv']} "
              f"({train_s:.0f}+{row['eval_s']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
