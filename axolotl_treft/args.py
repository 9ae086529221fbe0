"""The ``treft:`` YAML block, merged into Axolotl's config schema by ``TReFTPlugin.get_input_args``.

Every block is optional; any combination may be enabled. Unknown keys are rejected (Axolotl itself
silently drops undeclared keys, which would hide typos), and every error names the offending key.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .config_checks import check_against_axolotl_cfg, check_betas, check_steering_layer
from .defenses.config import (
    Block,
    InoculationConfig,
    RetainConfig,
    SafeLoRAConfig,
    SteeringConfig,
)
from .spans import SEG_PREFIX, TOKEN_MODES

TokenMode = Literal["prefix", "postfix", "prefix_postfix", "query", "all"]




class KVConfig(Block):
    """TReFT: keep the attention K/V of the chosen template tokens close to the initial model's.

    One K/V term; ``treft.kv`` takes one mapping or a list of them (several terms, each with its own tokens,
    weight, layers, reference, threshold and window).
    """

    weight: float = Field(ge=0, allow_inf_nan=False, description="λ; 0 logs the drift without regularizing")
    tokens: TokenMode = Field("prefix", description="which tokens are regularized")
    layers: Literal["all"] | list[StrictInt] = Field("all", description='"all" or a list of layer indices')
    max_cached_prefixes: int = Field(
        256, ge=0, description="prefix mode: distinct prefixes whose reference K/V are cached; beyond this "
        "a reference forward runs every step",
    )
    reference: Literal["exact", "fixed"] = Field(
        "exact", description="exact: the initial model on each example; fixed: one postfix reference computed "
        "once (postfix modes), no reference forward during training",
    )
    fixed_from: Literal["empty_query", "first_example"] | None = Field(
        None, description="reference: fixed: the template rendered with an empty user query (default), or the "
        "first training example",
    )
    threshold: float = Field(0.0, ge=0, allow_inf_nan=False,
                             description="hinge: the loss adds max(weight · L_KV − threshold, 0)")
    active_steps: float | tuple[StrictInt, StrictInt] | None = Field(
        None, description="a fraction f (active while step < f · max_steps) or a "
        "[start, end) window of optimizer steps; default: every step",
    )

    @model_validator(mode="after")
    def _check_layers(self) -> KVConfig:
        if isinstance(self.layers, list):
            if not self.layers:
                raise ValueError("treft.kv.layers: empty list; use `all` or list layer indices")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"treft.kv.layers: duplicate layer indices in {self.layers}")
        return self

    @model_validator(mode="after")
    def _check_reference(self) -> KVConfig:
        if self.reference == "fixed" and self.tokens not in FIXED_REFERENCE_MODES:
            raise ValueError(
                f"treft.kv.reference: `fixed` needs a reference that is the same for every example, which "
                f"`tokens: {self.tokens}` does not have (its K/V depend on the query); use it with "
                f"{' / '.join(FIXED_REFERENCE_MODES)}, or `reference: exact`"
            )
        if self.fixed_from is not None and (self.reference != "fixed" or self.tokens == "prefix"):
            raise ValueError(
                "treft.kv.fixed_from: only applies to the fixed postfix reference (`reference: fixed` with "
                f"postfix tokens); remove it or set `reference: fixed` (got reference: {self.reference}, "
                f"tokens: {self.tokens})"
            )
        return self

    @model_validator(mode="after")
    def _check_active_steps(self) -> KVConfig:
        window = self.active_steps
        if isinstance(window, float) and not 0.0 < window <= 1.0:
            raise ValueError(f"treft.kv.active_steps: the fraction {window} is outside (0, 1]; give the share of "
                             "training (e.g. 0.5 = first half) or a [start, end) step window")
        if isinstance(window, tuple) and not 0 <= window[0] < window[1]:
            raise ValueError(f"treft.kv.active_steps: [{window[0]}, {window[1]}) is an empty or negative step "
                             "window; need 0 <= start < end")
        return self

    @property
    def fixed_source(self) -> str | None:
        """Where the fixed postfix reference comes from (None: no fixed postfix reference)."""
        if self.reference != "fixed" or self.tokens == "prefix":
            return None
        return self.fixed_from or "empty_query"

    def is_active(self, step: int, max_steps: int) -> bool:
        """Whether the term enters the loss at optimizer step ``step`` (0-based) of ``max_steps``."""
        window = self.active_steps
        if window is None:
            return True
        if isinstance(window, tuple):
            return window[0] <= step < window[1]
        return step < window * max_steps


FIXED_REFERENCE_MODES = ("postfix", "prefix_postfix", "prefix")


class KLConfig(Block):
    """λ · KL(p_ref ‖ p_θ) per token over the full vocabulary, averaged over the selected tokens."""

    weight: float = Field(ge=0, allow_inf_nan=False)
    on: Literal["train", "retain"] = "train"
    tokens: Literal["all", "response"] = "all"
    batch_size: int | None = Field(
        None, ge=1, description="on: retain: retain rows per step (default: micro_batch_size)",
    )


class FeatureL2Config(Block):
    """LDIFS: squared L2 between per-layer unit-normalized hidden states of the trained and initial model."""

    weight: float = Field(ge=0, allow_inf_nan=False)
    layers: StrictInt | list[StrictInt] = Field(5, description="N evenly spaced decoder layers, or explicit indices")

    @model_validator(mode="after")
    def _check_layers(self) -> FeatureL2Config:
        if isinstance(self.layers, int) and self.layers < 1:
            raise ValueError("treft.feature_l2.layers: must be >= 1")
        if isinstance(self.layers, list) and not self.layers:
            raise ValueError("treft.feature_l2.layers: empty list")
        return self


class ConstrainedSFTConfig(Block):
    """Qi et al. 2025 Eq. 3: SFT on each response token replaced by −(2/β_t)·log σ(β_t·log(π_θ/π_aligned))."""

    betas: list[float] = Field([0.5, 2.0, 2.0, 2.0, 2.0], description="β_t of response tokens t = 1..len of each turn")
    beta_rest: float = Field(0.1, description="β_t of every later response token")

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        return check_betas(data)  # finite and > 0; errors name treft.constrained_sft.betas[i] / beta_rest


class EvalConfig(Block):
    """``treft.eval``: lm-eval tasks on the final model (after SafeLoRA where configured), results under
    ``OUTPUT_DIR/eval/``."""

    tasks: list[str] = Field(min_length=1, description="task-pack tasks/groups, or your own with include_path")
    limit: int | None = Field(None, ge=1, description="documents per task (the first N); default: all")
    max_gen_toks: int | None = Field(None, ge=1, description="new tokens per answer; default: the task's")
    batch_size: int = Field(8, ge=1, description="generation batch size")
    include_path: list[str] = Field(default_factory=list, description="directories of your own task YAMLs")
    metadata: dict[str, Any] = Field(default_factory=dict, description="as lm_eval --metadata (e.g. the judge)")
    bootstrap_iters: int = Field(100000, ge=0, description="lm-eval's stderr bootstrap (eval only; 0 = none)")

    _key = "treft.eval"

    @model_validator(mode="after")
    def _check_tasks(self):
        from .monitor import check_block

        check_block(self.model_dump(), self._key)
        return self


class MonitorConfig(EvalConfig):
    """``treft.monitor``: the tasks on the live model every ``every`` steps (and at step 0 unless ``initial``
    is false, and at the last step)."""

    every: int = Field(gt=0, description="optimizer steps between evaluations")
    initial: bool = Field(True, description="evaluate the initial model at step 0 (a study evaluates it once, in "
                          "its first run, and shares it: every run of a study starts from the same model)")
    bootstrap_iters: Literal[0] = Field(0, description="no stderr bootstrap while monitoring")

    _key = "treft.monitor"


def _kv_term(value: Any, key: str) -> KVConfig:
    """One K/V term; errors name the key (``treft.kv.weight``, ``treft.kv[1].weight``)."""
    if isinstance(value, KVConfig):
        return value
    try:
        return KVConfig.model_validate(value)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            message = str(error["msg"]).removeprefix("Value error, ").replace("treft.kv.", f"treft.{key}.")
            where = ".".join(str(part) for part in error["loc"])
            problems.append(message if not where or message.startswith("treft.") else f"treft.{key}.{where}: {message}")
        raise ValueError("; ".join(problems)) from None


class TReFTConfig(Block):
    kv: KVConfig | list[KVConfig] | None = None
    kl: KLConfig | None = None
    feature_l2: FeatureL2Config | None = None
    constrained_sft: ConstrainedSFTConfig | None = None
    retain: RetainConfig | None = None
    safelora: SafeLoRAConfig | None = None
    inoculation: InoculationConfig | None = None
    steering: SteeringConfig | None = None
    monitor: MonitorConfig | None = None
    eval: EvalConfig | None = None

    @model_validator(mode="after")
    def _check_inoculation(self) -> TReFTConfig:
        keys = ["treft.kv"] if isinstance(self.kv, KVConfig) else [f"treft.kv[{i}]" for i in range(len(self.kv or []))]
        clash = [(key, kv.tokens) for key, kv in zip(keys, self.kv_terms(), strict=True)
                 if SEG_PREFIX in TOKEN_MODES[kv.tokens]]
        if self.inoculation is not None and clash:
            raise ValueError(
                f"treft.inoculation: cannot be combined with {clash[0][0]}.tokens: {clash[0][1]}. TReFT's prefix "
                "keeps the K/V of the prefix every evaluation prompt starts with; under inoculation the training "
                "prefix holds the inoculation prompt, which evaluation never sees, so the term would hold the wrong "
                "tokens and leave the evaluation prefix free. Use `tokens: postfix` or `query` (regularized in the "
                "inoculated context), or drop one of the two blocks"
            )
        return self

    @field_validator("kv", mode="before")
    @classmethod
    def _kv_terms(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("treft.kv: empty list; give one mapping or a list of K/V terms")
            return [_kv_term(term, f"kv[{i}]") for i, term in enumerate(value)]
        return value if value is None else _kv_term(value, "kv")

    @model_validator(mode="after")
    def _check(self) -> TReFTConfig:
        if self.kl is not None and self.kl.on == "retain" and self.retain is None:
            raise ValueError("treft.kl.on: `retain` needs a `treft.retain:` block with datasets")
        return self

    def kv_terms(self) -> list[KVConfig]:
        """The K/V terms, whichever form ``treft.kv`` was given in."""
        if self.kv is None:
            return []
        return list(self.kv) if isinstance(self.kv, list) else [self.kv]


def plain_data(value: Any) -> Any:
    """DictDefault → plain dicts/lists without None values, so pydantic sees ordinary data."""
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    return value


def treft_settings(cfg: Mapping[str, Any] | None) -> TReFTConfig | None:
    """The ``treft:`` block of a validated Axolotl config as typed settings (None without one).

    Axolotl keeps its config as an untyped ``DictDefault`` after validation, where a misspelled key reads as None.
    The plugin resolves the settings once, at its first hook after validation, and passes them on; code that
    Axolotl calls with the config alone (a dataset strategy) resolves them here."""
    block = cfg.get("treft") if cfg else None
    if not block:
        return None
    return block if isinstance(block, TReFTConfig) else TReFTConfig.model_validate(plain_data(block))


def kv_terms(treft: Any) -> list[KVConfig]:
    """The K/V terms of a ``treft:`` block (validated model, or Axolotl's DictDefault/plain mapping)."""
    if not treft:
        return []
    if not isinstance(treft, TReFTConfig):
        kv = treft.get("kv")
        if not kv:
            return []
        treft = TReFTConfig(kv=plain_data(kv))
    return treft.kv_terms()


PLUGIN_NAME = "axolotl_treft.TReFTPlugin"


def raw_config_warnings(cfg: Mapping[str, Any]) -> list[str]:
    """Typos that would silently turn a TReFT run into plain SFT, from the raw (unvalidated) YAML dict."""
    found = []
    plugins = [str(p) for p in cfg.get("plugins") or []]
    listed = any(p.replace(":", ".") == PLUGIN_NAME for p in plugins)
    near = [k for k in cfg if isinstance(k, str) and k != "treft"
            and (k.lower() == "treft" or difflib.get_close_matches(k.lower(), ["treft"], cutoff=0.75))]
    for key in near:
        found.append(f"top-level key `{key}:` is not `treft:`; Axolotl drops unknown keys silently, so its settings "
                     f"do nothing: rename it to `treft:`")
    block = cfg.get("treft")
    if block and not listed:
        found.append(f"`treft:` is set but `{PLUGIN_NAME}` is not under `plugins:`; Axolotl drops the block and "
                     f"trains plain SFT: add `- {PLUGIN_NAME}` to `plugins:`")
    if listed and not block and not near:
        found.append(f"`{PLUGIN_NAME}` is listed but the config has no `treft:` block, so this run is plain SFT: add "
                     "one, e.g. `treft: {kv: {weight: 5.0, tokens: prefix}}`, or remove the plugin")
    return found


class TReFTArgs(BaseModel):
    """Mixed into Axolotl's config model: the ``treft:`` block plus cross-key checks."""

    treft: TReFTConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_defenses_against_axolotl_cfg(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("treft"), dict):
            check_steering_layer(data)
        return data

    @model_validator(mode="before")
    @classmethod
    def _check_monitor_against_axolotl_cfg(cls, data: Any) -> Any:
        treft = data.get("treft") if isinstance(data, dict) else None
        for key in ("monitor", "eval"):
            if isinstance(treft, dict) and treft.get(key):
                from .monitor import check_parallelism

                check_parallelism(data, f"treft.{key}")
        return data

    @model_validator(mode="before")
    @classmethod
    def _check_against_axolotl_cfg(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("treft"):
            return data
        treft = data["treft"]
        if not isinstance(treft, dict):
            return data
        return check_against_axolotl_cfg(data, treft)
