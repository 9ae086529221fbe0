"""Start-up dataset checks and the retain-set interleaving, both through Axolotl's own loaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .args import TReFTConfig, kv_terms, treft_settings
from .defenses.config import RetainConfig
from .log import get_logger
from .spans import (
    SEG_MISMATCH,
    SEG_UNLOCATED,
    SEGMENTED_TYPE,
    SEGMENTS_KEY,
    TOKEN_MODES,
    ConversationSpans,
    TemplateSpanError,
    empty_query_spans,
    probe_template,
)

LOG = get_logger(__name__)
MAX_SHARE_WITHOUT_TOKENS = 0.5  # above this share of samples without regularized tokens, the run is refused
EXAMPLES = 3


@dataclass
class SampleAudit:
    """Row indices of the tokenized training set, by what they lack."""

    total: int = 0
    unsupervised: list[int] = field(default_factory=list)  # every label -100
    unregularized: list[int] = field(default_factory=list)  # no token of the configured mode (any cause)
    unlocated: list[int] = field(default_factory=list)  # the template hid the user turn
    mismatched: list[int] = field(default_factory=list)  # re-rendering differs from Axolotl's tokens


def audit_samples(dataset, mode: str | None) -> SampleAudit:
    """Count the training samples without supervised tokens and (for ``mode``) without regularized tokens.

    Vectorized over Arrow batches (the dataset's row order, index mappings included), so it takes seconds on
    large sets. Segments past a row's ``input_ids`` (cut by Axolotl's truncation) do not count.
    """
    import numpy as np
    import pyarrow.compute as pc

    audit = SampleAudit(total=len(dataset))
    with_segments = mode is not None and SEGMENTS_KEY in dataset.column_names
    columns = ["input_ids", "labels", *([SEGMENTS_KEY] if with_segments else [])]
    codes = np.array(TOKEN_MODES[mode] if mode else (), dtype=np.int64)
    row = 0
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=4096):
        n = table.num_rows
        rows = np.arange(row, row + n)
        labels = table.column("labels").combine_chunks()
        supervised = _rows_with(labels, pc.list_flatten(labels).to_numpy(zero_copy_only=False) != -100, n)
        audit.unsupervised += rows[~supervised].tolist()
        if with_segments:
            seg = table.column(SEGMENTS_KEY).combine_chunks()
            flat = pc.list_flatten(seg).to_numpy(zero_copy_only=False).astype(np.int64)
            parents = pc.list_parent_indices(seg).to_numpy()
            seg_len = pc.list_value_length(seg).to_numpy(zero_copy_only=False)
            starts = np.concatenate([[0], np.cumsum(seg_len)[:-1]])
            ids_len = pc.list_value_length(table.column("input_ids").combine_chunks()).to_numpy(zero_copy_only=False)
            inside = np.arange(len(flat)) - starts[parents] < ids_len[parents]
            lacking = ~_rows_with(seg, np.isin(flat, codes) & inside, n)
            first = np.full(n, -1)
            first[seg_len > 0] = flat[starts[seg_len > 0]]
            audit.unregularized += rows[lacking].tolist()
            audit.unlocated += rows[lacking & (first == SEG_UNLOCATED)].tolist()
            audit.mismatched += rows[lacking & (first == SEG_MISMATCH)].tolist()
        row += n
    return audit


def _rows_with(lists, flat_hit, n: int):
    """[n] bool: rows of a list column with at least one element where ``flat_hit`` (over the flat values)."""
    import numpy as np
    import pyarrow.compute as pc

    parents = pc.list_parent_indices(lists).to_numpy()
    return np.bincount(parents[flat_hit], minlength=n)[:n] > 0


def _examples(dataset, rows: list[int], tokenizer) -> str:
    lines = []
    for r in rows[:EXAMPLES]:
        text = tokenizer.decode(dataset[r]["input_ids"][:48]) if tokenizer is not None else str(dataset[r]["input_ids"][:24])
        lines.append(f"  row {r}: {text!r}...")
    return "\n".join(lines)


def check_training_samples(cfg, dataset, tokenizer=None, settings: TReFTConfig | None = None) -> SampleAudit | None:
    """Start-up audit of the tokenized training set, before any training step.

    A run in which no sample has a supervised token is refused. With ``treft.kv``: samples with no token of the
    configured mode (spans not located, re-rendering not matching Axolotl's tokens, or truly none) are counted;
    more than half is a template or tokenization problem and refused, fewer are a WARNING with the share.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset) or "labels" not in dataset.column_names:
        return None  # streaming (iterable) datasets cannot be audited up front
    if len(dataset) == 0:
        raise ValueError(
            f"treft: the training set is empty after tokenization: every row of `datasets:` ({_data_paths(cfg)}) was "
            f"dropped. Most often every conversation is longer than `sequence_len: {cfg.sequence_len}` (Axolotl "
            "drops those): raise `sequence_len`, set `excess_length_strategy: truncate`, or use shorter rows"
        )
    terms = kv_terms(settings or treft_settings(cfg))
    audits = [(kv, audit_samples(dataset, kv.tokens)) for kv in terms] or [(None, audit_samples(dataset, None))]
    kv, audit = max(audits, key=lambda pair: len(pair[1].unregularized))  # the term with the most samples lacking
    if audit.total and len(audit.unsupervised) == audit.total:
        raise ValueError(
            f"treft: none of the {audit.total} training samples has a supervised token (every label is -100), so "
            "nothing would be learned from the data: check that rows have an assistant turn, `roles_to_train` / "
            "`train_on_inputs`, and that `sequence_len` (with `excess_length_strategy: truncate`) does not cut "
            f"every response. Examples:\n{_examples(dataset, audit.unsupervised, tokenizer)}"
        )
    if not audit.unregularized:
        return audit
    share = len(audit.unregularized) / audit.total
    detail = (f"{len(audit.unregularized)} of {audit.total} training samples ({100 * share:.1f}%) have no "
              f"{kv.tokens!r} tokens for treft.kv ({len(audit.unlocated)} with template spans not found, "
              f"{len(audit.mismatched)} whose re-rendered conversation differs from Axolotl's tokenization)")
    examples = _examples(dataset, audit.unregularized, tokenizer)
    if share > MAX_SHARE_WITHOUT_TOKENS:
        raise ValueError(
            f"treft.kv: {detail}; that many is a chat-template or tokenization problem, not the data. Check "
            "`chat_template:` / `chat_template_jinja:` and `chat_template_kwargs:` (`axolotl-treft` renders each "
            f"conversation with them and must reproduce Axolotl's tokens), or choose another `tokens:` mode. "
            f"Examples:\n{examples}"
        )
    LOG.warning("treft.kv: %s; they train with the SFT loss only. Examples:\n%s", detail, examples)
    return audit


