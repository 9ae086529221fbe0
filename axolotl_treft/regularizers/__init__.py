"""Regularizers behind one interface (:class:`~.base.Regularizer`), built from the ``treft:`` block."""

from __future__ import annotations

from typing import Any

from .base import Regularizer


def build_regularizers(treft: Any, trainer, retain_batches=None) -> list[Regularizer]:
    """Instantiate the regularizers enabled in the (validated) ``treft:`` config block."""
    from ..args import TReFTConfig

    cfg = treft if isinstance(treft, TReFTConfig) else TReFTConfig.model_validate(_plain(treft or {}))
    regs: list[Regularizer] = []
    if cfg.kv is not None:
        from .kv import KVRegularizer

        regs.append(KVRegularizer(cfg.kv, train_dataset=trainer.train_dataset))
    if cfg.kl is not None:
        from .kl import KLRegularizer

        regs.append(KLRegularizer(cfg.kl, retain_batches=retain_batches if cfg.kl.on == "retain" else None))
    if cfg.feature_l2 is not None:
        from .feature_l2 import FeatureL2Regularizer

        regs.append(FeatureL2Regularizer(cfg.feature_l2))
    return regs


def _plain(value: Any) -> Any:
    """DictDefault → plain dicts/lists, so pydantic sees ordinary data."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
