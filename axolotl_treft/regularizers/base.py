"""The small interface every regularizer implements, and the per-step batch view they share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..spans import PAD_SEGMENT

if TYPE_CHECKING:
    from ..capture import ActivationCapture
    from ..reference import Reference


@dataclass
class ReferenceRequest:
    """Which rows of the training batch the reference pass must run on, up to which length.

    ``logit_pairs`` ([N, 2] (row, position) pairs of the training batch) limits the logits to those
    positions: the reference's output head then runs on them only. ``None`` with ``logits`` = every position.
    """

    rows: torch.Tensor  # [B] bool
    length: int
    logits: bool = False
    logit_pairs: torch.Tensor | None = None

    def merge(self, other: ReferenceRequest) -> ReferenceRequest:
        wanted = [r for r in (self, other) if r.logits]
        pairs = None
        if wanted and all(r.logit_pairs is not None for r in wanted):
            pairs = torch.unique(torch.cat([r.logit_pairs for r in wanted]), dim=0)
        return ReferenceRequest(self.rows | other.rows, max(self.length, other.length), bool(wanted), pairs)


@dataclass
class SubBatch:
    """The rows/length actually run by the reference pass, and how to index into it."""

    rows: torch.Tensor  # [R] long, row indices into the training batch (sorted)
    length: int

    def flat_index(self, batch_rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Map (row, position) pairs of the training batch to flat indices of the sub-batch."""
        lookup = torch.full((int(self.rows.max()) + 1 if len(self.rows) else 1,), -1, dtype=torch.long,
                            device=self.rows.device)
        lookup[self.rows] = torch.arange(len(self.rows), device=self.rows.device)
        sub_rows = lookup[batch_rows]
        return sub_rows * self.length + positions


