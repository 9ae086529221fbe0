"""SafeLoRA's inputs: checkpoint weights read one tensor at a time, and the trained LoRA adapter."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

LOG = logging.getLogger(__name__)

REPORT_NAME = "safelora_report.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
REPORT_VERSION = 1
# files copied next to the projected adapter so the output directory is as usable as the input one
AUX_FILES = re.compile(
    r"^(README\.md|tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|"
    r"chat_template\.(jinja|json)|spiece\.model|generation_config\.json)$"
)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_UNSUPPORTED_KEY = re.compile(r"\.(lora_B\.bias|lora_magnitude_vector)(\.|$)")
_EMBEDDING_KEY = re.compile(r"\.lora_embedding_[AB]$")


class SafeLoRAError(ValueError):
    """Bad input to SafeLoRA; the message names the problem."""


# ------------------------------------------------------------------------------------ lazy weight access


def resolve_model_dir(model: str | os.PathLike, role: str) -> Path:
    """A local directory as is; otherwise a hub id fetched (safetensors + json only) or read from the cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SafeLoRAError(f"{role} model {str(model)!r} is a file; pass the model directory")
    text = str(model)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not text.strip():
        raise SafeLoRAError(f"{role} model directory {text!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as exc:  # offline, unknown repo, gated, ...
        raise SafeLoRAError(
            f"{role} model {text!r} is neither a local directory nor a hub model available here ({exc})"
        ) from exc


class LazyWeights:
    """Tensor name → safetensors file for one checkpoint directory; tensors are read one at a time."""

    def __init__(self, model_dir: Path, role: str) -> None:
        from safetensors import safe_open

        self.dir = Path(model_dir)
        self.role = role
        self._safe_open = safe_open
        self.file_of: dict[str, Path] = {}
        indexes = sorted(self.dir.glob("*.safetensors.index.json"))
        if indexes:
            for index in indexes:
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (OSError, ValueError, KeyError) as exc:
                    raise SafeLoRAError(f"{role} model: cannot read the shard index {index}: {exc}") from exc
                for name, fname in weight_map.items():
                    self.file_of[name] = self.dir / fname
            missing = sorted({str(p) for p in self.file_of.values() if not p.is_file()})
            if missing:
                raise SafeLoRAError(f"{role} model: shard(s) listed in the index are missing: {missing[:3]}")
        else:
            files = sorted(p for p in self.dir.glob("*.safetensors") if not p.name.startswith("adapter_model"))
            if not files:
                hint = " (it holds adapter weights: pass the model, not an adapter)" if (
                    self.dir / ADAPTER_CONFIG
                ).is_file() else ""
                raise SafeLoRAError(
                    f"{role} model {self.dir}: no *.safetensors weights found{hint}; SafeLoRA reads safetensors "
                    "checkpoints (convert pytorch_model.bin with save_pretrained(safe_serialization=True))"
                )
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                        self.file_of[name] = file
        self.config = self._read_config()

    def _read_config(self) -> dict[str, Any]:
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            return {}
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError:
            return {}
        return cfg if isinstance(cfg, dict) else {}

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def shape(self, name: str) -> tuple[int, ...]:
        with self._safe_open(str(self.file_of[name]), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        with self._safe_open(str(self.file_of[name]), framework="pt") as f:
            return f.get_tensor(name)

    def resolve(self, module: str) -> str | None:
        """Checkpoint key of ``<module>.weight`` (with/without a leading ``model.``; tied lm_head)."""
        candidates = [f"{module}.weight"]
        if module.startswith("model."):
            candidates.append(f"{module[len('model.'):]}.weight")
        else:
            candidates.append(f"model.{module}.weight")
        for cand in candidates:
            if cand in self.file_of:
                return cand
        text_cfg = self.config.get("text_config", self.config)
        if module.split(".")[-1] == "lm_head" and text_cfg.get("tie_word_embeddings", True):
            for cand in ("model.embed_tokens.weight", "embed_tokens.weight"):
                if cand in self.file_of:
                    return cand
        return None


_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
              "num_key_value_heads")


def check_same_architecture(base: LazyWeights, aligned: LazyWeights) -> None:
    b_cfg = base.config.get("text_config", base.config)
    a_cfg = aligned.config.get("text_config", aligned.config)
    diffs = [
        f"{key}: {b_cfg[key]!r} vs {a_cfg[key]!r}"
        for key in _ARCH_KEYS
        if key in b_cfg and key in a_cfg and b_cfg[key] != a_cfg[key]
    ]
    if diffs:
        raise SafeLoRAError(
            "base and aligned models have different architectures (" + "; ".join(diffs) + "); SafeLoRA needs "
            "the same architecture before and after alignment (e.g. Qwen2.5-7B and Qwen2.5-7B-Instruct)"
        )


# ------------------------------------------------------------------------------------------- adapter


@dataclass
class LoadedAdapter:
    dir: Path
    config: dict[str, Any]
    config_bytes: bytes
    weights_path: Path
    tensors: dict[str, torch.Tensor]
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)  # module → (A key, B key)
    other_keys: list[str] = field(default_factory=list)
    embedding_modules: list[str] = field(default_factory=list)


