"""The ``treft:`` YAML block, merged into Axolotl's config schema by ``TReFTPlugin.get_input_args``.

Every block is optional; any combination may be enabled. Unknown keys are rejected (Axolotl itself
silently drops undeclared keys, which would hide typos), and every error names the offending key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .spans import SEG_PREFIX, TOKEN_MODES
from .steering import DEFAULT_NEGATIVE, DEFAULT_POSITIVE

TokenMode = Literal["prefix", "postfix", "prefix_postfix", "query", "all"]


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KVConfig(_Block):
    """TReFT: keep the attention K/V of the chosen template tokens close to the initial model's."""

    weight: float = Field(ge=0, description="λ; 0 logs the drift without regularizing")
    tokens: TokenMode = Field("prefix", description="which tokens are regularized")
    layers: Literal["all"] | list[int] = Field("all", description='"all" or a list of layer indices')
    max_cached_prefixes: int = Field(
        256, ge=0, description="prefix mode: distinct prefixes whose reference K/V are cached; beyond this "
        "a reference forward runs every step",
    )

    @model_validator(mode="after")
    def _check_layers(self) -> KVConfig:
        if isinstance(self.layers, list):
            if not self.layers:
                raise ValueError("treft.kv.layers: empty list; use `all` or list layer indices")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"treft.kv.layers: duplicate layer indices in {self.layers}")
        return self


class KLConfig(_Block):
    """λ · KL(p_ref ‖ p_θ) per token over the full vocabulary, averaged over the selected tokens."""

    weight: float = Field(ge=0)
    on: Literal["train", "retain"] = "train"
    tokens: Literal["all", "response"] = "all"
    batch_size: int | None = Field(
        None, ge=1, description="on: retain: retain rows per step (default: micro_batch_size)",
    )


class FeatureL2Config(_Block):
    """LDIFS: squared L2 between per-layer unit-normalized hidden states of the trained and initial model."""

    weight: float = Field(ge=0)
    layers: int | list[int] = Field(5, description="N evenly spaced decoder layers, or explicit indices")

    @model_validator(mode="after")
    def _check_layers(self) -> FeatureL2Config:
        if isinstance(self.layers, int) and self.layers < 1:
            raise ValueError("treft.feature_l2.layers: must be >= 1")
        if isinstance(self.layers, list) and not self.layers:
            raise ValueError("treft.feature_l2.layers: empty list")
        return self


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~"))


class RetainSelectConfig(_Block):
    """Perplexity-gap retain selection ("Interleaving+"; ``drop_refusals`` makes it "Interleaving++")."""

    narrow_model: str | None = Field(None, description="a model trained on the narrow task (path or hub id)")
    narrow_adapter: str | None = Field(None, description="or a PEFT adapter of `base_model` trained on it")
    top: float = Field(gt=0, le=1, description="share of the scored pool to keep, highest gap first")
    drop_refusals: bool = Field(False, description="drop rows whose answer opens with a refusal word")
    epsilon: float = Field(1e-3, gt=0, description="ε in (L_narrow − L_aligned) / (L_aligned + ε)")

    @model_validator(mode="after")
    def _check(self) -> RetainSelectConfig:
        if (self.narrow_model is None) == (self.narrow_adapter is None):
            raise ValueError("treft.retain.select: give exactly one of `narrow_model` and `narrow_adapter`")
        for key in ("narrow_model", "narrow_adapter"):
            value = getattr(self, key)
            if value and _looks_local(value) and not Path(value).expanduser().exists():
                raise ValueError(f"treft.retain.select.{key}: {value} does not exist")
        return self