@dataclass
class ReferenceResult:
    """What the shared reference pass produced: logits (if requested) for the sub-batch rows."""

    sub: SubBatch
    logits: torch.Tensor | None  # [R, L, V], or [N, V] at the sorted flat sub-batch indices ``kept``
    kept: torch.Tensor | None = None

    def logits_at(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Reference logits at training-batch (row, position) pairs: [N, V]."""
        flat = self.sub.flat_index(rows, positions)
        if self.kept is None:
            return self.logits.reshape(-1, self.logits.shape[-1]).index_select(0, flat)
        kept = self.kept.to(flat.device)
        index = torch.searchsorted(kept, flat).clamp_max(len(kept) - 1)
        if not bool((kept[index] == flat).all()):
            raise RuntimeError("treft: reference logits were requested at positions the reference pass skipped")
        return self.logits.index_select(0, index.to(self.logits.device))


@dataclass
class StepBatch:
    """A training micro-batch as regularizers see it."""

    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor | None
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    segments: torch.Tensor | None  # [B, T] int8, -1 = padding
    valid: torch.Tensor  # [B, T] bool, real (non-padding) tokens
    sample_index: torch.Tensor  # [B, T] long, a distinct id per packed sample, -1 on padding
    n_samples: int

    @classmethod
    def from_inputs(cls, inputs: dict, segments: torch.Tensor | None) -> StepBatch:
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        position_ids = inputs.get("position_ids")
        if segments is not None:
            segments = segments.to(input_ids.device)
            valid = segments != PAD_SEGMENT
        elif attention_mask is not None:
            valid = attention_mask != 0
        else:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        bsz, width = input_ids.shape
        if position_ids is not None and position_ids.shape == input_ids.shape:
            starts = position_ids == 0
            starts[:, 0] = True
        else:
            starts = torch.zeros_like(input_ids, dtype=torch.bool)
            starts[:, 0] = True
        starts &= valid  # padding may restart position_ids; it is not a sample
        local = torch.cumsum(starts.long(), dim=1) - 1  # sample number within the row
        per_row = torch.where(valid, local, torch.full_like(local, -1)).max(dim=1).values + 1
        offsets = torch.cumsum(per_row, 0) - per_row
        sample_index = torch.where(valid, local + offsets[:, None], torch.full_like(local, -1))
        return cls(
            input_ids=input_ids,
            labels=inputs.get("labels"),
            attention_mask=attention_mask,
            position_ids=position_ids,
            segments=segments,
            valid=valid,
            sample_index=sample_index,
            n_samples=int(per_row.sum()),
        )

    def sub_inputs(self, sub: SubBatch) -> dict[str, torch.Tensor]:
        """Model inputs restricted to the reference sub-batch (causal: truncation is exact)."""
        out = {"input_ids": self.input_ids[sub.rows, : sub.length]}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask[sub.rows, : sub.length]
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids[sub.rows, : sub.length]
        return out


class Regularizer:
    """One loss term: ``weight · value`` is added to the SFT loss; ``value`` is logged as ``treft/<name>``.

    Lifecycle per training step, with the step's state passed as a value: ``policy_capture(batch)`` wraps the
    SFT forward and yields the step state; if ``reference_request(batch, state)`` returns a request, the trainer
    runs one shared no-grad reference pass wrapped in ``reference_capture(batch, state, sub)``; then
    ``compute(batch, state, ...)`` returns the unweighted term (a 0-dim fp32 tensor). ``close`` removes every
    hook (the trainer calls it when training ends, also on an exception).
    """

    key: str = ""

    def __init__(self, weight: float):
        self.weight = float(weight)
        self.name = self.key  # log key ``treft/<name>``; differs from ``key`` for one of several terms of a kind

    def weighted(self, term: torch.Tensor, step: int, max_steps: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        """What the loss adds at optimizer step ``step`` of ``max_steps`` (None: nothing), and the values to log."""
        return (self.weight * term if self.weight > 0 else None), {f"treft/{self.name}": float(term.detach())}

    def check_model(self, model: torch.nn.Module) -> None:
        """Before training: fail if ``model`` lacks what this term needs (modules, layer indices)."""

    def setup(self, model: torch.nn.Module, reference: Reference) -> None:
        """Called once, at the first step (after DeepSpeed/accelerate wrapped the model)."""

    @property
    def needs_reference_each_step(self) -> bool:
        """Whether the training steps run reference passes (the frozen copy can be released if none does)."""
        return True

    def policy_capture(self, batch: StepBatch) -> AbstractContextManager[Any]:
        """Wraps the SFT forward; yields this step's state (what the later calls receive)."""
        return nullcontext()

    def reference_request(self, batch: StepBatch, state: Any) -> ReferenceRequest | None:
        return None

    def reference_capture(self, batch: StepBatch, state: Any, sub: SubBatch) -> AbstractContextManager:
        return nullcontext()

    def compute(self, batch: StepBatch, state: Any, outputs, reference: ReferenceResult | None,
                model) -> torch.Tensor:
        raise NotImplementedError

    def replace_sft(self, sft_loss: torch.Tensor, state: Any, term: torch.Tensor) -> torch.Tensor:
        """The SFT part of the loss after this term (unchanged, except for a term that replaces it)."""
        return sft_loss

    def end_step(self) -> None:
        """Called after the step's backward (stops the capture replays of gradient checkpointing)."""

    def summary(self) -> str | None:
        """A line for the end-of-training log, if any."""
        return None

    def close(self) -> None:
        """Remove hooks (idempotent)."""


@dataclass
class CaptureStep:
    """Per-step state of a capturing regularizer: the captured (row, position) pairs and what was captured."""

    pairs: torch.Tensor  # [N, 2] (row, position) of the training batch, row-major
    policy: list[torch.Tensor | None]  # per module [N, d], filled by the SFT forward
    reference: list[torch.Tensor | None] | None = None  # per module [N, d], filled by the reference pass


class CapturingRegularizer(Regularizer):
    """A regularizer that records module outputs of the policy and of the reference through hooks."""

    def __init__(self, weight: float):
        super().__init__(weight)
        self._policy: ActivationCapture | None = None  # on the trained model
        self._ref: ActivationCapture | None = None  # the same object when the reference is the policy itself
        self._reference: Reference | None = None

    def _modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        raise NotImplementedError

    def check_model(self, model: torch.nn.Module) -> None:
        self._modules(model)

    def _selected(self, batch: StepBatch) -> torch.Tensor:
        """[B, T] bool: the positions whose activations the term compares."""
        raise NotImplementedError

    def _attach_reference(self, reference: Reference) -> None:
        from ..capture import ActivationCapture

        ref_model = reference.model()
        self._ref = self._policy if ref_model is reference.policy else ActivationCapture(self._modules(ref_model))

    @contextmanager
    def policy_capture(self, batch: StepBatch) -> Iterator[CaptureStep]:
        selected = self._selected(batch)
        flat = selected.reshape(-1).nonzero().squeeze(-1)
        with self._policy.armed(flat) as outputs:
            yield CaptureStep(pairs=selected.nonzero(), policy=outputs)

    def reference_request(self, batch: StepBatch, state: CaptureStep) -> ReferenceRequest | None:
        if self._ref is None:
            return None
        rows = torch.zeros(batch.input_ids.shape[0], dtype=torch.bool, device=batch.input_ids.device)
        rows[state.pairs[:, 0]] = True
        if not rows.any():
            rows[0] = True  # every rank runs the pass every step
        length = int(state.pairs[:, 1].max()) + 1 if len(state.pairs) else 1
        return ReferenceRequest(rows=rows, length=length)

    @contextmanager
    def reference_capture(self, batch: StepBatch, state: CaptureStep, sub: SubBatch) -> Iterator[None]:
        if self._ref is None:  # no own reference pass (e.g. cached); the pass was requested by another term
            yield
            return
        with self._ref.armed(sub.flat_index(state.pairs[:, 0], state.pairs[:, 1])) as outputs:
            state.reference = outputs
            yield

    def _require_gradient(self, captured: list[torch.Tensor], model) -> None:
        """Fail with the cause when a weighted term would be a constant (its activations carry no gradient)."""
        if self.weight <= 0 or not model.training or not torch.is_grad_enabled():
            return
        if any(t.requires_grad for t in captured):
            return
        cfg = getattr(self._reference.trainer, "axolotl_cfg", None) if self._reference is not None else None
        raise RuntimeError(f"treft.{self.key}: the captured activations carry no gradient, so the term cannot "
                           f"train the model: {no_gradient_cause(cfg)}")

    def end_step(self) -> None:
        for cap in (self._policy, self._ref):
            if cap is not None:
                cap.release()

    def close(self) -> None:
        for cap in {id(c): c for c in (self._policy, self._ref) if c is not None}.values():
            cap.remove()
        self._policy = self._ref = None


def no_gradient_cause(cfg) -> str:
    """Why hooked activations of the trained model would carry no gradient under this Axolotl config."""
    cfg = cfg or {}
    if cfg.get("activation_offloading") == "legacy":
        return ("`activation_offloading: legacy` runs the decoder layers under no_grad; use "
                "`activation_offloading: true` (or false)")
    if (cfg.get("gradient_checkpointing_kwargs") or {}).get("use_reentrant"):
        return ("reentrant gradient checkpointing hides the activations; set "
                "`gradient_checkpointing_kwargs: {use_reentrant: false}`")
    return ("no trainable parameter feeds the regularized modules (check `lora_target_modules` / "
            "`unfrozen_parameters`, or choose later `layers:`)")


@contextmanager
def capture_policy(regs: list[Regularizer], batch: StepBatch) -> Iterator[list[Any]]:
    """Arm every regularizer's policy capture around one SFT forward; yields their step states in order."""
    with ExitStack() as stack:
        yield [stack.enter_context(reg.policy_capture(batch)) for reg in regs]


def run_reference_pass(reference: Reference, batch: StepBatch, regs: list[Regularizer],
                       states: list[Any]) -> ReferenceResult | None:
    """The one shared no-grad reference pass of a step: the merged request of ``regs``, their captures armed."""
    request = None
    for reg, state in zip(regs, states, strict=True):
        need = reg.reference_request(batch, state)
        if need is not None:
            request = need if request is None else request.merge(need)
    if request is None:
        return None
    sub = SubBatch(rows=request.rows.nonzero().squeeze(-1), length=request.length)
    kept = None
    if request.logits and request.logit_pairs is not None:
        kept = torch.unique(sub.flat_index(request.logit_pairs[:, 0], request.logit_pairs[:, 1]))
    with ExitStack() as stack:
        for reg, state in zip(regs, states, strict=True):
            stack.enter_context(reg.reference_capture(batch, state, sub))
        logits = reference.forward(batch.sub_inputs(sub), logits=request.logits, keep=kept)
    return ReferenceResult(sub=sub, logits=logits, kept=kept)


def regularized_terms(reference: Reference, batch: StepBatch, regs: list[Regularizer], states: list[Any],
                      outputs, model) -> list[torch.Tensor]:
    """After the SFT forward ran inside :func:`capture_policy`: the shared reference pass, then each term."""
    result = run_reference_pass(reference, batch, regs, states)
    return [reg.compute(batch, state, outputs, result, model) for reg, state in zip(regs, states, strict=True)]
