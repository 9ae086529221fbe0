"""The small interface every regularizer implements, and the per-step batch view they share."""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..collator import PAD_SEGMENT

if TYPE_CHECKING:
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
    """One loss term: ``weight · value`` is added to the SFT loss; ``value`` is logged as ``treft/<key>``.

    Lifecycle per training step: ``policy_capture`` wraps the SFT forward; if ``reference_request``
    returns a request, the trainer runs one shared no-grad reference pass wrapped in
    ``reference_capture``; then ``compute`` returns the unweighted term (a 0-dim fp32 tensor).
    """

    key: str = ""

    def __init__(self, weight: float):
        self.weight = float(weight)

    def setup(self, model: torch.nn.Module, reference: Reference) -> None:
        """Called once, at the first step (after DeepSpeed/accelerate wrapped the model)."""

    def policy_capture(self, batch: StepBatch) -> AbstractContextManager:
        return nullcontext()

    def reference_request(self, batch: StepBatch) -> ReferenceRequest | None:
        return None

    def reference_capture(self, batch: StepBatch, sub: SubBatch) -> AbstractContextManager:
        return nullcontext()

    def compute(self, batch: StepBatch, outputs, reference: ReferenceResult | None, model) -> torch.Tensor:
        raise NotImplementedError

    def end_step(self) -> None:
        """Called after the step's backward (release per-step state such as capture replays)."""

    def summary(self) -> str | None:
        """A line for the end-of-training log, if any."""
        return None

    def close(self) -> None:
        """Remove hooks."""


class CapturingRegularizer(Regularizer):
    """A regularizer that records module outputs of the policy and of the reference through hooks."""

    def __init__(self, weight: float):
        super().__init__(weight)
        self._policy = None  # ActivationCapture on the trained model
        self._ref = None  # the same object when the reference is the adapter-disabled policy
        self._captured = None
        self._ref_captured = None

    def _modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        raise NotImplementedError

    def _attach_reference(self, reference: Reference) -> None:
        from ..capture import ActivationCapture

        ref_model = reference.model()
        self._ref = self._policy if ref_model is reference.policy else ActivationCapture(self._modules(ref_model))

    def end_step(self) -> None:
        for cap in (self._policy, self._ref):
            if cap is not None:
                cap.release()

    def close(self) -> None:
        for cap in {id(c): c for c in (self._policy, self._ref) if c is not None}.values():
            cap.remove()


def run_reference_pass(reference: Reference, batch: StepBatch, regs: list[Regularizer]) -> ReferenceResult | None:
    """The one shared no-grad reference pass of a step: the merged request of ``regs``, their captures armed."""
    request = None
    for reg in regs:
        need = reg.reference_request(batch)
        if need is not None:
            request = need if request is None else request.merge(need)
    if request is None:
        return None
    sub = SubBatch(rows=request.rows.nonzero().squeeze(-1), length=request.length)
    kept = None
    if request.logits and request.logit_pairs is not None:
        kept = torch.unique(sub.flat_index(request.logit_pairs[:, 0], request.logit_pairs[:, 1]))
    with ExitStack() as stack:
        for reg in regs:
            stack.enter_context(reg.reference_capture(batch, sub))
        logits = reference.forward(batch.sub_inputs(sub), logits=request.logits, keep=kept)
    return ReferenceResult(sub=sub, logits=logits, kept=kept)
