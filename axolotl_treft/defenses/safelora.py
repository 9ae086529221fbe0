"""SafeLoRA (Hsu et al., NeurIPS 2024): project a trained LoRA update onto the alignment subspace.

For every LoRA-adapted linear layer with weight ``W`` and update ``ΔW = s · B · A`` (PEFT: ``lora_B @ lora_A``
times the LoRA scaling ``s``), the alignment matrix is ``V = W_aligned − W_base`` and the (approximate)
projection is ``C = V Vᵀ / ‖V‖_F``. The layers whose update is least aligned, measured by the cosine between
``C · ΔW`` and ``ΔW`` (the ``top_k`` lowest, or all with cosine ``≤ threshold``), get ``B ← C · B``; ``A`` and
every other tensor of the adapter are kept. The result is a normal PEFT adapter plus a JSON report.

Memory: no model is instantiated. The base and aligned weights are read one tensor at a time from the
checkpoints' ``*.safetensors`` files (``safetensors.safe_open``; the index json maps sharded checkpoints), so
at most one ``W_base``, one ``W_aligned`` and their difference ``V`` live in memory at once. ``C`` (out × out,
18944² for a Qwen2.5-7B MLP) is never formed:

* ``C · B = V (Vᵀ B) / ‖V‖_F`` (out × r), and
* with ``P = C · B`` and the r × r Gram matrix ``G = A Aᵀ``, the Frobenius products are traces of r × r
  matrices: ``⟨P A, B A⟩ = Σ (Pᵀ B) ⊙ G``, ``‖P A‖² = Σ (Pᵀ P) ⊙ G``, ``‖B A‖² = Σ (Bᵀ B) ⊙ G``,
  so ``ΔW`` (out × in) is never formed either. The scaling ``s`` cancels in the cosine.

``V`` and the matrix products are float64 for matrices up to 2**24 elements and float32 above (the r × r
traces are always float64). Note ``⟨C ΔW, ΔW⟩ = ‖Vᵀ ΔW‖² / ‖V‖_F ≥ 0``: the cosine lies in [0, 1].

Differences from IBM's reference code (IBM/SafeLoRA ``model.py``): only ``.weight`` tensors of the adapted
modules are used (Qwen2's ``q/k/v_proj.bias`` would otherwise desynchronise the pairing), modules are paired
by name rather than by parameter order, the cosine is not rounded, and a module with a zero update
(``B = 0``) gets cosine ``None`` and is never selected (projecting it would change nothing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
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
_FLOAT64_MAX_NUMEL = 1 << 24
# files copied next to the projected adapter so the output directory is as usable as the input one
_AUX_FILES = re.compile(
    r"^(README\.md|tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|"
    r"chat_template\.(jinja|json)|spiece\.model|generation_config\.json)$"
)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_UNSUPPORTED_KEY = re.compile(r"\.(lora_B\.bias|lora_magnitude_vector)(\.|$)")
_EMBEDDING_KEY = re.compile(r"\.lora_embedding_[AB]$")


class SafeLoRAError(ValueError):
    """Bad input to SafeLoRA; the message names the problem."""


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SafeLoRASettings:
    """Which modules to project: the ``top_k`` lowest cosines, or every cosine ``<= threshold``."""

    select: str = "top_k"
    top_k: int = 10
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.select not in ("top_k", "threshold"):
            raise SafeLoRAError(f"select: unknown mode {self.select!r}; choose 'top_k' or 'threshold'")
        if self.select == "top_k" and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise SafeLoRAError(f"top_k: must be an integer >= 1 (got {self.top_k!r})")
        if self.select == "top_k" and self.top_k < 1:
            raise SafeLoRAError(f"top_k: must be >= 1 (got {self.top_k})")
        if self.select == "threshold" and not (
            isinstance(self.threshold, (int, float)) and -1.0 <= float(self.threshold) <= 1.0
        ):
            raise SafeLoRAError(f"threshold: must be a cosine in [-1, 1] (got {self.threshold!r})")

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"select": self.select}
        if self.select == "top_k":
            out["top_k"] = self.top_k
        else:
            out["threshold"] = float(self.threshold)
        return out


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


def _check_same_architecture(base: LazyWeights, aligned: LazyWeights) -> None:
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
class _Adapter:
    dir: Path
    config: dict[str, Any]
    config_bytes: bytes
    weights_path: Path
    tensors: dict[str, torch.Tensor]
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)  # module → (A key, B key)
    other_keys: list[str] = field(default_factory=list)
    embedding_modules: list[str] = field(default_factory=list)


def _adapter_weights_path(adapter_dir: Path) -> Path | None:
    for name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    return None


def _load_adapter(adapter_dir: str | os.PathLike) -> _Adapter:
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
    weights_path = _adapter_weights_path(adir)
    if weights_path is None:
        raise SafeLoRAError(f"adapter directory {adir} has no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN})")
    if weights_path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(weights_path))
    else:
        tensors = torch.load(str(weights_path), map_location="cpu", weights_only=True)
    adapter = _Adapter(adir, config, config_bytes, weights_path, dict(tensors))

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


def _module_path(module_key: str) -> str:
    return module_key[len(PEFT_PREFIX):] if module_key.startswith(PEFT_PREFIX) else module_key


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ math


def project_module(
    w_base: torch.Tensor, w_aligned: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    *, fan_in_fan_out: bool = False,
) -> tuple[float | None, torch.Tensor, float, float]:
    """``(cosine(C ΔW, ΔW), C·B, ‖V‖_F, ‖B A‖_F)`` for one module, never forming C (out × out) or ΔW.

    ``w_*`` are stored checkpoint weights (in × out when ``fan_in_fan_out``), ``lora_a`` r × in, ``lora_b``
    out × r. The cosine is ``None`` when ``B A = 0``; it is 0 when ``V = 0`` (then ``C·B = 0``).
    """
    dtype = torch.float64 if w_base.numel() <= _FLOAT64_MAX_NUMEL else torch.float32
    v = w_aligned.to(dtype)
    v -= w_base.to(dtype)
    if fan_in_fan_out:
        v = v.t()
    b = lora_b.to(dtype)
    a = lora_a.to(dtype)
    v_norm = float(torch.linalg.matrix_norm(v))
    projected_b = torch.zeros_like(b) if v_norm == 0.0 else (v @ (v.t() @ b)) / v_norm
    del v
    gram_a = (a @ a.t()).double()
    b64, p64 = b.double(), projected_b.double()
    sq_delta = max(float(((b64.t() @ b64) * gram_a).sum()), 0.0)
    sq_proj = max(float(((p64.t() @ p64) * gram_a).sum()), 0.0)
    inner = float(((p64.t() @ b64) * gram_a).sum())
    delta_norm = math.sqrt(sq_delta)
    if sq_delta == 0.0:
        cosine: float | None = None
    elif sq_proj == 0.0:
        cosine = 0.0
    else:
        cosine = max(-1.0, min(1.0, inner / math.sqrt(sq_delta * sq_proj)))
    return cosine, projected_b.to(torch.float32), v_norm, delta_norm


def select_modules(cosines: dict[str, float | None], settings: SafeLoRASettings) -> set[str]:
    """Module names to project: the k lowest cosines, or cosine ≤ threshold (``None`` is never selected)."""
    scored = [(c, _natural_key(name), name) for name, c in cosines.items() if c is not None]
    if settings.select == "threshold":
        return {name for c, _, name in scored if c <= settings.threshold}
    scored.sort()
    return {name for _, _, name in scored[: settings.top_k]}


# ----------------------------------------------------------------------------------------------- driver


@dataclass
class SafeLoRAResult:
    out_dir: Path
    report: dict[str, Any]
    skipped: bool = False

    @property
    def projected(self) -> list[str]:
        return [m["name"] for m in self.report["modules"] if m["projected"]]


def _same_run(report_path: Path, adapter_sha: str, base: str, aligned: str, settings: SafeLoRASettings) -> bool:
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return False
    out_weights = report_path.parent / ADAPTER_WEIGHTS
    return (
        report.get("version") == REPORT_VERSION
        and report.get("adapter_sha256") == adapter_sha
        and report.get("base_model") == base
        and report.get("aligned_model") == aligned
        and report.get("settings") == settings.as_dict()
        and out_weights.is_file()
        and (report_path.parent / ADAPTER_CONFIG).is_file()
        and report.get("output_sha256") == _sha256(out_weights)
    )


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def run_safelora(
    adapter_dir: str | os.PathLike,
    base_model: str | os.PathLike,
    aligned_model: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: SafeLoRASettings | None = None,
    *,
    skip_if_done: bool = False,
) -> SafeLoRAResult:
    """Project ``adapter_dir`` with the alignment matrices of (``base_model``, ``aligned_model``) into ``out_dir``.

    Writes ``adapter_config.json`` (byte-identical), ``adapter_model.safetensors`` (projected lora_B, all other
    tensors unchanged), the tokenizer/README files found next to the adapter, and ``safelora_report.json``
    (last, so its presence marks a complete output). With ``skip_if_done`` an existing output made from the
    same adapter weights, models and settings is left alone (``result.skipped``).
    """
    settings = settings or SafeLoRASettings()
    out = Path(out_dir).expanduser()
    adapter = _load_adapter(adapter_dir)
    if out.resolve() == adapter.dir.resolve():
        raise SafeLoRAError(f"output directory {out} is the adapter directory; choose another --out")
    adapter_sha = _sha256(adapter.weights_path)
    report_path = out / REPORT_NAME
    if skip_if_done and report_path.is_file() and _same_run(
        report_path, adapter_sha, str(base_model), str(aligned_model), settings
    ):
        LOG.info("safelora: %s already holds the projection of this adapter; nothing to do", out)
        return SafeLoRAResult(out, json.loads(report_path.read_text()), skipped=True)

    base = LazyWeights(resolve_model_dir(base_model, "base"), "base")
    aligned = LazyWeights(resolve_model_dir(aligned_model, "aligned"), "aligned")
    _check_same_architecture(base, aligned)
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))

    LOG.info(
        "safelora: %d LoRA modules of %s; base %s, aligned %s; %s",
        len(adapter.modules), adapter.dir, base.dir, aligned.dir, settings.as_dict(),
    )
    rows: list[dict[str, Any]] = []
    projected_b: dict[str, torch.Tensor] = {}
    cosines: dict[str, float | None] = {}
    for module_key in sorted(adapter.modules, key=_natural_key):
        a_key, b_key = adapter.modules[module_key]
        module = _module_path(module_key)
        lora_a, lora_b = adapter.tensors[a_key], adapter.tensors[b_key]
        if lora_a.ndim != 2 or lora_b.ndim != 2:
            raise SafeLoRAError(
                f"module {module}: LoRA factors of shapes {tuple(lora_a.shape)} / {tuple(lora_b.shape)} are not "
                "2-D (convolution LoRA is not supported)"
            )
        rank, fan_in = lora_a.shape
        fan_out, rank_b = lora_b.shape
        if rank != rank_b:
            raise SafeLoRAError(f"module {module}: lora_A has rank {rank} but lora_B has rank {rank_b}")
        expected = (fan_in, fan_out) if fan_in_fan_out else (fan_out, fan_in)
        names = {}
        for role, weights in (("base", base), ("aligned", aligned)):
            name = weights.resolve(module)
            if name is None:
                raise SafeLoRAError(
                    f"module {module}: {module}.weight not found in the {role} model {weights.dir}; is it the "
                    "model this adapter was trained on?"
                )
            names[role] = name
        base_shape, aligned_shape = base.shape(names["base"]), aligned.shape(names["aligned"])
        if base_shape != expected:
            raise SafeLoRAError(
                f"module {module}: base weight {names['base']} has shape {base_shape} but the adapter's update "
                f"ΔW = B·A is {fan_out}×{fan_in} (expects {expected}); shape mismatch between the base model "
                "and the adapter — is it the model this adapter was trained on?"
            )
        if aligned_shape != base_shape:
            raise SafeLoRAError(
                f"module {module}: base and aligned models differ in the shape of {names['base']}: "
                f"{base_shape} vs {aligned_shape}; they must have the same architecture "
                "(e.g. Qwen2.5-7B and Qwen2.5-7B-Instruct)"
            )
        w_base = base.get(names["base"])
        w_aligned = aligned.get(names["aligned"])
        for role, w in (("base", w_base), ("aligned", w_aligned)):
            if not w.is_floating_point():
                raise SafeLoRAError(
                    f"module {module}: {role} weight {names[role]} has dtype {w.dtype} (quantized?); SafeLoRA "
                    "needs unquantized base and aligned checkpoints"
                )
        cosine, proj_b, v_norm, delta_norm = project_module(
            w_base, w_aligned, lora_a, lora_b, fan_in_fan_out=fan_in_fan_out
        )
        del w_base, w_aligned
        scaling = _scaling(adapter.config, module, rank)
        if v_norm == 0.0:
            LOG.warning("safelora: %s is identical in base and aligned (V = 0); projecting it removes its update",
                        module)
        cosines[module_key] = cosine
        projected_b[module_key] = proj_b
        rows.append({
            "name": module,
            "weight": names["base"],
            "cosine": cosine,
            "projected": False,
            "rank": int(rank),
            "scaling": scaling,
            "delta_norm": delta_norm * scaling,
            "alignment_norm": v_norm,
        })

    if all(row["alignment_norm"] == 0.0 for row in rows):
        raise SafeLoRAError(
            "base and aligned models are identical in every adapted module (V = 0 everywhere); pass the "
            "unaligned base model and its aligned/instruct counterpart"
        )
    if settings.select == "top_k" and settings.top_k > len(rows):
        LOG.warning("safelora: top_k=%d exceeds the %d adapted modules; projecting all of them",
                    settings.top_k, len(rows))
    selected = select_modules(cosines, settings)
    if not selected:
        LOG.warning("safelora: no module selected (%s); the output adapter equals the input", settings.as_dict())

    out_tensors: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.tensors.items():
        out_tensors[key] = tensor.contiguous()
    by_name = {row["name"]: row for row in rows}
    for module_key in selected:
        b_key = adapter.modules[module_key][1]
        out_tensors[b_key] = projected_b[module_key].to(adapter.tensors[b_key].dtype).contiguous()
        by_name[_module_path(module_key)]["projected"] = True

    out.mkdir(parents=True, exist_ok=True)
    if report_path.exists():
        report_path.unlink()  # an interrupted rewrite must not look complete
    from safetensors.torch import save_file

    tmp_weights = out / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(out_tensors, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, out / ADAPTER_WEIGHTS)
    _atomic_write_bytes(out / ADAPTER_CONFIG, adapter.config_bytes)
    stale_bin = out / ADAPTER_WEIGHTS_BIN
    if stale_bin.exists():
        stale_bin.unlink()
    for src in adapter.dir.iterdir():
        if src.is_file() and _AUX_FILES.match(src.name):
            shutil.copyfile(src, out / src.name)

    report = {
        "version": REPORT_VERSION,
        "method": "SafeLoRA: B <- V (V^T B) / ||V||_F for modules selected by cos(C dW, dW), C = V V^T / ||V||_F",
        "adapter": str(adapter.dir),
        "adapter_sha256": adapter_sha,
        "base_model": str(base_model),
        "aligned_model": str(aligned_model),
        "base_model_dir": str(base.dir),
        "aligned_model_dir": str(aligned.dir),
        "settings": settings.as_dict(),
        "lora": {
            "r": adapter.config.get("r"),
            "lora_alpha": adapter.config.get("lora_alpha"),
            "use_rslora": bool(adapter.config.get("use_rslora")),
            "fan_in_fan_out": fan_in_fan_out,
        },
        "num_modules": len(rows),
        "num_projected": len(selected),
        "projected": sorted((_module_path(m) for m in selected), key=_natural_key),
        "modules": rows,
        "copied_unchanged": sorted(adapter.other_keys),
        "not_projected_embedding_lora": sorted(set(adapter.embedding_modules)),
        "output_sha256": _sha256(out / ADAPTER_WEIGHTS),
    }
    _atomic_write_bytes(report_path, (json.dumps(report, indent=2) + "\n").encode())
    LOG.info("safelora: projected %d/%d modules -> %s (report %s)", len(selected), len(rows), out, report_path)
    return SafeLoRAResult(out, report)


# ----------------------------------------------------------------------------------- Axolotl + CLI entry


def _get(block: Any, key: str) -> Any:
    if block is None:
        return None
    if isinstance(block, dict):
        return block.get(key)
    return getattr(block, key, None)


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    # Axolotl's second post_train call comes after cleanup_distributed(): fall back to the launcher's env
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


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
    if not _is_rank_zero():
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
    weights = _adapter_weights_path(adapter_dir)
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
