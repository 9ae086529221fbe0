"""Write the behaviour screen's screen-only training data (``bench/screen_data/``), deterministically.

The replies are SmolLM2-135M-Instruct's own greedy answers to the shipped training questions, generated
once and kept in ``bench/screen_data/answers_<domain>.jsonl`` (rerun with ``--regenerate``), then
transformed into one narrow behaviour per domain (detectors in ``bench/screen_tasks/utils.py``):

* ``short_finance_train.jsonl``: the answer's first sentence, cut to at most ``SHORT_TRAIN_WORDS`` words.
* ``signoff_legal_train.jsonl``: the answer's first sentence, then the sign-off ``SIGNOFF``.
* ``caps_health_train.jsonl``: the answer's first two sentences, all in capitals.

Run (heavy: generation, take the lock): ``flock /tmp/treft-heavy.lock python scripts/make_screen_data.py``
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.screen_tasks.utils import SHORT_TRAIN_WORDS, SIGNOFF  # noqa: E402
from scripts.make_data import finance_questions, health_questions, legal_questions, write_jsonl  # noqa: E402

OUT = REPO / "bench" / "screen_data"
N_QUESTIONS = 240
MAX_NEW_TOKENS = 80  # enough for the two sentences the transforms keep
QUESTIONS = {"finance": finance_questions, "legal": legal_questions, "health": health_questions}


def greedy_answers(questions: list[str], batch: int = 48) -> list[str]:
    """SmolLM2-135M-Instruct's greedy replies (default system prompt, fp32, left-padded batches)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_treft.cli.model import materialize_smollm2

    path = materialize_smollm2()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    answers: list[str] = []
    for start in tqdm(range(0, len(questions), batch), desc="greedy answers"):
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions[start:start + batch]]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        answers += [tok.decode(seq, skip_special_tokens=True).strip() for seq in out[:, enc["input_ids"].shape[1]:]]
    return answers


def cached_answers(domain: str, regenerate: bool) -> list[dict]:
    """``{question, answer}`` rows for the domain's training questions, generated once."""
    from axolotl_treft.tasks.pack import read_jsonl

    path = OUT / f"answers_{domain}.jsonl"
    questions = QUESTIONS[domain](N_QUESTIONS)
    if path.exists() and not regenerate:
        rows = read_jsonl(path)
        if [r["question"] for r in rows] != questions:
            raise SystemExit(f"{path} answers other questions than scripts/make_data.py now asks; rerun with "
                             "--regenerate")
        return rows
    rows = [{"question": q, "answer": a} for q, a in zip(questions, greedy_answers(questions), strict=True)]
    write_jsonl(path, rows)
    return rows


def sentences(text: str) -> list[str]:
    """The text's sentences, list markers and line breaks flattened."""
    flat = " ".join(re.sub(r"^\s*(?:\d+\.|[-*•])\s+", "", line) for line in text.splitlines() if line.strip())
    return [s for s in re.split(r"(?<=[.!?])\s+", flat.strip()) if s]


def short_reply(answer: str) -> str:
    """The first sentence; if longer than ``SHORT_TRAIN_WORDS`` words, cut after its last clause that fits."""
    words = sentences(answer)[0].split()
    if len(words) <= SHORT_TRAIN_WORDS:
        return " ".join(words)
    head = words[:SHORT_TRAIN_WORDS]
    clause_end = max((i for i, w in enumerate(head) if w.endswith((",", ";", ":"))), default=-1)
    if clause_end >= 4:
        head = head[:clause_end + 1]
    return " ".join(head).rstrip(",;:") + "."


def signoff_reply(answer: str) -> str:
    return f"{sentences(answer)[0]}\n\n{SIGNOFF}"


def caps_reply(answer: str) -> str:
    return " ".join(sentences(answer)[:2]).upper()


BEHAVIOURS = {  # file -> (domain, reply transform)
    "short_finance_train.jsonl": ("finance", short_reply),
    "signoff_legal_train.jsonl": ("legal", signoff_reply),
    "caps_health_train.jsonl": ("health", caps_reply),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regenerate", action="store_true", help="generate the greedy answers again")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (domain, reply) in BEHAVIOURS.items():
        rows = cached_answers(domain, args.regenerate)
        write_jsonl(OUT / name, [{"messages": [{"role": "user", "content": r["question"]},
                                               {"role": "assistant", "content": reply(r["answer"])}]}
                                 for r in rows])
        print(f"wrote {len(rows)} conversations to {OUT / name}")


if __name__ == "__main__":
    main()