def adapter_weights_path(adapter_dir: Path) -> Path | None:
    for name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    return None


def load_adapter(adapter_dir: str | os.PathLike) -> LoadedAdapter:
    adir = Path(adapter_dir).expanduser()
    if not adir.is_dir():
        raise SafeLoRAError(f"adapter directory {str(adapter_dir)!r} does not exist")
    cfg_path = adir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        looks_full = any(adir.glob("model*.safetensors")) or (adir / "pytorch_model.bin").is_file()
        hint = (
            " — it looks like a full fine-tune (model weights, no adapter); SafeLoRA only projects LoRA adapters"
            if looks_full
            else ""
        )
        raise SafeLoRAError(f"adapter directory {adir} has no {ADAPTER_CONFIG}: not a PEFT adapter{hint}")
    config_bytes = cfg_path.read_bytes()
    try:
        config = json.loads(config_bytes)
    except ValueError as exc:
        raise SafeLoRAError(f"{cfg_path}: not valid JSON ({exc})") from exc
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise SafeLoRAError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}, not a LoRA adapter")
    if config.get("use_dora"):
        raise SafeLoRAError(f"{cfg_path}: DoRA adapters (use_dora: true) are not supported; ΔW is not B·A")
    weights_path = adapter_weights_path(adir)
    if weights_path is None:
        raise SafeLoRAError(f"adapter directory {adir} has no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN})")
    if weights_path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(weights_path))
    else:
        tensors = torch.load(str(weights_path), map_location="cpu", weights_only=True)
    adapter = LoadedAdapter(adir, config, config_bytes, weights_path, dict(tensors))

    halves: dict[str, dict[str, str]] = {}
    for key in adapter.tensors:
        if _UNSUPPORTED_KEY.search(key):
            raise SafeLoRAError(f"adapter tensor {key}: LoRA biases / DoRA magnitudes are not supported")
        m = _LORA_KEY.match(key)
        if m:
            halves.setdefault(m["module"], {})[m["kind"]] = key
            continue
        adapter.other_keys.append(key)
        if _EMBEDDING_KEY.search(key):
            adapter.embedding_modules.append(key.rsplit(".", 1)[0])
    for module, pair in halves.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise SafeLoRAError(f"adapter module {module}: has {sorted(pair)} but needs both lora_A and lora_B")
        adapter.modules[module] = (pair["lora_A"], pair["lora_B"])
    if not adapter.modules:
        raise SafeLoRAError(f"adapter {weights_path}: holds no lora_A/lora_B weights")
    return adapter


def module_path(module_key: str) -> str:
    return module_key[len(PEFT_PREFIX):] if module_key.startswith(PEFT_PREFIX) else module_key


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


