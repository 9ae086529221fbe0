"""Axolotl dataset type ``axolotl_treft.chat_template``: Axolotl's own ``chat_template`` plus one column.

Tokenization, masking and every option are Axolotl's; this subclass only adds ``treft_segments``, a
segment code per token (see :mod:`axolotl_treft.spans`). The plugin switches ``type: chat_template``
datasets to this type when a regularizer needs template spans, so user configs stay unchanged.
A conversation whose spans cannot be located, or whose re-rendering differs from Axolotl's tokens, gets
``SEG_UNLOCATED`` / ``SEG_MISMATCH`` on every token (no mode regularizes them); the start-up audit
(:func:`axolotl_treft.datasets.audit_regularized_samples`) counts them and fails or warns.
"""

from __future__ import annotations

from axolotl.prompt_strategies.chat_template import ChatTemplateStrategy, MistralStrategy, StrategyLoader

from .spans import (
    SEG_MISMATCH,
    SEG_RESPONSE,
    SEG_UNLOCATED,
    SEGMENTS_KEY,
    TemplateSpanError,
    conversation_spans,
)


class _SegmentsMixin:
    """Adds ``treft_segments`` to every tokenized conversation."""

    def _tokenize_single_prompt(self, prompt: dict):
        result = super()._tokenize_single_prompt(prompt)
        input_ids = result["input_ids"]
        result[SEGMENTS_KEY] = self._segments_for(prompt, input_ids)
        return result

    def _segments_for(self, prompt: dict, input_ids: list[int]) -> list[int]:
        prompter = self.prompter
        try:
            turns = self.get_conversation_thread(prompt)
            spans = conversation_spans(
                self.tokenizer,
                turns,
                chat_template=prompter.chat_template,
                tools=self._get_tools(prompt),
                **(prompter.chat_template_kwargs or {}),
            )
        except TemplateSpanError:
            return [SEG_UNLOCATED] * len(input_ids)
        ids, segments = spans.input_ids, spans.segments
        n = min(len(ids), len(input_ids))
        if ids[:n] != list(input_ids[:n]):
            return [SEG_MISMATCH] * len(input_ids)
        return segments[:n] + [SEG_RESPONSE] * (len(input_ids) - n)  # tokens Axolotl appended: not template


class SegmentedChatTemplateStrategy(_SegmentsMixin, ChatTemplateStrategy):
    """``ChatTemplateStrategy`` with template segments."""


class SegmentedMistralStrategy(_SegmentsMixin, MistralStrategy):
    """``MistralStrategy`` (mistral-common tokenizers) with template segments."""


class SegmentedStrategyLoader(StrategyLoader):
    def _get_strategy_cls(self, cfg):
        if cfg.tokenizer_use_mistral_common:
            return SegmentedMistralStrategy
        return SegmentedChatTemplateStrategy


load = SegmentedStrategyLoader()