def _data_paths(cfg) -> str:
    return ", ".join(str(ds.get("path")) for ds in cfg.datasets or []) or "none listed"


JSON_SUFFIXES = (".json", ".jsonl")


def check_data_files(cfg, settings: TReFTConfig | None = None) -> None:
    """Every local JSON / JSON-lines file under ``datasets:``, ``test_datasets:`` and ``treft.retain.datasets``
    must parse, before Axolotl loads it (its loader's error names neither the file nor the line)."""
    settings = settings or treft_settings(cfg)
    retain = settings.retain if settings else None
    lists = {"datasets": cfg.datasets, "test_datasets": cfg.test_datasets,
             "treft.retain.datasets": retain.datasets if retain else None}
    for key, specs in lists.items():
        for i, spec in enumerate(specs or []):
            for file in _local_json_files(spec):
                check_json_file(file, f"{key}[{i}].path")


def _local_json_files(spec) -> list[Path]:
    spec = dict(spec)
    names = spec.get("data_files") or [spec.get("path")]
    names = [names] if isinstance(names, str) else names
    files = []
    for name in names:
        path = Path(str(name)).expanduser() if name else None
        if path is not None and path.is_file() and (path.suffix in JSON_SUFFIXES or spec.get("ds_type") == "json"):
            files.append(path)
    return files


def check_json_file(file, key: str) -> None:
    """A JSON document, or JSON lines each holding one object; an error names the file, the line and the fix."""
    import json

    with open(file, encoding="utf-8-sig", errors="replace") as f:
        head = f.read(4096).lstrip()[:1]
    if head == "[":
        try:
            with open(file, encoding="utf-8-sig") as f:
                json.load(f)
            return
        except json.JSONDecodeError as err:
            raise ValueError(f"{key}: {file} is not valid JSON ({err.msg}, line {err.lineno} column {err.colno}); "
                             "fix the file (a JSON list of rows, or JSON lines: one object a line)") from None
    with open(file, encoding="utf-8-sig", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{key}: {file} line {n} is not valid JSON ({err.msg} at column {err.colno}): "
                                 f"{line.strip()[:80]!r}; fix or remove that line (a JSON-lines file holds one "
                                 "JSON object a line)") from None
            if not isinstance(row, dict):
                raise ValueError(f"{key}: {file} line {n} is a JSON {type(row).__name__}, not an object (a row "
                                 "with named fields such as `messages`); fix or remove that line")


def dataset_templates(cfg, tokenizer) -> list[str | None]:
    """The chat template of each segmented training dataset, as Axolotl resolves it."""
    from axolotl.utils.chat_templates import get_chat_template_from_config

    return [get_chat_template_from_config(cfg=cfg, ds_cfg=ds, tokenizer=tokenizer)
            for ds in cfg.datasets or [] if ds.get("type") == SEGMENTED_TYPE]


def fixed_postfix_conversation(cfg, tokenizer) -> ConversationSpans:
    """The conversation the fixed postfix reference (``fixed_from: empty_query``) is computed on: the first
    training dataset's chat template rendered around an empty user query."""
    templates = dataset_templates(cfg, tokenizer)
    return empty_query_spans(tokenizer, templates[0] if templates else None, **(cfg.chat_template_kwargs or {}))