class RetainConfig(_Block):
    """Aligned examples from other domains: data interleaving and/or KL-on-retain."""

    datasets: list[dict[str, Any]] = Field(description="Axolotl dataset specs, as under `datasets:`")
    mix_ratio: float = Field(0.0, description="fraction of the final training mix that is retain data")
    seed: int | None = Field(None, description="sampling seed (default: the config's `seed`, else 42)")
    select: RetainSelectConfig | None = Field(
        None, description="Interleaving+: keep the pool rows a narrow model finds most unlikely (perplexity gap)",
    )

    @model_validator(mode="after")
    def _check(self) -> RetainConfig:
        if not self.datasets:
            raise ValueError("treft.retain.datasets: empty; list at least one Axolotl dataset spec")
        if not 0.0 <= self.mix_ratio < 1.0:
            raise ValueError(f"treft.retain.mix_ratio: {self.mix_ratio} is outside [0, 1)")
        for i, ds in enumerate(self.datasets):
            if "path" not in ds:
                raise ValueError(f"treft.retain.datasets[{i}]: missing `path`")
            path = Path(str(ds["path"]))
            looks_local = path.suffix in {".json", ".jsonl", ".parquet", ".csv", ".arrow"} or str(ds["path"]).startswith(
                (".", "/")
            )
            if looks_local and not path.exists():
                raise ValueError(f"treft.retain.datasets[{i}].path: {path} does not exist")
            if looks_local and path.is_file() and path.stat().st_size == 0:
                raise ValueError(f"treft.retain.datasets[{i}].path: {path} is empty")
        return self

    @model_validator(mode="after")
    def _check_select(self) -> RetainConfig:
        if self.select is not None:
            from .retain_select import check_pool_specs

            check_pool_specs(self.datasets, key="treft.retain.datasets")
        return self


class InoculationConfig(_Block):
    """Inoculation prompting: every training conversation gets this system prompt (training data only)."""

    system_prompt: str = Field(description="the inoculation system prompt")
    mode: Literal["replace", "prepend"] = Field(
        "replace", description="replace the conversation's (or the template's default) system prompt, or go before it",
    )

    @model_validator(mode="after")
    def _check(self) -> InoculationConfig:
        if not self.system_prompt.strip():
            raise ValueError("treft.inoculation.system_prompt: empty; give the prompt to train with")
        return self


class SteeringConfig(_Block):
    """Persona-vector preventive steering: add α·e to one decoder layer's output while training."""

    layer: int = Field(description="decoder layer whose output is steered (negative = from the end)")
    alpha: float = Field(5.0, gt=0, description="α; the direction e is the raw mean difference")
    positive: str = Field(DEFAULT_POSITIVE, description="system prompt that elicits the trait")
    negative: str = Field(DEFAULT_NEGATIVE, description="system prompt that elicits its opposite")
    questions: str | None = Field(None, description="question file (JSONL with `question`, or text, one a line); "
                                  "default: the shipped steering_questions.jsonl")

    @model_validator(mode="after")
    def _check(self) -> SteeringConfig:
        for key in ("positive", "negative"):
            if not getattr(self, key).strip():
                raise ValueError(f"treft.steering.{key}: empty system prompt")
        if self.positive.strip() == self.negative.strip():
            raise ValueError("treft.steering.negative: identical to `positive`; the direction would be zero")
        if self.questions is not None:
            from .steering import load_questions

            load_questions(self.questions, key="treft.steering.questions")
        return self


class SafeLoRAConfig(_Block):
    """Post-training projection of the LoRA update onto the alignment subspace (SafeLoRA)."""

    base_model: str = Field(description="the unaligned base model")
    aligned_model: str = Field(description="the aligned (instruct) model")
    select: Literal["top_k", "threshold"] = "top_k"
    top_k: int = Field(10, ge=1)
    threshold: float = Field(0.5, ge=-1.0, le=1.0)
    output_dir: str | None = Field(None, description="default: <output_dir>/safelora")


class TReFTConfig(_Block):
    kv: KVConfig | None = None
    kl: KLConfig | None = None
    feature_l2: FeatureL2Config | None = None
    retain: RetainConfig | None = None
    safelora: SafeLoRAConfig | None = None
    inoculation: InoculationConfig | None = None
    steering: SteeringConfig | None = None

    @model_validator(mode="after")
    def _check_inoculation(self) -> TReFTConfig:
        if self.inoculation is not None and self.kv is not None and SEG_PREFIX in TOKEN_MODES[self.kv.tokens]:
            raise ValueError(
                f"treft.inoculation: cannot be combined with treft.kv.tokens: {self.kv.tokens}. TReFT's prefix "
                "keeps the K/V of the prefix every evaluation prompt starts with; under inoculation the training "
                "prefix holds the inoculation prompt, which evaluation never sees, so the term would hold the wrong "
                "tokens and leave the evaluation prefix free. Use `tokens: postfix` or `query` (regularized in the "
                "inoculated context), or drop one of the two blocks"
            )
        return self

    @model_validator(mode="after")
    def _check(self) -> TReFTConfig:
        if self.kl is not None and self.kl.on == "retain" and self.retain is None:
            raise ValueError("treft.kl.on: `retain` needs a `treft.retain:` block with datasets")
        return self


