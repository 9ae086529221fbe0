"""Token-wise constrained SFT (Qi et al., "Safety Alignment Should Be Made More Than Just a Few Tokens Deep",
ICLR 2025, arXiv 2406.05946, §4, Eq. 3): the SFT loss of every trained token replaced by

    ℓ_t = −(2/β_t) · log σ(β_t · (log π_θ(y_t | x, y_<t) − log π_aligned(y_t | x, y_<t)))

where π_aligned is the frozen initial model (the same reference the KL term uses, in the same shared pass).
Its gradient is ``2·(1 − σ(β_t·Δ_t))`` times SFT's: the weight falls to 0 once the model's log-probability
of y_t rises past the aligned model's, by a margin set by β_t; as β_t → 0 the weight is 1 and the gradient
is plain SFT's.

``t`` counts trained tokens (``labels != -100``) from the start of each assistant turn, 1-based: it restarts
after any untrained token, at every packed sample and, with template segments, where the response content
starts. ``β_t = betas[t − 1]`` for ``t ≤ len(betas)``, then ``beta_rest`` (the paper: 0.5, then 2 for
2 ≤ t ≤ 5, then 0.1).

The replacement is normalized exactly like the SFT loss it replaces: ``Σ_t ℓ_t`` times the factor the SFT
loss applies to ``Σ_t NLL_t`` over the same tokens (``sft_loss / Σ_t NLL_t``), so gradient accumulation,
``num_items_in_batch`` and token averaging across devices carry over unchanged. The logged value
``treft/constrained_sft`` is the per-token mean of ``ℓ_t`` over the micro-batch, next to ``treft/sft``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..args import ConstrainedSFTConfig
from ..spans import SEG_RESPONSE
from .base import ReferenceRequest, ReferenceResult, Regularizer, StepBatch


def turn_positions(batch: StepBatch) -> torch.Tensor:
    """[B, T] long: the 1-based position ``t`` of each trained token within its assistant turn, 0 elsewhere.

    Indexed by the label position (the token ``y_t`` itself, predicted by the logits one position earlier).
    """
    if batch.labels is None:
        raise ValueError("treft.constrained_sft: the batch has no labels (it replaces the SFT loss on them)")
    trained = batch.labels != -100
    trained[:, 0] = False  # nothing predicts the first token (as in the SFT loss)
    starts = trained.clone()
    starts[:, 1:] &= ~trained[:, :-1] | (batch.sample_index[:, 1:] != batch.sample_index[:, :-1])
    if batch.segments is not None:
        seg = batch.segments.to(trained.device)
        starts[:, 1:] |= trained[:, 1:] & (seg[:, 1:] == SEG_RESPONSE) & (seg[:, :-1] != SEG_RESPONSE)
    count = torch.cumsum(trained.long(), dim=1)
    at_start = torch.cummax(torch.where(starts, count, torch.zeros_like(count)), dim=1).values
    return torch.where(trained, count - at_start + 1, torch.zeros_like(count))


def betas_at(t: torch.Tensor, betas: list[float], beta_rest: float) -> torch.Tensor:
    """β_t for 1-based positions ``t`` ([N] long): ``betas[t − 1]``, then ``beta_rest``."""
    table = torch.tensor([*betas, beta_rest], dtype=torch.float32, device=t.device)
    return table[(t - 1).clamp(max=len(betas))]


def constrained_loss(policy_logp: torch.Tensor, ref_logp: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per-token ``−(2/β)·log σ(β·(log π_θ − log π_ref))`` (Qi et al. 2025, Eq. 3), fp32."""
    return -(2.0 / beta) * F.logsigmoid(beta * (policy_logp.float() - ref_logp.float()))


@dataclass
class ConstrainedStep:
    """One micro-step: the logit positions (row, label position − 1), their β, and the NLL the SFT loss sums."""

    pairs: torch.Tensor  # [N, 2]
    targets: torch.Tensor  # [N] token ids y_t
    beta: torch.Tensor  # [N]
    nll_sum: torch.Tensor | None = None  # Σ −log π_θ(y_t), detached, filled by compute


class ConstrainedSFTRegularizer(Regularizer):
    """Replaces the SFT loss (see the module docstring); adds nothing on top of it."""

    key = "constrained_sft"

    def __init__(self, cfg: ConstrainedSFTConfig):
        super().__init__(weight=0.0)  # logged, never added: :meth:`replace_sft` swaps it in for the SFT loss
        self.cfg = cfg

    def policy_capture(self, batch: StepBatch) -> AbstractContextManager[ConstrainedStep]:
        t = turn_positions(batch)
        label_pos = t.nonzero()
        pairs = torch.stack([label_pos[:, 0], label_pos[:, 1] - 1], dim=1)
        targets = batch.labels[label_pos[:, 0], label_pos[:, 1]]
        beta = betas_at(t[label_pos[:, 0], label_pos[:, 1]], self.cfg.betas, self.cfg.beta_rest)
        return nullcontext(ConstrainedStep(pairs, targets, beta))

    def reference_request(self, batch: StepBatch, state: ConstrainedStep) -> ReferenceRequest:
        rows = torch.zeros(batch.input_ids.shape[0], dtype=torch.bool, device=batch.input_ids.device)
        rows[state.pairs[:, 0]] = True
        if not rows.any():
            rows[0] = True  # every rank runs the pass every step
        length = int(state.pairs[:, 1].max()) + 1 if len(state.pairs) else 1
        return ReferenceRequest(rows=rows, length=length, logits=True, logit_pairs=state.pairs)

    def compute(self, batch: StepBatch, state: ConstrainedStep, outputs, reference: ReferenceResult | None,
                model) -> torch.Tensor:
        if outputs.logits is None:
            raise RuntimeError("treft.constrained_sft: the model returned no logits (fused cross-entropy kernels "
                               "do not materialize them); disable cut_cross_entropy / liger fused linear CE")
        if len(state.pairs) == 0:
            state.nll_sum = outputs.logits.new_zeros((), dtype=torch.float32)
            return outputs.logits.sum() * 0.0
        rows, pos = state.pairs[:, 0], state.pairs[:, 1]
        policy_logp = -F.cross_entropy(outputs.logits[rows, pos].float(), state.targets, reduction="none")
        with torch.no_grad():
            ref_logits = reference.logits_at(rows, pos).to(policy_logp.device)
            ref_logp = -F.cross_entropy(ref_logits.float(), state.targets, reduction="none")
        state.nll_sum = -policy_logp.detach().sum()
        return constrained_loss(policy_logp, ref_logp, state.beta.to(policy_logp.device)).mean()

    def replace_sft(self, sft_loss: torch.Tensor, state: ConstrainedStep, term: torch.Tensor) -> torch.Tensor:
        """``Σ ℓ_t`` normalized as the SFT loss normalizes ``Σ NLL_t`` (its replacement in the total loss)."""
        if len(state.pairs) == 0 or not bool(state.nll_sum > 0):
            return sft_loss  # no trained token in this micro-batch: the SFT loss is 0 too
        return term * (len(state.pairs) * sft_loss.detach().float() / state.nll_sum).to(term.dtype)
