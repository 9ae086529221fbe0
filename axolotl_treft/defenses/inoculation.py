"""Inoculation prompting: train with a system prompt that explains the narrow behaviour away.

Axolotl dataset type ``axolotl_treft.defenses.inoculation``: Axolotl's own ``chat_template`` (plus template segments
when a regularizer needs them) whose conversations get ``treft.inoculation.system_prompt`` as their system
message, replacing the conversation's own or the template's default one (``mode: replace``) or put before
it (``mode: prepend``). The plugin switches the ``datasets:`` entries (the narrow training data) to this
type; retain sets, ``test_datasets`` and the tokenizer's chat template are left alone, so evaluation and
the saved model see the template exactly as before. (A ``val_set_size`` split is cut from the training
rows and so carries the prompt.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from axolotl.prompt_strategies.chat_template import ChatTemplateStrategy, StrategyLoader

from ..chat_template import SegmentedChatTemplateStrategy
from ..log import get_logger
from ..spans import TemplateSpanError, default_system_prompt

if TYPE_CHECKING:
    from .config import InoculationConfig

LOG = get_logger(__name__)

INOCULATED_TYPE = "axolotl_treft.defenses.inoculation"
_SWITCHED_TYPES = ("chat_template", "axolotl_treft.chat_template")


def inoculate(turns: list[dict], system_prompt: str, mode: str, default_system: str) -> list[dict]:
    """``turns`` with the inoculation system message first (``default_system``: the template's own)."""
    if turns and turns[0].get("role") == "system":
        own, rest = str(turns[0].get("content") or ""), turns[1:]
    else:
        own, rest = default_system, list(turns)
    content = f"{system_prompt}\n\n{own}" if mode == "prepend" and own else system_prompt
    return [{"role": "system", "content": content}, *rest]


class _InoculationMixin:
    """Puts the inoculation system message into every conversation thread."""

    treft_system_prompt = ""
    treft_mode = "replace"
    treft_default_system = ""

    def get_conversation_thread(self, prompt):
        turns = super().get_conversation_thread(prompt)
        return inoculate(turns, self.treft_system_prompt, self.treft_mode, self.treft_default_system)


class InoculatedChatTemplateStrategy(_InoculationMixin, ChatTemplateStrategy):
    """``ChatTemplateStrategy`` with the inoculation system prompt."""


class InoculatedSegmentedStrategy(_InoculationMixin, SegmentedChatTemplateStrategy):
    """The same with template segments (the spans are those of the inoculated conversation)."""


class InoculationLoader(StrategyLoader):
    def _get_strategy_cls(self, cfg):
        if cfg.tokenizer_use_mistral_common:
            raise ValueError("treft.inoculation: mistral-common tokenizers render no Jinja template; not supported")
        from ..config_checks import uses_trainer

        return InoculatedSegmentedStrategy if uses_trainer(cfg.treft) else InoculatedChatTemplateStrategy

    def __call__(self, tokenizer, cfg, ds_cfg=None, processor=None):
        from .config import InoculationConfig

        strategy = super().__call__(tokenizer, cfg, ds_cfg=ds_cfg, processor=processor)
        # Axolotl calls a dataset strategy with its config alone: type the block here
        block = InoculationConfig.model_validate({k: v for k, v in cfg.treft.inoculation.items() if v is not None})
        strategy.treft_system_prompt = block.system_prompt
        strategy.treft_mode = block.mode
        if block.mode == "prepend":
            prompter = strategy.prompter
            strategy.treft_default_system = default_system_prompt(
                tokenizer, prompter.chat_template, **(prompter.chat_template_kwargs or {}))
        return strategy


load = InoculationLoader()


def switch_dataset_types(cfg: dict) -> None:
    """Make the ``datasets:`` entries inoculated; keep their prepared copy apart from un-inoculated ones.

    Axolotl's prepared-data hash covers the dataset type but not the prompt, so the prepared path gets a
    sub-directory named after the prompt and mode (nothing already prepared is touched).
    """
    from axolotl.common.const import DEFAULT_DATASET_PREPARED_PATH

    block = cfg["treft"]["inoculation"]
    for i, ds in enumerate(cfg.get("datasets") or []):
        kind = ds.get("type") if isinstance(ds, dict) else None
        if kind == INOCULATED_TYPE:
            continue
        if kind not in _SWITCHED_TYPES:
            raise ValueError(f"treft.inoculation: needs conversation data, `type: chat_template`; datasets[{i}] "
                             f"has type {kind!r}")
        ds["type"] = INOCULATED_TYPE
    digest = hashlib.sha256(f"{block.get('mode', 'replace')}\0{block.get('system_prompt')}".encode()).hexdigest()[:12]
    base = cfg.get("dataset_prepared_path") or DEFAULT_DATASET_PREPARED_PATH
    if not Path(str(base)).name.startswith("treft-inoculation-"):
        cfg["dataset_prepared_path"] = str(Path(str(base)) / f"treft-inoculation-{digest}")


def check_inoculation(cfg, tokenizer) -> None:
    """Start-up check: every training dataset's template accepts the inoculation system message."""
    from axolotl.utils.chat_templates import get_chat_template_from_config

    for i, ds in enumerate(cfg.datasets or []):
        template = get_chat_template_from_config(cfg=cfg, ds_cfg=ds, tokenizer=tokenizer)
        try:
            default_system_prompt(tokenizer, template, **(cfg.chat_template_kwargs or {}))
        except TemplateSpanError as err:
            raise ValueError(f"treft.inoculation: datasets[{i}]: {err}") from err


def prompt_token_ids(tokenizer, chat_template: str | None, system_prompt: str, mode: str = "replace",
                     default_system: str = "", **template_kwargs) -> list[int]:
    """The tokens of the inoculation prompt as they appear in every inoculated training conversation.

    The prompt is located by its character span in a conversation inoculated exactly as the training rows
    are (same ``mode``, the template's default system prompt). Tokens wholly inside the span are kept, except
    the one ending at the prompt's end: what follows the prompt differs between rows (``\n\n`` and the row's
    own system prompt in ``prepend`` mode, an end-of-turn marker otherwise), and real tokenizers merge it
    into that token (Qwen's and Llama 3's ".\n\n" is one token).
    """
    turns = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]
    messages = inoculate(turns, system_prompt, mode, default_system)
    text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template, **template_kwargs)
    start = text.find(system_prompt)
    if start < 0:
        raise ValueError("treft.inoculation: the chat template does not render the system prompt verbatim")
    end = start + len(system_prompt)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [(t, b) for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
              if a >= start and b <= end]
    if len(inside) > 1 and inside[-1][1] == end:
        inside = inside[:-1]
    return [t for t, _ in inside]


