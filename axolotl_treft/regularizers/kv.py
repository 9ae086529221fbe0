"""TReFT: keep the attention K/V of chat-template tokens close to the initial model's.

``L_KV = mean_layers( relsq(K) + relsq(V) )``, ``relsq = mean_tokens ‖x − x_ref‖² / ‖x_ref‖²``, where x
is the output of the layer's ``k_proj``/``v_proj`` (what attention consumes, before RoPE and any k-norm),
over all KV heads, for the regularized tokens of the micro-batch.

Prefix mode needs no reference pass during training: with causal attention, a sample's prefix K/V
depend only on the prefix tokens, so the reference is computed once per distinct prefix (at the first
step, on every rank, in the same order) and cached. ``reference: fixed`` does the same for the postfix:
one reference postfix (the template around an empty user query, or the first training example) is
computed once and every example's postfix is compared with it. Other modes run one no-grad reference
pass over the rows that hold regularized tokens, truncated after the last such token.

The loss adds ``max(weight · L_KV − threshold, 0)`` at the steps in ``active_steps`` (every step by default).
"""

from __future__ import annotations

import torch
from torch import nn

from ..args import KVConfig
from ..capture import ActivationCapture, layer_positions, projection_modules
from ..log import get_logger
from ..reference import Reference
from ..spans import SEG_POSTFIX, SEG_PREFIX, SEGMENTS_KEY, TOKEN_MODES, ConversationSpans
from .base import CaptureStep, CapturingRegularizer, ReferenceRequest, StepBatch

