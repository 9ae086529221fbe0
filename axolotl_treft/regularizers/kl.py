"""KL to the frozen reference: ``KL(p_ref ‖ p_θ)`` per token over the full vocabulary, mean over tokens.

Normalization, exactly: for each selected position t, ``KL_t = Σ_v p_ref(v|t) · (log p_ref(v|t) − log p_θ(v|t))``
(natural log, temperature 1); the term is the plain mean of ``KL_t`` over the selected positions of the
micro-batch. Nothing is divided by the vocabulary size (the paper's code did that by accident, which is
why its λ=50 was "small"; our λ is on the per-token scale).

* ``tokens: all``: every attended (non-padding) position. ``tokens: response``: positions whose next
  token is trained (``labels[t+1] != -100``), i.e. the distributions that produce the response.
* ``on: train``: on the training batch, using the SFT forward's logits and one shared reference pass.
* ``on: retain``: every step draws its own batch from the retain set and runs one trainable forward and one
  reference forward on it (on every rank, every step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import torch

from ..args import KLConfig
from .base import ReferenceRequest, ReferenceResult, Regularizer, StepBatch, SubBatch

_CHUNK = 1024  # positions per chunk: bounds the fp32 [chunk, V] temporaries


class _TokenKL(torch.autograd.Function):
    """Mean over rows of KL(softmax(ref) ‖ softmax(policy)), chunked over rows, gradient formed in forward.

    Per row: ``KL = Σ q·(log q − log p)`` with ``q = softmax(ref)``, ``p = softmax(policy)``;
    ``∂KL/∂policy = p − q``. Two fused log-softmaxes, two exponentials and one dot product per row, in
    place where possible, and one saved [N, V] gradient instead of autograd's chain of intermediates.
    """

    @staticmethod
    def forward(ctx, policy: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        rows = policy.shape[0]
        grads: list[torch.Tensor] = []
        total = policy.new_zeros((), dtype=torch.float32)
        for start in range(0, rows, _CHUNK):
            log_p = torch.log_softmax(policy[start:start + _CHUNK].float(), dim=-1)
            log_q = torch.log_softmax(ref[start:start + _CHUNK].float(), dim=-1)
            q = log_q.exp()
            total += torch.linalg.vecdot(q, log_q.sub_(log_p)).sum()
            if ctx.needs_input_grad[0]:
                grads.append(log_p.exp_().sub_(q).to(policy.dtype))
        ctx.save_for_backward(grads[0] if len(grads) == 1 else torch.cat(grads) if grads else None)
        ctx.rows = rows
        return total / rows

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * (grad_out / ctx.rows).to(grad.dtype), None


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(ref) ‖ softmax(policy)) in fp32; the gradient flows to the policy only."""
    if policy_logits.shape[0] == 0:
        return policy_logits.sum() * 0.0
    return _TokenKL.apply(policy_logits, ref_logits.detach())


def kl_positions(batch: StepBatch, tokens: str) -> torch.Tensor:
    """[B, T] bool: the positions whose next-token distributions are compared."""
    if tokens == "all" or batch.labels is None:
        return batch.valid
    trained_next = torch.zeros_like(batch.valid)
    trained_next[:, :-1] = batch.labels[:, 1:] != -100
    same_sample = torch.zeros_like(batch.valid)
    same_sample[:, :-1] = batch.sample_index[:, :-1] == batch.sample_index[:, 1:]
    return trained_next & same_sample & batch.valid


class KLRegularizer(Regularizer):
    key = "kl"

    def __init__(self, cfg: KLConfig, retain_batches: Iterator[dict] | None = None):
        super().__init__(cfg.weight)
        self.cfg = cfg
        self.retain_batches = retain_batches
        if cfg.on == "retain" and retain_batches is None:
            raise ValueError("treft.kl.on: `retain` needs the retain set (treft.retain.datasets)")

    def setup(self, model, reference) -> None:
        self.reference = reference

    def policy_capture(self, batch: StepBatch) -> AbstractContextManager[torch.Tensor | None]:
        """Yields the [B, T] positions compared on this training batch (None for KL on retain)."""
        return nullcontext(kl_positions(batch, self.cfg.tokens) if self.cfg.on == "train" else None)

    def reference_request(self, batch: StepBatch, positions: torch.Tensor | None) -> ReferenceRequest | None:
        if positions is None:
            return None
        rows = positions.any(dim=1)
        if not rows.any():
            rows = rows.clone()
            rows[0] = True
        pairs = positions.nonzero()
        return ReferenceRequest(rows=rows, length=int(pairs[:, 1].max()) + 1 if len(pairs) else 1, logits=True,
                                logit_pairs=pairs)

    def compute(self, batch: StepBatch, positions: torch.Tensor | None, outputs, reference: ReferenceResult | None,
                model) -> torch.Tensor:
        if positions is None:
            return self._retain_kl(model)
        pairs = positions.nonzero()
        policy = outputs.logits[pairs[:, 0], pairs[:, 1]]
        ref = reference.logits_at(pairs[:, 0], pairs[:, 1]).to(policy.device)
        return token_kl(policy, ref)

    def _retain_kl(self, model) -> torch.Tensor:
        raw = next(self.retain_batches)
        device = next(self.reference.policy.parameters()).device
        segments = raw.pop("treft_segments", None)
        inputs = {k: v.to(device) for k, v in raw.items() if k in ("input_ids", "attention_mask", "labels")}
        batch = StepBatch.from_inputs(inputs, segments)
        positions = kl_positions(batch, self.cfg.tokens)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        policy_logits = model(**model_inputs, use_cache=False).logits
        sub = SubBatch(rows=torch.arange(batch.input_ids.shape[0], device=device), length=batch.input_ids.shape[1])
        pairs = positions.nonzero()
        # the head runs at exactly these positions, in this order: the result is already one row per pair
        kept = sub.flat_index(pairs[:, 0], pairs[:, 1])
        ref = self.reference.forward(batch.sub_inputs(sub), logits=True, keep=kept)
        return token_kl(policy_logits[pairs[:, 0], pairs[:, 1]], ref)