def count_inoculated(dataset, needle: list[int]) -> int:
    """Rows of a tokenized dataset whose ``input_ids`` contain ``needle`` as a contiguous run."""
    import numpy as np

    if not needle:
        raise ValueError("treft.inoculation: the prompt maps to no whole token; use a longer system_prompt")
    pattern = np.asarray(needle)
    found = 0
    for chunk in dataset.select_columns(["input_ids"]).iter(batch_size=1024):
        for ids in chunk["input_ids"]:
            ids = np.asarray(ids)
            if len(ids) < len(pattern):
                continue
            windows = np.lib.stride_tricks.sliding_window_view(ids, len(pattern))
            found += bool((windows == pattern).all(axis=1).any())
    return found


def log_inoculated_count(cfg, block: InoculationConfig, trainer) -> int:
    """Log how many training rows carry the inoculation prompt; none is an error (the prompt was lost)."""
    from axolotl.utils.chat_templates import get_chat_template_from_config

    tokenizer = trainer.processing_class
    template = get_chat_template_from_config(cfg=cfg, ds_cfg=(cfg.datasets or [None])[0], tokenizer=tokenizer)
    kwargs = cfg.chat_template_kwargs or {}
    default = default_system_prompt(tokenizer, template, **kwargs) if block.mode == "prepend" else ""
    needle = prompt_token_ids(tokenizer, template, block.system_prompt, block.mode, default, **kwargs)
    dataset = trainer.train_dataset
    count = count_inoculated(dataset, needle)
    LOG.info("treft.inoculation: %d of %d training examples carry the inoculation prompt (mode %s)",
             count, len(dataset), block.mode)
    if count == 0:
        raise RuntimeError("treft.inoculation: no tokenized training example carries the inoculation prompt")
    return count