def _num_layers(base_model: str | None) -> int | None:
    """Layer count from a local model's config.json (no download, no model load)."""
    if not base_model:
        return None
    cfg_path = Path(base_model) / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text())
    cfg = cfg.get("text_config", cfg)
    return cfg.get("num_hidden_layers")


class TReFTArgs(BaseModel):
    """Mixed into Axolotl's config model: the ``treft:`` block plus cross-key checks."""

    treft: TReFTConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_defenses_against_axolotl_cfg(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("treft"), dict):
            _check_steering_layer(data)
        return data

    @model_validator(mode="before")
    @classmethod
    def _check_against_axolotl_cfg(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("treft"):
            return data
        treft = data["treft"]
        if not isinstance(treft, dict):
            return data
        kl_block = treft.get("kl")
        if isinstance(kl_block, dict) and True in kl_block:  # YAML 1.1 reads a bare `on:` key as True
            kl_block["on"] = kl_block.pop(True)
        if data.get("balance_labels") and any(treft.get(k) for k in ("kv", "kl", "feature_l2")):
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
        n_layers = _num_layers(data.get("base_model"))
        for key in ("kv", "feature_l2"):
            block = treft.get(key) or {}
            layers = block.get("layers") if isinstance(block, dict) else None
            if n_layers is not None and isinstance(layers, list):
                bad = [i for i in layers if not isinstance(i, int) or not -n_layers <= i < n_layers]
                if bad:
                    raise ValueError(
                        f"treft.{key}.layers: index {bad[0]} out of range for a model with {n_layers} layers"
                    )
        kv = treft.get("kv")
        if isinstance(kv, dict) and kv.get("tokens") not in (None, *TOKEN_MODES):
            raise ValueError(f"treft.kv.tokens: unknown mode {kv.get('tokens')!r}; choose one of {list(TOKEN_MODES)}")
        if treft.get("kl") and (data.get("liger_fused_linear_cross_entropy") or data.get("cut_cross_entropy")):
            raise ValueError(
                "treft.kl: needs the model's logits, which `liger_fused_linear_cross_entropy` / "
                "`cut_cross_entropy` do not materialize; disable those flags"
            )
        if (treft.get("kv") or treft.get("feature_l2")) and data.get("gradient_checkpointing"):
            # Hooked K/V and layer outputs only carry gradient under non-reentrant checkpointing.
            gc_kwargs = dict(data.get("gradient_checkpointing_kwargs") or {})
            if gc_kwargs.get("use_reentrant") is True:
                raise ValueError(
                    "gradient_checkpointing_kwargs.use_reentrant: must be false with treft.kv / "
                    "treft.feature_l2 (reentrant checkpointing hides the activations they regularize)"
                )
            gc_kwargs["use_reentrant"] = False
            data = {**data, "gradient_checkpointing_kwargs": gc_kwargs}
        if treft.get("safelora") and data.get("adapter") not in ("lora", "qlora"):
            raise ValueError("treft.safelora: projects a LoRA update; it needs `adapter: lora` (got a full finetune)")
        return data


def _check_steering_layer(data: dict) -> None:
    """``treft.steering.layer`` against the model's layer count (local models; before any model loads)."""
    steering = (data.get("treft") or {}).get("steering")
    layer = steering.get("layer") if isinstance(steering, dict) else None
    n_layers = _num_layers(data.get("base_model"))
    if n_layers is not None and isinstance(layer, int) and not -n_layers <= layer < n_layers:
        raise ValueError(f"treft.steering.layer: {layer} out of range for a model with {n_layers} layers")