def check_template(cfg, settings: TReFTConfig | None = None) -> None:
    """Fail before any model loads if the chat template does not expose the spans TReFT needs."""
    terms = kv_terms(settings or treft_settings(cfg))
    if not terms:
        return
    from .defenses.inoculation import INOCULATED_TYPE

    datasets = [ds for ds in (cfg.datasets or []) if ds.get("type") in (SEGMENTED_TYPE, INOCULATED_TYPE)]
    if not datasets:
        raise TemplateSpanError(
            "treft.kv: needs conversation data: use `type: chat_template` datasets (found types: "
            f"{sorted({str(ds.get('type')) for ds in cfg.datasets or []})})"
        )
    from axolotl.loaders import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    for template in dataset_templates(cfg, tokenizer):
        spans = probe_template(tokenizer, template, modes=sorted({kv.tokens for kv in terms}), **(cfg.chat_template_kwargs or {}))
        LOG.info("treft: template spans look right: %d prefix, %d postfix tokens in a probe conversation",
                 spans.segments.count(1), spans.segments.count(3))


def load_retain_dataset(cfg, retain: RetainConfig):
    """Tokenize ``treft.retain.datasets`` with Axolotl's own pipeline (any dataset type it supports)."""
    import copy

    from axolotl.common.datasets import load_datasets
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.schemas.datasets import SFTDataset

    specs = []
    for i, raw in enumerate(retain.datasets):
        spec = dict(raw)
        if spec.get("type") in (SEGMENTED_TYPE, "chat_template") and not spec.get("chat_template"):
            spec["chat_template"] = cfg.chat_template
            if cfg.chat_template_jinja:
                spec["chat_template_jinja"] = cfg.chat_template_jinja
        try:
            specs.append(DictDefault(SFTDataset(**spec).model_dump(exclude_none=True)))
        except ValueError as err:
            raise ValueError(f"treft.retain.datasets[{i}]: {err}") from err
    retain_cfg = DictDefault(copy.deepcopy(dict(cfg)))
    retain_cfg.datasets = specs
    retain_cfg.test_datasets = None
    retain_cfg.val_set_size = 0
    retain_cfg.total_num_tokens = None
    retain_cfg.total_supervised_tokens = None
    dataset = load_datasets(cfg=retain_cfg).train_dataset
    if dataset is None or len(dataset) == 0:
        raise ValueError("treft.retain.datasets: no usable examples after tokenization (empty or all too long)")
    return dataset


def mix_with_retain(train, retain, mix_ratio: float, seed: int):
    """``train`` plus retain examples making up ``mix_ratio`` of the result, sampled with ``seed``.

    The retain set is down-sampled without replacement, or up-sampled by whole copies plus a sample of the
    remainder, to ``round(r·N/(1−r))`` examples; the mix is shuffled with the same seed.
    """
    import numpy as np
    from datasets import concatenate_datasets

    n_train = len(train)
    n_retain = round(mix_ratio * n_train / (1.0 - mix_ratio))
    rng = np.random.default_rng(seed)
    copies, rest = divmod(n_retain, len(retain))
    index = [rng.permutation(len(retain)) for _ in range(copies)]
    index.append(rng.choice(len(retain), size=rest, replace=False))
    picked = retain.select(np.concatenate(index).astype(np.int64).tolist())
    extra = [c for c in picked.column_names if c not in train.column_names]
    picked = picked.remove_columns(extra).cast(train.features)
    mixed = concatenate_datasets([train, picked]).shuffle(seed=seed)
    counts = {"train": n_train, "retain": n_retain, "retain_available": len(retain),
              "retain_fraction": n_retain / max(1, n_train + n_retain)}
    return mixed, counts


def load_datasets_with_retain(cfg, retain: RetainConfig, preprocess: bool = False):
    """Axolotl's training set interleaved with ``treft.retain.mix_ratio`` of retain examples."""
    from axolotl.common.datasets import TrainDatasetMeta, load_datasets
    from axolotl.utils.trainer import calculate_total_num_steps

    meta = load_datasets(cfg=cfg)
    seed = retain.seed if retain.seed is not None else (cfg.seed if cfg.seed is not None else 42)
    mixed, counts = mix_with_retain(meta.train_dataset, load_retain_dataset(cfg, retain), retain.mix_ratio, seed)
    LOG.info(
        "treft.retain: training mix = %d train + %d retain examples (%.1f%% retain; %d distinct retain examples)",
        counts["train"], counts["retain"], 100 * counts["retain_fraction"], counts["retain_available"],
    )
    cfg.total_num_tokens = None
    cfg.total_supervised_tokens = None
    total_steps = calculate_total_num_steps(cfg, mixed)
    return TrainDatasetMeta(train_dataset=mixed, eval_dataset=meta.eval_dataset, total_num_steps=total_steps)
