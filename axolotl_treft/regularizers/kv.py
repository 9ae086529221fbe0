"""TReFT: keep the attention K/V of chat-template tokens close to the initial model's.

``L_KV = mean_layers( relsq(K) + relsq(V) )``, ``relsq = mean_tokens ‖x − x_ref‖² / ‖x_ref‖²``, where x
is the output of the layer's ``k_proj``/``v_proj`` (what attention consumes, before RoPE and any k-norm),
over all KV heads, for the regularized tokens of the micro-batch.

Prefix mode needs no reference pass during training: with causal attention, a sample's prefix K/V
depend only on the prefix tokens, so the reference is computed once per distinct prefix (at the first
step, on every rank, in the same order) and cached. Other modes run one no-grad reference pass over
the rows that hold regularized tokens, truncated after the last such token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..args import KVConfig
from ..capture import ActivationCapture, layer_positions, projection_modules
from ..log import get_logger
from ..reference import Reference
from ..spans import SEG_PREFIX, SEGMENTS_KEY, TOKEN_MODES
from .base import CaptureStep, CapturingRegularizer, ReferenceRequest, StepBatch

LOG = get_logger(__name__)
_EPS = 1e-12


def relsq(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ‖x − ref‖² / ‖ref‖² (fp32)."""
    x, ref = x.float(), ref.float()
    return ((x - ref).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp_min(_EPS)).mean()


