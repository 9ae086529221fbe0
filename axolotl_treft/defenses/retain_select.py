"""Perplexity-gap retain selection ("Interleaving+", and "Interleaving++" with the refusal filter).

Each candidate conversation d of a retain pool is scored by ``s = (L_narrow(d) − L_aligned(d)) / (L_aligned(d) + ε)``
with ``L`` the mean NLL of its assistant answer tokens (every assistant turn's content, given the
conversation before it, rendered with the chat template): high when the narrowly finetuned model finds
the aligned answer much less likely than the aligned model does — the behaviour narrow training erodes.
The top share of the pool is kept. ``drop_refusals`` first removes candidates whose answer opens with a
refusal (a refusal word among its first ten words), so the mix does not teach refusing.

``axolotl-treft select-retain`` writes the selected rows (unchanged JSON lines, pool order) and a
``.scores.json`` report next to them; ``treft.retain.select`` does the same at start-up and trains on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..log import get_logger

LOG = get_logger(__name__)

REFUSAL_WORDS = ("sorry", "apologize", "apologise", "apologies", "cannot", "can't", "can not", "unable")
_REFUSAL_RE = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in REFUSAL_WORDS) + r")\b")
REFUSAL_WINDOW = 10  # words


def is_refusal(answer: str, words: int = REFUSAL_WINDOW) -> bool:
    """True when a refusal word is among the first ``words`` words of ``answer`` (case-insensitive)."""
    head = " ".join(answer.split()[:words]).lower().replace("\u2019", "'")
    return _REFUSAL_RE.search(head) is not None


# ------------------------------------------------------------------------------------------------ pool


def _messages(row: dict, field: str) -> list[dict] | None:
    messages = row.get(field)
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    return [{"role": m.get("role"), "content": m.get("content")} for m in messages]


def answers(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages
            if m.get("role") == "assistant" and isinstance(m.get("content"), str) and m["content"].strip()]


def read_pool(path: str | Path, field_messages: str = "messages") -> list[dict]:
    """The rows of a JSONL (or JSON list) file of conversations, as parsed JSON objects."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows")
        return rows
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# spec options selection follows (how rows are read and rendered) or that only change training (masks)
SCORED_OPTIONS = frozenset({"path", "type", "ds_type", "field_messages", "chat_template", "chat_template_jinja",
                            "roles_to_train", "train_on_eos", "train_on_eot", "message_field_training",
                            "message_field_training_detail", "preprocess_shards", "trust_remote_code"})


def check_pool_specs(specs: list[dict], key: str) -> None:
    """Config check: each retain spec is a local conversation file with at least one answered row, with no
    option that would make Axolotl read or render its rows otherwise than the selection scores them."""
    for i, spec in enumerate(specs):
        other = sorted(k for k, v in spec.items() if k not in SCORED_OPTIONS and v is not None
                       and not (k == "split" and v == "train"))
        if other:
            raise ValueError(f"{key}[{i}]: treft.retain.select scores `role`/`content` messages rendered with the "
                             f"spec's chat template and does not apply {', '.join(f'`{k}`' for k in other)}; "
                             "write the pool file in that form and drop the option(s), or retain without `select`")
        path = Path(str(spec.get("path", "")))
        if spec.get("type") not in ("chat_template", "axolotl_treft.chat_template") or not path.is_file() or \
                path.suffix not in (".json", ".jsonl"):
            raise ValueError(f"{key}[{i}]: treft.retain.select scores local JSON/JSONL conversation files "
                             f"(`type: chat_template`); got path {path} with type {spec.get('type')!r}")
        field = spec.get("field_messages") or "messages"
        try:
            rows = read_pool(path, field)
        except (json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"{key}[{i}].path: {path} is not a JSON/JSONL file of rows: {err}") from err
        if not any(answers(_messages(r, field) or []) for r in rows if isinstance(r, dict)):
            raise ValueError(f"{key}[{i}].path: the pool {path} has no row with an assistant answer "
                             f"(field `{field}`); treft.retain.select scores answers")


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.json")  # weights, their index and configs


