"""Regularizers behind one interface (:class:`~.base.Regularizer`), built from the ``treft:`` block."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Regularizer

if TYPE_CHECKING:
    from ..args import KVConfig


def build_regularizers(treft: Any, trainer, retain_batches=None) -> list[Regularizer]:
    """Instantiate the regularizers enabled in the (validated) ``treft:`` config block."""
    from ..args import TReFTConfig, plain_data

    cfg = treft if isinstance(treft, TReFTConfig) else TReFTConfig.model_validate(plain_data(treft or {}))
    regs: list[Regularizer] = []
    terms = cfg.kv_terms()
    if terms:
        from .kv import KVRegularizer

        names = kv_term_names(terms) if isinstance(cfg.kv, list) else ["kv"]
        empty_query = None
        if any(kv.fixed_source == "empty_query" for kv in terms):
            from ..datasets import fixed_postfix_conversation

            empty_query = fixed_postfix_conversation(trainer.axolotl_cfg, trainer.processing_class)
        regs += [KVRegularizer(kv, train_dataset=trainer.train_dataset, name=name, empty_query=empty_query)
                 for kv, name in zip(terms, names, strict=True)]
    if cfg.kl is not None:
        from .kl import KLRegularizer

        regs.append(KLRegularizer(cfg.kl, retain_batches=retain_batches if cfg.kl.on == "retain" else None))
    if cfg.feature_l2 is not None:
        from .feature_l2 import FeatureL2Regularizer

        regs.append(FeatureL2Regularizer(cfg.feature_l2))
    if cfg.constrained_sft is not None:
        from .constrained_sft import ConstrainedSFTRegularizer

        regs.append(ConstrainedSFTRegularizer(cfg.constrained_sft))
    return regs


def kv_term_names(terms: list[KVConfig]) -> list[str]:
    """Log names of a list of K/V terms: ``kv_<tokens>``, numbered when several terms share a mode."""
    modes = [kv.tokens for kv in terms]
    names = []
    for i, mode in enumerate(modes):
        names.append(f"kv_{mode}" if modes.count(mode) == 1 else f"kv_{mode}_{modes[: i + 1].count(mode)}")
    return names
