"""``treft.eval``: the tasks on the final model, after training (and SafeLoRA)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..distributed import is_main_process
from .callback import headline
from .live import flat, run_tasks, task_metrics

EVAL_DIR = "eval"


def saved_weights(output_dir: Path, not_before: float | None) -> Path | None:
    """This run's final weights in ``output_dir`` (adapter or full model), None before the final save."""
    names = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin",
             "model.safetensors.index.json", "pytorch_model.bin.index.json")
    for name in names:
        path = output_dir / name
        if path.is_file() and (not_before is None or path.stat().st_mtime >= not_before):
            return path
    return None


def final_eval(cfg: Any, block: Any, model, tokenizer, trainer: Any = None,
               safelora_dir: Path | None = None) -> dict[str, Any]:
    """Run ``treft.eval`` on the final model (or on SafeLoRA's projected adapter when ``safelora_dir`` is
    given), write results and samples under ``OUTPUT_DIR/eval/``, print and log the headline metrics."""
    output_dir = Path(str(cfg.output_dir))
    name = str(output_dir)
    if safelora_dir is not None:
        model = load_projected(cfg, safelora_dir)
        name = str(safelora_dir)
    start = time.perf_counter()
    results = run_tasks(model, tokenizer, block, cfg, output_dir / EVAL_DIR, name)
    metrics = task_metrics(results)
    seconds = time.perf_counter() - start
    print(f"treft.eval ({seconds:.0f} s, {name}): {headline(metrics)}; results under {output_dir / EVAL_DIR}",
          flush=True)
    logs = flat(metrics, "eval")
    if trainer is not None and logs:
        trainer.log(logs)
    return results


def load_projected(cfg: Any, adapter_dir: Path):
    """The base model with SafeLoRA's projected adapter, in the training dtype, on the training device."""
    import torch

    from ..loading import load_model

    dtype = torch.bfloat16 if cfg.get("bf16") is True else torch.float16 if cfg.get("fp16") is True else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(str(cfg.base_model), adapter_dir, dtype, device, bool(cfg.get("trust_remote_code")),
                      adapter_label="SafeLoRA's projected adapter", base_label="base_model")


def run_after_training(cfg: Any, settings: Any, model, trainer: Any, run_started: float | None,
                       safelora: str | None) -> bool:
    """The plugin's ``post_train`` entry (called twice by Axolotl): evaluate once this run's final model is
    saved (after the distributed cleanup, so rank 0 needs no other rank), on SafeLoRA's projection when it ran.
    Returns whether the evaluation is done (True on ranks other than 0)."""
    if not is_main_process():
        return True
    output_dir = Path(str(cfg.output_dir))
    if safelora == "waiting" or (safelora is None and saved_weights(output_dir, run_started) is None):
        return False  # Axolotl's first post_train call comes before the final save
    tokenizer = getattr(trainer, "processing_class", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(output_dir))
    projected = None
    if safelora in ("done", "skipped"):
        block = settings.safelora
        projected = Path(str(block.output_dir)) if block.output_dir else output_dir / "safelora"
    final_eval(cfg, settings.eval, model, tokenizer, trainer, safelora_dir=projected)
    return True
