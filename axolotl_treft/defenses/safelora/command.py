"""SafeLoRA's entry points: Axolotl's ``post_train`` hook and the ``axolotl-treft safelora`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from ...distributed import is_main_process
from .projection import SafeLoRASettings, run_safelora
from .weights import ADAPTER_CONFIG, LOG, REPORT_NAME, SafeLoRAError, adapter_weights_path

# ----------------------------------------------------------------------------------- Axolotl + CLI entry


def _get(block: Any, key: str) -> Any:
    if block is None:
        return None
    if isinstance(block, dict):
        return block.get(key)
    return getattr(block, key, None)


def apply_after_training(cfg: Any, not_before: float | None = None) -> str:
    """Axolotl ``post_train`` entry: project ``<cfg.output_dir>`` once this run's adapter is saved.

    Returns what happened: ``"done"``, ``"skipped"`` (output already made from this adapter),
    ``"waiting"`` (this run's adapter weights not saved yet — Axolotl's first post_train call precedes the final
    save; weights older than ``not_before``, the run's start time, are a previous run's in a reused output_dir)
    or ``"not-rank-0"``.
    """
    block = _get(_get(cfg, "treft"), "safelora")
    if not block:
        return "disabled"
    if not is_main_process():
        LOG.debug("safelora: not rank 0; leaving the projection to rank 0")
        return "not-rank-0"
    if not _get(cfg, "output_dir"):
        raise SafeLoRAError("treft.safelora: the Axolotl config has no output_dir holding the trained adapter")
    adapter_dir = Path(str(cfg.output_dir))
    select = _get(block, "select") or "top_k"
    top_k = _get(block, "top_k")
    threshold = _get(block, "threshold")
    settings = SafeLoRASettings(
        select=select, top_k=10 if top_k is None else top_k, threshold=0.5 if threshold is None else threshold
    )
    for key in ("base_model", "aligned_model"):
        if not _get(block, key):
            raise SafeLoRAError(f"treft.safelora.{key}: required")
    out_dir = Path(str(_get(block, "output_dir") or adapter_dir / "safelora"))
    have_config = (adapter_dir / ADAPTER_CONFIG).is_file()
    weights = adapter_weights_path(adapter_dir)
    if weights is None:
        LOG.info(
            "safelora: no adapter weights in %s yet (%s); the final save has not happened — SafeLoRA runs on the "
            "next post_train call", adapter_dir, f"{ADAPTER_CONFIG} present" if have_config else "empty",
        )
        return "waiting"
    if not_before is not None and weights.stat().st_mtime < not_before:
        LOG.info("safelora: the adapter in %s predates this run (a previous run's, reused output_dir); SafeLoRA "
                 "waits for this run's save", adapter_dir)
        return "waiting"
    result = run_safelora(
        adapter_dir, _get(block, "base_model"), _get(block, "aligned_model"), out_dir, settings, skip_if_done=True
    )
    if result.skipped:
        return "skipped"
    LOG.info("safelora: projected modules: %s", result.projected)
    return "done"


def main(args: argparse.Namespace) -> int:
    """``axolotl-treft safelora``: 0 on success, 2 on bad input (message on stderr)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.threshold is not None:
            settings = SafeLoRASettings(select="threshold", threshold=args.threshold)
        else:
            settings = SafeLoRASettings(select="top_k", top_k=10 if args.top_k is None else args.top_k)
        result = run_safelora(args.adapter, args.base_model, args.aligned_model, args.out, settings)
    except SafeLoRAError as exc:
        print(f"axolotl-treft safelora: error: {exc}", file=sys.stderr)
        return 2
    report = result.report
    print(f"projected {report['num_projected']}/{report['num_modules']} modules ({settings.as_dict()})")
    for row in report["modules"]:
        cos = "  n/a  " if row["cosine"] is None else f"{row['cosine']:.5f}"
        print(f"  {'*' if row['projected'] else ' '} {cos}  {row['name']}")
    print(f"adapter: {result.out_dir}")
    print(f"report:  {result.out_dir / REPORT_NAME}")
    return 0

