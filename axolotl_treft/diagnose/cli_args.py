"""Command-line options of ``axolotl-treft diagnose`` (no heavy imports: the parser is built for every command)."""

from __future__ import annotations

import argparse

PATCH_DEFAULT = "prefix,postfix,prefix_postfix,query"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", required=True, help="the initial model (path or hub id)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", default=None, help="PEFT adapter of --base-model to diagnose (initial = adapter off)")
    which.add_argument("--model", default=None, help="full finetune of --base-model to diagnose")
    p.add_argument("--task", required=True, help="lm-eval task or group in the task pack or --include-path")
    p.add_argument("--patch", default=PATCH_DEFAULT,
                   help=f"K/V patching regions, comma-separated, or none (default {PATCH_DEFAULT}; also postfix_empty)")
    p.add_argument("--layers", default="all", help="layers whose K/V are patched: all (default) or e.g. 0,1,5")
    p.add_argument("--layerwise", action="store_true",
                   help="also patch the residual stream at the prefix, one layer at a time, every layer")
    p.add_argument("--perturb", default=None, help="token perturbation of these regions (e.g. prefix)")
    p.add_argument("--trials", type=int, default=10, help="perturbation trials per question (default 10)")
    p.add_argument("--k", type=int, default=10, help="tokens perturbed per prompt (default 10, or all if fewer)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the trials (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and perturbation (default 0)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of the task")
    p.add_argument("--include-path", action="append", default=None,
                   help="extra lm-eval task directory (repeatable); the task pack is always included")
    p.add_argument("--batch-size", type=int, default=32, help="generation batch size (default 32)")
    p.add_argument("--max-gen-toks", type=int, default=None, help="max new tokens (default: the task's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--out", required=True, help="output directory (diagnose.json, .md, .png, samples/)")
    p.add_argument("--force", action="store_true", help="overwrite a previous diagnose run in --out")
