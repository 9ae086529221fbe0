"""Checks of the ``treft:`` block against the rest of the Axolotl config, before any model or dataset loads.

Called by :class:`axolotl_treft.args.TReFTArgs`' validators on the raw config dict; each error names the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .spans import TOKEN_MODES

REGULARIZER_KEYS = ("kv", "kl", "feature_l2", "constrained_sft")


def regularizers_on(treft: Any) -> list[str]:
    """The regularizer keys set in a ``treft:`` block (``constrained_sft: {}``, all defaults, counts)."""
    values = {key: treft.get(key) if isinstance(treft, Mapping) else getattr(treft, key, None) for key in REGULARIZER_KEYS}
    return [key for key, value in values.items() if value is not None and value is not False]


def check_betas(block: Any) -> Any:
    """``treft.constrained_sft``: every β finite and > 0, the error naming the key (``betas[2]``, ``beta_rest``)."""
    if not isinstance(block, dict):
        return block
    betas = block.get("betas", [])
    if not isinstance(betas, list):
        raise ValueError(f"treft.constrained_sft.betas: expected a list of β values, got {betas!r}")
    for key, beta in [*((f"betas[{i}]", b) for i, b in enumerate(betas)), ("beta_rest", block.get("beta_rest", 0.1))]:
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 < beta < float("inf"):
            raise ValueError(f"treft.constrained_sft.{key}: {beta!r} is not a finite number > 0")
    return block


def uses_trainer(treft: Any) -> bool:
    """Whether a ``treft:`` block (validated or raw) needs the TReFT trainer (a regularizer is on)."""
    return bool(treft and regularizers_on(treft))


def _num_layers(base_model: str | None, trust_remote_code: bool = False) -> int | None:
    """Layer count from the model's config: a local directory, or the Hugging Face cache (no download, no load).

    None when the config is not available offline; the layer indices are then checked against the loaded model
    when the trainer is configured, still before any training step.
    """
    if not base_model:
        return None
    cfg_path = Path(base_model) / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg = cfg.get("text_config", cfg)
        return cfg.get("num_hidden_layers")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base_model, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError):  # not in the local cache (or not a model id at all)
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)


def check_against_axolotl_cfg(data: dict, treft: dict) -> dict:
    """Every cross-key check; returns ``data`` (with non-reentrant checkpointing forced where needed)."""
    kl_block = treft.get("kl")
    if isinstance(kl_block, dict) and True in kl_block:  # YAML 1.1 reads a bare `on:` key as True
        kl_block["on"] = kl_block.pop(True)
    _check_trainer_features(data, treft)
    _check_layer_indices(data, treft)
    _check_kv_duplicates(treft)
    return _checkpointing(data, treft)


def _check_trainer_features(data: dict, treft: dict) -> None:
    """Axolotl features that cannot run with the regularizers (RL trainers, FSDP, fused kernels ...)."""
    regularized = regularizers_on(treft)
    if data.get("rl") and (regularized or treft.get("retain")):
        raise ValueError(
            f"rl: `rl: {data.get('rl')}` uses Axolotl's preference/RL trainers, and treft."
            f"{'/'.join(regularized or ['retain'])} run on the SFT trainer only: remove `rl:` to finetune with "
            "SFT, or drop those treft blocks (treft.safelora works with any trainer)"
        )
    fsdp_keys = [k for k in ("fsdp", "fsdp_config", "fsdp_version") if data.get(k)]
    if fsdp_keys and regularized:
        raise ValueError(
            f"{fsdp_keys[0]}: FSDP is not supported with treft.{'/'.join(regularized)} (the frozen reference and "
            "the activation hooks need the unsharded modules); use DeepSpeed instead (`deepspeed:` with "
            "`axolotl-treft path example deepspeed/zero2` or zero3, see docs/multigpu.md)"
        )
    if data.get("activation_offloading") == "legacy" and (treft.get("kv") or treft.get("feature_l2")):
        raise ValueError(
            "activation_offloading: `legacy` runs the decoder layers under no_grad, so the K/V and feature "
            "activations treft.kv / treft.feature_l2 regularize carry no gradient; use "
            "`activation_offloading: true` (or `hidden_states`, or false)"
        )
    if data.get("balance_labels") and regularized:
        raise ValueError(
            "balance_labels: Axolotl's label-balanced batching only accepts its own collator, and treft.kv / "
            "treft.kl / treft.feature_l2 wrap the collator to carry template segments; set "
            "`balance_labels: false` (or drop those treft blocks)"
        )
    if treft.get("kv") and data.get("lora_qkv_kernel"):
        raise ValueError(
            "treft.kv: `lora_qkv_kernel: true` fuses q/k/v and bypasses the k_proj/v_proj modules TReFT hooks; "
            "set `lora_qkv_kernel: false`"
        )
    logit_terms = [k for k in ("kl", "constrained_sft") if k in regularized]
    if logit_terms and (data.get("liger_fused_linear_cross_entropy") or data.get("cut_cross_entropy")):
        raise ValueError(
            f"treft.{logit_terms[0]}: needs the model's logits, which `liger_fused_linear_cross_entropy` / "
            "`cut_cross_entropy` do not materialize; disable those flags"
        )
    if treft.get("safelora") and data.get("adapter") not in ("lora", "qlora"):
        raise ValueError("treft.safelora: projects a LoRA update; it needs `adapter: lora` (got a full finetune)")


def _check_layer_indices(data: dict, treft: dict) -> None:
    """``layers:`` of every K/V term and of feature_l2 against the model's layer count; K/V token modes."""
    blocks = {"feature_l2": treft.get("feature_l2")}
    kv = treft.get("kv")
    kv_blocks = {f"kv[{i}]": b for i, b in enumerate(kv)} if isinstance(kv, list) else {"kv": kv}
    blocks.update(kv_blocks)
    layer_lists = {key: block.get("layers") for key, block in blocks.items()
                   if isinstance(block, dict) and isinstance(block.get("layers"), list)}
    n_layers = _num_layers(data.get("base_model_config") or data.get("base_model"),
                           bool(data.get("trust_remote_code"))) if layer_lists else None
    for key, layers in layer_lists.items():
        ints = [i for i in layers if isinstance(i, int) and not isinstance(i, bool)]
        if len(ints) != len(layers):  # the type error comes from the field itself, naming the key
            continue
        bad = [i for i in ints if n_layers is not None and not -n_layers <= i < n_layers]
        if bad:
            raise ValueError(f"treft.{key}.layers: index {bad[0]} out of range for a model with {n_layers} "
                             f"layers (valid: {-n_layers}..{n_layers - 1})")
        check_no_duplicate_layers(f"treft.{key}.layers", ints, n_layers)
    feature = treft.get("feature_l2")
    count = feature.get("layers") if isinstance(feature, dict) else None  # the default (5) is capped instead
    if isinstance(count, int) and not isinstance(count, bool) and count > 1:
        n_layers = n_layers if layer_lists else _num_layers(
            data.get("base_model_config") or data.get("base_model"), bool(data.get("trust_remote_code")))
        check_layer_count(count, n_layers)
    for key, block in kv_blocks.items():
        if isinstance(block, dict) and block.get("tokens") not in (None, *TOKEN_MODES):
            raise ValueError(f"treft.{key}.tokens: unknown mode {block.get('tokens')!r}; choose one of "
                             f"{list(TOKEN_MODES)}")