CacheKey = tuple[int, tuple[int, ...]]  # (segment code, token ids of the span)

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

    def __init__(self, cfg: KVConfig, train_dataset=None, name: str = "kv",
                 empty_query: ConversationSpans | None = None):
        super().__init__(cfg.weight)
        self.cfg = cfg
        self.name = name  # log key: treft/<name>
        self.codes = TOKEN_MODES[cfg.tokens]
        self.train_dataset = train_dataset
        self.empty_query = empty_query  # fixed_from: empty_query: the rendered conversation
        self.samples_seen = 0
        self.samples_skipped = 0
        self.postfixes_seen = 0
        self.postfixes_mismatched = 0  # fixed reference: postfix spans whose tokens differ from the reference's
        self.last_selected = 0  # regularized tokens in the latest micro-batch (for logs and probes)
        self._warned = self._warned_mismatch = False
        self._cache: list[torch.Tensor] | None = None  # per captured module: [cached tokens, d]
        self._cache_offsets: dict[CacheKey, int] = {}
        self._fixed_postfix: tuple[int, ...] | None = None

    # -- setup -------------------------------------------------------------------------------------
    def _modules(self, model: nn.Module) -> list[nn.Module]:
        keys, values = projection_modules(model, "k_proj"), projection_modules(model, "v_proj")
        idx = list(range(len(keys))) if self.cfg.layers == "all" else layer_positions(self.cfg.layers, len(keys), self._key("layers"))
        return [keys[i] for i in idx] + [values[i] for i in idx]

    @property
    def needs_reference_each_step(self) -> bool:
        return self._cache is None

    def setup(self, model: nn.Module, reference: Reference) -> None:
        self._policy = ActivationCapture(self._modules(reference.policy))
        self._reference = reference
        entries = self._cache_entries(reference)
        if entries is None:
            self._attach_reference(reference)
        else:
            self._build_cache(reference, entries)

    def _cache_entries(self, reference: Reference) -> list[tuple[CacheKey, list[int], list[int]]] | None:
        """What the cache holds: (key, context token ids, positions to keep) per entry; None = no cache."""
        source = self.cfg.fixed_source
        if source is None and self.cfg.tokens != "prefix":
            return None  # exact postfix-containing modes: one reference pass per step covers every token
        entries = []
        if SEG_PREFIX in self.codes:
            prefixes = self._distinct_prefixes()
            if prefixes is None or len(prefixes) > self.cfg.max_cached_prefixes:
                found = "unknown" if prefixes is None else len(prefixes)
                if source is not None:
                    raise ValueError(
                        f"{self._key('reference')}: `fixed` with tokens: {self.cfg.tokens} caches every distinct "
                        f"prefix, and there are {found} (max_cached_prefixes={self.cfg.max_cached_prefixes}); raise "
                        f"{self._key('max_cached_prefixes')} or list the prefix and postfix as two terms")
                LOG.warning("%s: %s distinct prefixes exceed max_cached_prefixes=%d; running a reference pass "
                            "every step instead", self._key(), found, self.cfg.max_cached_prefixes)
                return None
            entries = [((SEG_PREFIX, p), list(p), list(range(len(p)))) for p in prefixes]
        if source is not None:
            context, positions = self._fixed_postfix_source(source)
            self._fixed_postfix = tuple(context[i] for i in positions)
            entries.append(((SEG_POSTFIX, self._fixed_postfix), context, positions))
            LOG.info("%s: fixed postfix reference from %s: %d tokens %s", self._key(), source, len(positions),
                     self._fixed_postfix)
        return entries

    def _fixed_postfix_source(self, source: str) -> tuple[list[int], list[int]]:
        """Token ids to run the initial model on, and the positions of the reference postfix among them."""
        if source == "empty_query":
            if self.empty_query is None:
                raise RuntimeError(f"{self._key('fixed_from')}: empty_query needs the rendered template")
            ids, segments = self.empty_query.input_ids, self.empty_query.segments
        else:
            ds = self.train_dataset
            if ds is None or not hasattr(ds, "column_names") or SEGMENTS_KEY not in ds.column_names or not len(ds):
                raise ValueError(f"{self._key('fixed_from')}: first_example needs a tokenized training dataset "
                                 "with template segments (`type: chat_template`); use `fixed_from: empty_query`")
            first = ds[0]
            ids, segments = list(first["input_ids"]), list(first[SEGMENTS_KEY])[: len(first["input_ids"])]
        positions = _first_run(segments, SEG_POSTFIX)
        if not positions:
            raise ValueError(f"{self._key('fixed_from')}: {source} has no postfix tokens to take the reference from")
        return list(ids[: positions[-1] + 1]), positions

    def _key(self, field: str | None = None) -> str:
        """The config key this term came from, for messages (``treft.kv``, or ``treft.kv[<name>]``)."""
        base = "treft.kv" if self.name == "kv" else f"treft.kv[{self.name}]"
        return f"{base}.{field}" if field else base

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
    def _build_cache(self, reference: Reference, entries: list[tuple[CacheKey, list[int], list[int]]]) -> None:
        """Reference K/V of every cache entry, from the initial model (the policy itself before the first
        update, else the frozen copy, e.g. when resuming a full finetune from a checkpoint); the same entries
        in the same order on every rank."""
        ref_model = reference.model(allow_initial_policy=True)
        own = ref_model is not reference.policy
        capture = ActivationCapture(self._modules(ref_model)) if own else self._policy
        device = next(ref_model.parameters()).device
        parts: list[list[torch.Tensor]] = [[] for _ in capture.modules]
        offset = 0
        try:
            for key, context, positions in entries:
                ids = torch.tensor([context], device=device)
                index = torch.tensor(positions, device=device)
                with capture.armed(index) as outs:
                    reference.forward({"input_ids": ids}, logits=False, allow_initial_policy=True)
                for slot, out in enumerate(outs):
                    parts[slot].append(out.float())
                self._cache_offsets[key] = offset
                offset += len(positions)
        finally:
            if own:
                capture.remove()
        self._cache = [torch.cat(p) for p in parts] if entries else None
        prefixes = sum(key[0] == SEG_PREFIX for key in self._cache_offsets)
        LOG.info("%s: cached reference K/V for %d distinct prefix(es)%s, %d tokens", self._key(), prefixes,
                 " and the fixed postfix" if self._fixed_postfix else "", offset)

    # -- per step ----------------------------------------------------------------------------------
    def _selected(self, batch: StepBatch) -> torch.Tensor:
        if batch.segments is None:
            raise RuntimeError(
                "treft.kv: the batch has no template segments; TReFT needs `type: chat_template` datasets"
            )
        codes = torch.tensor(self.codes, device=batch.segments.device, dtype=batch.segments.dtype)
        selected = torch.isin(batch.segments, codes)
        if self._fixed_postfix is not None:
            selected = self._drop_mismatched_postfixes(batch, selected)
        self._account(batch, selected)
        return selected

    def _drop_mismatched_postfixes(self, batch: StepBatch, selected: torch.Tensor) -> torch.Tensor:
        """Fixed reference: postfix spans whose tokens differ from the reference postfix are not regularized
        (never compared position by position with a different sequence); counted and reported."""
        runs = token_runs(batch, selected)
        ids, segments = batch.input_ids.cpu(), batch.segments.cpu()
        reference = torch.tensor(self._fixed_postfix)
        dropped = []
        for row, start, end in runs.tolist():
            if int(segments[row, start]) != SEG_POSTFIX:
                continue
            self.postfixes_seen += 1
            span = ids[row, start:end]
            if len(span) != len(reference) or not bool((span == reference).all()):
                dropped.append((row, start, end, span.tolist()))
        if not dropped:
            return selected
        self.postfixes_mismatched += len(dropped)
        selected = selected.clone()
        for row, start, end, _ in dropped:
            selected[row, start:end] = False
        if not self._warned_mismatch:
            self._warned_mismatch = True
            LOG.warning("%s: %d postfix span(s) in this batch differ from the fixed reference postfix (e.g. %s vs "
                        "%s); they are not regularized. The total is reported at the end of training.",
                        self._key(), len(dropped), dropped[0][3], list(self._fixed_postfix))
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
                "%s: %d sample(s) in this batch have no %r tokens (spans not found or truncated away); "
                "they train with the SFT loss only. The total is reported at the end of training.",
                self._key(), skipped, self.cfg.tokens,
            )

    def reference_request(self, batch: StepBatch, state: CaptureStep) -> ReferenceRequest | None:
        if self._cache is not None:
            return None
        return super().reference_request(batch, state)

    def _cached_reference(self, batch: StepBatch, state: CaptureStep) -> list[torch.Tensor]:
        """Cached reference rows for the captured positions, span by span (row-major, as captured)."""
        selected = torch.zeros_like(batch.valid)
        selected[state.pairs[:, 0], state.pairs[:, 1]] = True
        ids, segments = batch.input_ids.cpu(), batch.segments.cpu()
        rows: list[torch.Tensor] = []
        for row, start, end in token_runs(batch, selected).tolist():
            code = int(segments[row, start])
            key = (code, tuple(ids[row, start:end].tolist()))
            begin = self._cache_offsets.get(key)
            if begin is None:
                raise RuntimeError(
                    f"{self._key()}: a prefix not seen in the training dataset reached training; set "
                    f"`{self._key('max_cached_prefixes')}: 0` to compute references every step"
                    if code == SEG_PREFIX else f"{self._key()}: a postfix differing from the fixed reference was "
                    "selected (internal error)")
            rows.append(torch.arange(begin, begin + end - start))
        index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
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

    def weighted(self, term: torch.Tensor, step: int, max_steps: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        """``max(weight · term − threshold, 0)`` inside ``active_steps``, None outside (or with weight 0)."""
        active = self.cfg.is_active(step, max_steps)
        penalty = None
        if active and self.weight > 0:
            penalty = self.weight * term
            if self.cfg.threshold:
                penalty = (penalty - self.cfg.threshold).clamp_min(0.0)
        logged = {f"treft/{self.name}": float(term.detach())}
        if self.cfg.threshold or self.cfg.active_steps is not None:
            logged[f"treft/{self.name}_active"] = float(active)
            logged[f"treft/{self.name}_penalty"] = 0.0 if penalty is None else float(penalty.detach())
        return penalty, logged

    def summary(self) -> str | None:
        lines = []
        if self.samples_skipped:
            lines.append(f"{self._key()}: {self.samples_skipped} of {self.samples_seen} training samples had no "
                         f"{self.cfg.tokens!r} tokens and trained with the SFT loss only")
        if self.postfixes_mismatched:
            lines.append(f"{self._key()}: {self.postfixes_mismatched} of {self.postfixes_seen} postfix spans differed "
                         "from the fixed reference postfix and were not regularized")
        return "\n".join(lines) or None


def token_runs(batch: StepBatch, selected: torch.Tensor) -> torch.Tensor:
    """[N, 3] (row, start, end): maximal runs of selected positions with one segment code in one sample,
    in row-major order."""
    seg, sample = batch.segments, batch.sample_index
    joined = torch.zeros_like(selected)  # position t continues the run of t − 1
    joined[:, 1:] = selected[:, 1:] & selected[:, :-1] & (seg[:, 1:] == seg[:, :-1]) & (sample[:, 1:] == sample[:, :-1])
    continues = torch.zeros_like(selected)
    continues[:, :-1] = joined[:, 1:]
    starts, ends = (selected & ~joined).nonzero().cpu(), (selected & ~continues).nonzero().cpu()
    return torch.stack([starts[:, 0], starts[:, 1], ends[:, 1] + 1], dim=1)


def _first_run(segments, code: int) -> list[int]:
    """Positions of the first contiguous run of ``code`` in ``segments``."""
    positions: list[int] = []
    for i, s in enumerate(segments):
        if s == code:
            positions.append(i)
        elif positions:
            break
    return positions


def _leading(seq, value: int) -> int:
    n = 0
    for s in seq:
        if s != value:
            break
        n += 1
    return n
