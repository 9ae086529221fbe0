"""Settings of the defenses that are not a loss term (``treft.retain``, ``.inoculation``, ``.steering``,
``.safelora``), part of the ``treft:`` block of :mod:`axolotl_treft.args`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .steering import DEFAULT_NEGATIVE, DEFAULT_POSITIVE


class Block(BaseModel):
    """A ``treft:`` sub-block: unknown keys are refused (Axolotl would drop them silently)."""

    model_config = ConfigDict(extra="forbid")


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~"))


class RetainSelectConfig(Block):
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


class RetainConfig(Block):
    """Aligned examples from other domains: data interleaving and/or KL-on-retain."""

    datasets: list[dict[str, Any]] = Field(description="Axolotl dataset specs, as under `datasets:`")
    mix_ratio: float = Field(0.0, allow_inf_nan=False, description="fraction of the final training mix that is retain data")
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


class InoculationConfig(Block):
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


class SteeringConfig(Block):
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


class SafeLoRAConfig(Block):
    """Post-training projection of the LoRA update onto the alignment subspace (SafeLoRA)."""

    base_model: str = Field(description="the unaligned base model")
    aligned_model: str = Field(description="the aligned (instruct) model")
    select: Literal["top_k", "threshold"] = "top_k"
    top_k: int = Field(10, ge=1)
    threshold: float = Field(0.5, ge=-1.0, le=1.0, allow_inf_nan=False)
    output_dir: str | None = Field(None, description="default: <output_dir>/safelora")
