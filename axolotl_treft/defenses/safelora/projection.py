"""SafeLoRA's projection: the per-module math, the selection, and the driver that writes the new adapter."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .weights import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ADAPTER_WEIGHTS_BIN,
    AUX_FILES,
    LOG,
    REPORT_NAME,
    REPORT_VERSION,
    LazyWeights,
    LoadedAdapter,
    SafeLoRAError,
    check_same_architecture,
    load_adapter,
    lora_scaling,
    module_path,
    natural_key,
    resolve_model_dir,
    sha256_file,
)

_FLOAT64_MAX_NUMEL = 1 << 24  # V and the products in float64 up to this many elements, float32 above

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
    scored = [(c, natural_key(name), name) for name, c in cosines.items() if c is not None]
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
        and report.get("output_sha256") == sha256_file(out_weights)
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
    adapter = load_adapter(adapter_dir)
    if out.resolve() == adapter.dir.resolve():
        raise SafeLoRAError(f"output directory {out} is the adapter directory; choose another --out")
    adapter_sha = sha256_file(adapter.weights_path)
    report_path = out / REPORT_NAME
    if skip_if_done and report_path.is_file() and _same_run(
        report_path, adapter_sha, str(base_model), str(aligned_model), settings
    ):
        LOG.info("safelora: %s already holds the projection of this adapter; nothing to do", out)
        return SafeLoRAResult(out, json.loads(report_path.read_text()), skipped=True)

    base = LazyWeights(resolve_model_dir(base_model, "base"), "base")
    aligned = LazyWeights(resolve_model_dir(aligned_model, "aligned"), "aligned")
    check_same_architecture(base, aligned)
    LOG.info(
        "safelora: %d LoRA modules of %s; base %s, aligned %s; %s",
        len(adapter.modules), adapter.dir, base.dir, aligned.dir, settings.as_dict(),
    )
    rows, projected_b = _score_modules(adapter, base, aligned)
    if all(row["alignment_norm"] == 0.0 for row in rows.values()):
        raise SafeLoRAError(
            "base and aligned models are identical in every adapted module (V = 0 everywhere); pass the "
            "unaligned base model and its aligned/instruct counterpart"
        )
    if settings.select == "top_k" and settings.top_k > len(rows):
        LOG.warning("safelora: top_k=%d exceeds the %d adapted modules; projecting all of them",
                    settings.top_k, len(rows))
    selected = select_modules({key: row["cosine"] for key, row in rows.items()}, settings)
    if not selected:
        LOG.warning("safelora: no module selected (%s); the output adapter equals the input", settings.as_dict())
    for module_key in selected:
        rows[module_key]["projected"] = True
    _write_adapter(out, adapter, {key: projected_b[key] for key in selected})
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
            "fan_in_fan_out": bool(adapter.config.get("fan_in_fan_out")),
        },
        "num_modules": len(rows),
        "num_projected": len(selected),
        "projected": sorted((module_path(m) for m in selected), key=natural_key),
        "modules": list(rows.values()),
        "copied_unchanged": sorted(adapter.other_keys),
        "not_projected_embedding_lora": sorted(set(adapter.embedding_modules)),
        "output_sha256": sha256_file(out / ADAPTER_WEIGHTS),
    }
    _atomic_write_bytes(report_path, (json.dumps(report, indent=2) + "\n").encode())
    LOG.info("safelora: projected %d/%d modules -> %s (report %s)", len(selected), len(rows), out, report_path)
    return SafeLoRAResult(out, report)


def _weight_names(
    module: str, delta_shape: tuple[int, int], expected: tuple[int, int], base: LazyWeights, aligned: LazyWeights
) -> dict[str, str]:
    """The checkpoint names of ``module``'s weight in both models, checked against the adapter's update shape
    ``delta_shape`` (out × in; stored as ``expected``)."""
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
            f"ΔW = B·A is {delta_shape[0]}×{delta_shape[1]} (expects {expected}); shape mismatch between the base model "
            "and the adapter — is it the model this adapter was trained on?"
        )
    if aligned_shape != base_shape:
        raise SafeLoRAError(
            f"module {module}: base and aligned models differ in the shape of {names['base']}: "
            f"{base_shape} vs {aligned_shape}; they must have the same architecture "
            "(e.g. Qwen2.5-7B and Qwen2.5-7B-Instruct)"
        )
    return names


def _score_modules(
    adapter: LoadedAdapter, base: LazyWeights, aligned: LazyWeights
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """A report row (cosine, norms, scaling) and the projected ``B`` of every adapted module, by module key."""
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    rows: dict[str, dict[str, Any]] = {}
    projected_b: dict[str, torch.Tensor] = {}
    for module_key in sorted(adapter.modules, key=natural_key):
        a_key, b_key = adapter.modules[module_key]
        module = module_path(module_key)
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
        names = _weight_names(module, (fan_out, fan_in), expected, base, aligned)
        w_base, w_aligned = base.get(names["base"]), aligned.get(names["aligned"])
        for role, w in (("base", w_base), ("aligned", w_aligned)):
            if not w.is_floating_point():
                raise SafeLoRAError(
                    f"module {module}: {role} weight {names[role]} has dtype {w.dtype} (quantized?); SafeLoRA "
                    "needs unquantized base and aligned checkpoints"
                )
        cosine, projected_b[module_key], v_norm, delta_norm = project_module(
            w_base, w_aligned, lora_a, lora_b, fan_in_fan_out=fan_in_fan_out
        )
        del w_base, w_aligned
        scaling = lora_scaling(adapter.config, module, rank)
        if v_norm == 0.0:
            LOG.warning("safelora: %s is identical in base and aligned (V = 0); projecting it removes its update",
                        module)
        rows[module_key] = {
            "name": module, "weight": names["base"], "cosine": cosine, "projected": False, "rank": int(rank),
            "scaling": scaling, "delta_norm": delta_norm * scaling, "alignment_norm": v_norm,
        }
    return rows, projected_b


def _write_adapter(out: Path, adapter: LoadedAdapter, projected_b: dict[str, torch.Tensor]) -> None:
    """The adapter with the selected modules' ``B`` replaced, its config and tokenizer files, into ``out``.

    The report is removed first and written last by the caller, so an interrupted rewrite never looks complete.
    """
    from safetensors.torch import save_file

    out_tensors = {key: tensor.contiguous() for key, tensor in adapter.tensors.items()}
    for module_key, b in projected_b.items():
        b_key = adapter.modules[module_key][1]
        out_tensors[b_key] = b.to(adapter.tensors[b_key].dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_NAME).unlink(missing_ok=True)
    tmp_weights = out / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(out_tensors, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, out / ADAPTER_WEIGHTS)
    _atomic_write_bytes(out / ADAPTER_CONFIG, adapter.config_bytes)
    (out / ADAPTER_WEIGHTS_BIN).unlink(missing_ok=True)
    for src in adapter.dir.iterdir():
        if src.is_file() and AUX_FILES.match(src.name):
            shutil.copyfile(src, out / src.name)


