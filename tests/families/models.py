"""Tiny random-weight models of each family's real architecture class, saved with the family's tokenizer."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .catalog import _SMALL, FAMILIES, tokenizer_dir
from .sdist import CACHE


def model_dir(family: str) -> Path:
    """A 2-layer random model directory (config, weights, tokenizer) Axolotl loads with ``base_model:``."""
    import transformers

    fam = FAMILIES[family]
    tok_dir = tokenizer_dir(family)
    cfg_kwargs = {**_SMALL, **fam.arch_kwargs}
    key = hashlib.sha256(json.dumps([tok_dir.name, fam.model_class, cfg_kwargs, transformers.__version__],
                                    sort_keys=True).encode()).hexdigest()[:12]
    out = CACHE / "models" / f"{family}-{key}"
    if (out / ".complete").exists():
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # parallel test workers: one builds, the others wait for it
        if not (out / ".complete").exists():
            _build(out, fam, tok_dir, cfg_kwargs)
    return out


def _build(out: Path, fam, tok_dir: Path, cfg_kwargs: dict) -> None:
    import torch
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = getattr(transformers, fam.arch)(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=None, tie_word_embeddings=True, **cfg_kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, fam.model_class)(config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