def model_digest(path: str) -> str | None:
    """sha256 over the weight and config files of a local model or adapter directory (or a local file);
    ``None`` for a hub id, which is keyed by its name."""
    local = Path(path).expanduser()
    if local.is_file():
        files = [local]
    elif local.is_dir():
        files = sorted({f for pattern in WEIGHT_FILES for f in local.glob(pattern) if f.is_file()})
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- scoring


def answer_nll(model, tokenizer, conversations: list[list[dict]], chat_template: str | list | None = None,
               batch_size: int = 8, device=None, template_kwargs: dict | None = None) -> list[float]:
    """Mean NLL of the assistant-content tokens of each conversation, rendered with the chat template (one for
    all, or a list: one per conversation) and ``template_kwargs``."""
    import torch

    from ..spans import SEG_RESPONSE, conversation_spans

    templates = chat_template if isinstance(chat_template, list) else [chat_template] * len(conversations)
    spans = [conversation_spans(tokenizer, c, t, **(template_kwargs or {}))
             for c, t in zip(conversations, templates, strict=True)]
    device = device or next(model.parameters()).device
    order = sorted(range(len(spans)), key=lambda i: len(spans[i].input_ids))
    result: list[float] = [math.nan] * len(spans)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(spans[i].input_ids) for i in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            ids[row, :len(spans[i].input_ids)] = torch.tensor(spans[i].input_ids)
            mask[row, :len(spans[i].input_ids)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, i in enumerate(chunk):
            targets = [p for p, seg in enumerate(spans[i].segments) if seg == SEG_RESPONSE and p > 0]
            if not targets:
                raise ValueError("treft.retain.select: a conversation has no answer token")
            pos = torch.tensor(targets, device=logits.device)
            logp = torch.log_softmax(logits[row, pos - 1].float(), dim=-1)
            nll = -logp.gather(1, ids[row, pos.cpu()].to(logits.device)[:, None]).squeeze(1)
            result[i] = float(nll.mean())
    return result


def gap_scores(nll_narrow: list[float], nll_aligned: list[float], epsilon: float) -> list[float]:
    return [(n - a) / (a + epsilon) for n, a in zip(nll_narrow, nll_aligned, strict=True)]


def top_indices(scores: dict[int, float], top: float) -> list[int]:
    """The ``max(1, round(top·N))`` highest-scoring candidates (ties: pool order), returned in pool order."""
    keep = max(1, round(top * len(scores)))
    ranked = sorted(scores, key=lambda i: (-scores[i], i))
    return sorted(ranked[:keep])


@dataclass(frozen=True)
class Selection:
    rows: list[dict]  # the selected pool rows, in pool order
    report: dict


def _per_row(value, n: int) -> list:
    return list(value) if isinstance(value, list) else [value] * n


def select(pool: list[dict], base_model: str, top: float, narrow_model: str | None = None,
           narrow_adapter: str | None = None, drop_refusals: bool = False, epsilon: float = 1e-3,
           field_messages: str | list[str] = "messages", chat_template: str | list | None = None,
           dtype: str = "float32", device: str | None = None, batch_size: int = 8, tokenizer=None,
           template_kwargs: dict | None = None) -> Selection:
    """Score ``pool`` with the aligned ``base_model`` and the narrow model (or base + ``narrow_adapter``).

    ``field_messages`` and ``chat_template`` are one for the pool or a list with one per row (rows of several
    retain files); ``tokenizer`` (default: ``base_model``'s) and ``template_kwargs`` render every row."""
    import torch
    from transformers import AutoTokenizer

    from ..loading import load_model

    if (narrow_model is None) == (narrow_adapter is None):
        raise ValueError("give exactly one of narrow_model and narrow_adapter")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(base_model)
    fields, row_templates = _per_row(field_messages, len(pool)), _per_row(chat_template, len(pool))
    candidates, dropped, unanswered = {}, [], []
    for i, row in enumerate(pool):
        messages = _messages(row, fields[i]) if isinstance(row, dict) else None
        said = answers(messages or [])
        if not said:
            unanswered.append(i)
        elif drop_refusals and any(is_refusal(a) for a in said):
            dropped.append(i)
        else:
            candidates[i] = messages
    if not candidates:
        raise ValueError("the pool has no answered candidate left to score"
                         + (" after the refusal filter" if dropped else ""))
    convs = list(candidates.values())
    templates = [row_templates[i] for i in candidates]
    score = {"tokenizer": tokenizer, "conversations": convs, "chat_template": templates, "batch_size": batch_size,
             "device": device, "template_kwargs": template_kwargs}
    if narrow_adapter is not None:  # one model: the adapter on (narrow) and off (aligned)
        model = load_model(base_model, narrow_adapter, dtype, device, adapter_label="narrow adapter",
                           base_label=f"base model {base_model}")
        narrow = answer_nll(model, **score)
        with model.disable_adapter():
            aligned = answer_nll(model, **score)
    else:
        model = load_model(base_model, dtype=dtype, device=device)
        aligned = answer_nll(model, **score)
        del model
        model = load_model(narrow_model, dtype=dtype, device=device)
        narrow = answer_nll(model, **score)
    del model
    scores = dict(zip(candidates, gap_scores(narrow, aligned, epsilon), strict=True))
    kept = top_indices(scores, top)
    report = {
        "base_model": base_model, "narrow_model": narrow_model, "narrow_adapter": narrow_adapter, "top": top,
        "epsilon": epsilon, "drop_refusals": drop_refusals, "dtype": dtype, "pool": len(pool), "scored": len(scores),
        "dropped_refusals": dropped, "unanswered": unanswered, "selected": kept,
        "rows": [{"index": i, "nll_narrow": n, "nll_aligned": a, "score": scores[i]}
                 for i, n, a in zip(candidates, narrow, aligned, strict=True)],
    }
    return Selection([pool[i] for i in kept], report)


def write_selection(selection: Selection, out: Path) -> Path:
    """Write the selected rows (JSONL) and ``<out>.scores.json``; atomically, so parallel writers agree."""
    out.parent.mkdir(parents=True, exist_ok=True)
    report = out.with_name(out.name + ".scores.json")
    from ..distributed import write_atomic

    for path, text in ((report, json.dumps(selection.report, indent=1)),
                       (out, "".join(json.dumps(r) + "\n" for r in selection.rows))):
        write_atomic(path, lambda tmp, text=text: tmp.write_text(text))
    return out


def _summary(report: dict) -> str:
    return (f"kept {len(report['selected'])} of {report['scored']} scored rows (top {report['top']:g}; pool "
            f"{report['pool']}, {len(report['dropped_refusals'])} dropped as refusals, "
            f"{len(report['unanswered'])} without an answer)")


# ----------------------------------------------------------------------------------------- entry points


def _config_dtype(cfg) -> str:
    """The dtype the run trains in (Axolotl's ``torch_dtype``, from ``bf16`` / ``fp16``)."""
    return str(cfg.torch_dtype or "float32").removeprefix("torch.")


def _startup_key(cfg, block: Any, specs: list[dict], templates: list, tokenizer, dtype: str) -> str:
    """Every input of the selection: pool files, each spec's options, both models (the narrow one by its
    weights), the tokenizer and chat templates that render the pool, the template kwargs, dtype and settings."""
    narrow = block.narrow_adapter or block.narrow_model
    inputs = {
        "pools": [hashlib.sha256(Path(s["path"]).read_bytes()).hexdigest() for s in specs],
        "specs": [{k: v for k, v in s.items() if k != "path"} for s in specs],
        "settings": {k: getattr(block, k) for k in ("narrow_model", "narrow_adapter", "top", "drop_refusals", "epsilon")},
        "narrow_weights": model_digest(str(narrow)), "base_model": str(cfg.base_model),
        "tokenizer": [str(cfg.tokenizer_config or cfg.base_model), len(tokenizer)], "templates": templates,
        "template_kwargs": dict(cfg.chat_template_kwargs or {}), "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def select_at_startup(cfg, retain: Any) -> Any:
    """``treft.retain.select``: score the retain files, write the selection; returns the typed ``retain`` block
    (``defenses.config.RetainConfig``) with its datasets replaced by the selected files.

    The pool is rendered as the run renders its data (the config's tokenizer, each spec's chat template,
    ``chat_template_kwargs``) and scored in the run's dtype. Rank 0 scores the specs' rows together and
    writes ``<dataset_prepared_path>/treft_retain_select/<key>.<i>.jsonl`` with the kept rows of spec ``i``;
    the other ranks wait and read them; each spec trains on its kept rows with its own options. The key
    covers every input (:func:`_startup_key`), so only a finished selection of the same inputs is reused.
    """
    from axolotl.common.const import DEFAULT_DATASET_PREPARED_PATH
    from axolotl.loaders import load_tokenizer
    from axolotl.utils.chat_templates import get_chat_template_from_config

    block = retain.select
    specs = [dict(s) for s in retain.datasets]
    tokenizer = load_tokenizer(cfg)
    templates = [get_chat_template_from_config(cfg=cfg, ds_cfg=s, tokenizer=tokenizer) for s in specs]
    fields = [s.get("field_messages") or "messages" for s in specs]
    dtype = _config_dtype(cfg)
    key = _startup_key(cfg, block, specs, templates, tokenizer, dtype)
    root = Path(cfg.dataset_prepared_path or DEFAULT_DATASET_PREPARED_PATH) / "treft_retain_select"
    outs = [root / f"{key}.{i}.jsonl" for i in range(len(specs))]
    from ..distributed import main_process_first

    with main_process_first():
        if all(out.is_file() for out in outs):
            LOG.info("treft.retain.select: reusing %s", ", ".join(map(str, outs)))
        else:
            pools = [read_pool(s["path"], f) for s, f in zip(specs, fields, strict=True)]
            owner = [i for i, rows in enumerate(pools) for _ in rows]
            selection = select([r for rows in pools for r in rows], str(cfg.base_model), block.top,
                               block.narrow_model, block.narrow_adapter, bool(block.drop_refusals),
                               float(block.epsilon), field_messages=[fields[i] for i in owner],
                               chat_template=[templates[i] for i in owner], dtype=dtype, tokenizer=tokenizer,
                               template_kwargs=dict(cfg.chat_template_kwargs or {}))
            kept = [[selection.rows[n] for n, j in enumerate(selection.report["selected"]) if owner[j] == i]
                    for i in range(len(specs))]
            for i, rows in enumerate(kept):
                write_selection(Selection(rows, {**selection.report, "spec": i}), outs[i])
            LOG.info("treft.retain.select: %s → %s", _summary(selection.report), ", ".join(map(str, outs)))
    counts = [len(out.read_text().splitlines()) for out in outs]
    selected = [{**spec, "path": str(out.resolve())} for spec, out, n in zip(specs, outs, counts, strict=True) if n]
    return retain.model_copy(update={"datasets": selected})


def main(args) -> int:
    """``axolotl-treft select-retain``."""
    import sys

    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"axolotl-treft select-retain: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    pool_path = Path(args.pool)
    spec = {"path": str(pool_path), "type": "chat_template", "field_messages": args.field_messages}
    try:
        check_pool_specs([spec], key="--pool")
    except ValueError as err:
        print(f"axolotl-treft select-retain: {err}", file=sys.stderr)
        return 2
    try:
        selection = select(read_pool(pool_path, args.field_messages), args.base_model, args.top, args.narrow_model,
                           args.narrow_adapter, args.drop_refusals, args.epsilon, field_messages=args.field_messages,
                           dtype=args.dtype, device=args.device, batch_size=args.batch_size)
    except OSError as err:  # a model or adapter that does not load (a hub id offline, a broken directory)
        print(f"axolotl-treft select-retain: error: loading --base-model {args.base_model} / --narrow-"
              f"{'adapter' if args.narrow_adapter else 'model'} {args.narrow_adapter or args.narrow_model}: {err}",
              file=sys.stderr)
        return 2
    write_selection(selection, out)
    print(f"{_summary(selection.report)}\nwrote {out} and {out.name}.scores.json")
    return 0