def check_no_duplicate_layers(key: str, layers: list[int], n_layers: int | None) -> None:
    """The same layer twice (also as a negative and a positive index) would count its term twice."""
    positions = [i + n_layers if i < 0 and n_layers is not None else i for i in layers]
    for i, pos in enumerate(positions):
        if pos in positions[:i]:
            first = layers[positions.index(pos)]
            same = "" if first == layers[i] else f" (= {first} in a model with {n_layers} layers)"
            raise ValueError(f"{key}: duplicate layer {layers[i]}{same}, listed twice in {layers}; each layer "
                             "would count twice. List each layer once")


def check_layer_count(count: int, n_layers: int | None) -> None:
    """``feature_l2.layers: N`` (N evenly spaced layers) must not ask for more layers than the model has."""
    if n_layers is not None and count > n_layers:
        raise ValueError(f"treft.feature_l2.layers: {count} layers asked, but the model has {n_layers}; give at most "
                         f"{n_layers} (or a list of layer indices)")


def _check_kv_duplicates(treft: dict) -> None:
    """Two ``treft.kv`` terms on the same tokens, reference, layers and steps add up: one term counted twice."""
    kv = treft.get("kv")
    if not isinstance(kv, list):
        return
    terms = [t for t in kv if isinstance(t, dict)]
    for j, term in enumerate(terms):
        for i, earlier in enumerate(terms[:j]):
            if _same_term(earlier, term):
                raise ValueError(
                    f"treft.kv[{j}].tokens: `{term.get('tokens', 'prefix')}` again, as treft.kv[{i}], with the same "
                    "reference on overlapping layers and steps, so those layers count twice (the weights add up). "
                    "Merge the two into one term (one weight), or give them disjoint `layers:` or `active_steps:`")


def _same_term(a: dict, b: dict) -> bool:
    if a.get("tokens", "prefix") != b.get("tokens", "prefix"):
        return False
    if (a.get("reference", "exact"), a.get("fixed_from")) != (b.get("reference", "exact"), b.get("fixed_from")):
        return False
    la, lb = a.get("layers", "all"), b.get("layers", "all")
    if isinstance(la, list) and isinstance(lb, list) and not set(map(str, la)) & set(map(str, lb)):
        return False
    windows = [w for w in (a.get("active_steps"), b.get("active_steps")) if w is not None]
    steps = [w for w in windows if isinstance(w, list | tuple) and len(w) == 2
             and all(isinstance(x, int | float) for x in w)]
    if len(steps) == 2:
        return max(steps[0][0], steps[1][0]) < min(steps[0][1], steps[1][1])
    return len(steps) == 0 or steps[0][0] == 0  # a step window against a fraction of training: overlap from step 0


def _checkpointing(data: dict, treft: dict) -> dict:
    """Hooked K/V and layer outputs only carry gradient under non-reentrant checkpointing: force it."""
    if (treft.get("kv") or treft.get("feature_l2")) and data.get("gradient_checkpointing"):
        gc_kwargs = dict(data.get("gradient_checkpointing_kwargs") or {})
        if gc_kwargs.get("use_reentrant") is True:
            raise ValueError(
                "gradient_checkpointing_kwargs.use_reentrant: must be false with treft.kv / "
                "treft.feature_l2 (reentrant checkpointing hides the activations they regularize)"
            )
        gc_kwargs["use_reentrant"] = False
        data = {**data, "gradient_checkpointing_kwargs": gc_kwargs}
    return data


def check_steering_layer(data: dict) -> None:
    """``treft.steering.layer`` against the model's layer count (local models; before any model loads)."""
    steering = (data.get("treft") or {}).get("steering")
    layer = steering.get("layer") if isinstance(steering, dict) else None
    n_layers = _num_layers(data.get("base_model"))
    if n_layers is not None and isinstance(layer, int) and not -n_layers <= layer < n_layers:
        raise ValueError(f"treft.steering.layer: {layer} out of range for a model with {n_layers} layers")