def kv_loss(policy: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """``policy``/``reference``: K outputs of the selected layers followed by their V outputs."""
    n = len(policy) // 2
    per_layer = [relsq(policy[i], reference[i]) + relsq(policy[n + i], reference[n + i]) for i in range(n)]
    return torch.stack(per_layer).mean()


class KVRegularizer(CapturingRegularizer):
    key = "kv"

    def __init__(self, cfg: KVConfig, train_dataset=None):
        super().__init__(cfg.weight)
        self.cfg = cfg
        self.codes = TOKEN_MODES[cfg.tokens]
        self.train_dataset = train_dataset
        self.samples_seen = 0
        self.samples_skipped = 0
        self.last_selected = 0  # regularized tokens in the latest micro-batch (for logs and probes)
        self._warned = False
        self._cache: list[torch.Tensor] | None = None  # per captured module: [sum of prefix lengths, d]
        self._cache_offsets: dict[tuple[int, ...], int] = {}

    # -- setup -------------------------------------------------------------------------------------
    def _modules(self, model: nn.Module) -> list[nn.Module]:
        keys, values = projection_modules(model, "k_proj"), projection_modules(model, "v_proj")
        idx = list(range(len(keys))) if self.cfg.layers == "all" else layer_positions(self.cfg.layers, len(keys), "treft.kv.layers")
        return [keys[i] for i in idx] + [values[i] for i in idx]

    @property
    def needs_reference_each_step(self) -> bool:
        return self._cache is None

    def setup(self, model: nn.Module, reference: Reference) -> None:
        self._policy = ActivationCapture(self._modules(reference.policy))
        self._reference = reference
        if self.cfg.tokens == "prefix":
            prefixes = self._distinct_prefixes()
            if prefixes is not None and len(prefixes) <= self.cfg.max_cached_prefixes:
                self._build_cache(reference, prefixes)
                return
            LOG.warning(
                "treft.kv: %s distinct prefixes exceed max_cached_prefixes=%d; running a reference pass "
                "every step instead", "unknown" if prefixes is None else len(prefixes), self.cfg.max_cached_prefixes,
            )
        self._attach_reference(reference)

    def _distinct_prefixes(self) -> list[tuple[int, ...]] | None:
        ds = self.train_dataset
        if ds is None or not hasattr(ds, "column_names") or SEGMENTS_KEY not in ds.column_names:
            return None
        found: set[tuple[int, ...]] = set()
        for chunk in ds.select_columns(["input_ids", SEGMENTS_KEY]).iter(batch_size=2048):
            for ids, seg in zip(chunk["input_ids"], chunk[SEGMENTS_KEY], strict=True):
                n = _leading(seg, SEG_PREFIX)
                if n:
                    found.add(tuple(ids[:n]))
        return sorted(found)  # the same order on every rank

    @torch.no_grad()
    def _build_cache(self, reference: Reference, prefixes: list[tuple[int, ...]]) -> None:
        """Reference K/V of every distinct prefix, from the initial model (the policy itself before the first
        update, else the frozen copy, e.g. when resuming a full finetune from a checkpoint)."""
        ref_model = reference.model(allow_initial_policy=True)
        own = ref_model is not reference.policy
        capture = ActivationCapture(self._modules(ref_model)) if own else self._policy
        device = next(ref_model.parameters()).device
        parts: list[list[torch.Tensor]] = [[] for _ in capture.modules]
        offset = 0
        try:
            for prefix in prefixes:
                ids = torch.tensor([prefix], device=device)
                index = torch.arange(len(prefix), device=device)
                with capture.armed(index) as outs:
                    reference.forward({"input_ids": ids}, logits=False, allow_initial_policy=True)
                for slot, out in enumerate(outs):
                    parts[slot].append(out.float())
                self._cache_offsets[prefix] = offset
                offset += len(prefix)
        finally:
            if own:
                capture.remove()
        self._cache = [torch.cat(p) for p in parts] if prefixes else None
        LOG.info("treft.kv: cached reference K/V for %d distinct prefix(es), %d tokens", len(prefixes), offset)

    # -- per step ----------------------------------------------------------------------------------
    def _selected(self, batch: StepBatch) -> torch.Tensor:
        if batch.segments is None:
            raise RuntimeError(
                "treft.kv: the batch has no template segments; TReFT needs `type: chat_template` datasets"
            )
        codes = torch.tensor(self.codes, device=batch.segments.device, dtype=batch.segments.dtype)
        selected = torch.isin(batch.segments, codes)
        self._account(batch, selected)
        return selected

    def _account(self, batch: StepBatch, selected: torch.Tensor) -> None:
        hit = torch.zeros(batch.n_samples, dtype=torch.bool, device=selected.device)
        idx = batch.sample_index[selected]
        hit[idx[idx >= 0]] = True
        present = torch.zeros_like(hit)
        present[batch.sample_index[batch.valid]] = True
        skipped = int((present & ~hit).sum())
        self.last_selected = int(selected.sum())
        self.samples_seen += int(present.sum())
        self.samples_skipped += skipped
        if skipped and not self._warned:
            self._warned = True
            LOG.warning(
                "treft.kv: %d sample(s) in this batch have no %r tokens (spans not found or truncated away); "
                "they train with the SFT loss only. The total is reported at the end of training.",
                skipped, self.cfg.tokens,
            )

    def reference_request(self, batch: StepBatch, state: CaptureStep) -> ReferenceRequest | None:
        if self._cache is not None:
            return None
        return super().reference_request(batch, state)

    def _cached_reference(self, batch: StepBatch, state: CaptureStep) -> list[torch.Tensor]:
        ids = batch.input_ids.cpu()
        pairs = state.pairs.cpu()
        sample = batch.sample_index.cpu()
        rows: list[torch.Tensor] = []
        for r in torch.unique_consecutive(pairs[:, 0]).tolist():
            pos = pairs[pairs[:, 0] == r, 1]
            # split the row's prefix positions by sample (each prefix is contiguous at its sample's start)
            sid = sample[r, pos]
            for s in torch.unique_consecutive(sid):
                p = pos[sid == s]
                key = tuple(ids[r, p].tolist())
                start = self._cache_offsets.get(key)
                if start is None:
                    raise RuntimeError(
                        "treft.kv: a prefix not seen in the training dataset reached training; "
                        "set `treft.kv.max_cached_prefixes: 0` to compute references every step"
                    )
                rows.append(torch.arange(start, start + len(p)))
        index = torch.cat(rows).to(self._cache[0].device) if rows else torch.zeros(0, dtype=torch.long)
        return [c.index_select(0, index.to(c.device)) for c in self._cache]

    def compute(self, batch: StepBatch, state: CaptureStep, outputs, reference, model) -> torch.Tensor:
        policy = state.policy
        if any(p is None for p in policy):
            raise RuntimeError("treft.kv: K/V projections were not captured during the forward pass")
        if policy[0].shape[0] == 0:
            return policy[0].sum() * 0.0
        self._require_gradient(policy, model)
        if self._cache is not None:
            ref_kv = [r.to(policy[0].device) for r in self._cached_reference(batch, state)]
        else:
            ref_kv = state.reference
        return kv_loss(policy, ref_kv)

    def summary(self) -> str | None:
        if not self.samples_skipped:
            return None
        return (
            f"treft.kv: {self.samples_skipped} of {self.samples_seen} training samples had no "
            f"{self.cfg.tokens!r} tokens and trained with the SFT loss only"
        )


def _leading(seq, value: int) -> int:
    n = 0
    for s in seq:
        if s != value:
            break
        n += 1
    return n
