"""Feature-space L2 (LDIFS): keep the residual stream of a few layers close to the initial model's.

For each sample and each chosen decoder layer l, the layer's output over the sample's real tokens is
flattened (tokens × hidden) and L2-normalized: φ_l = h_l / ‖h_l‖_F. The term is the squared distance of
the concatenated unit vectors, Σ_l ‖φ_l − φ_l^ref‖², averaged over the samples of the micro-batch
(packed samples are separate samples; padding is excluded). The trained model's features keep their
gradient (a public implementation computed them under no_grad, silently making the term a no-op).
"""

from __future__ import annotations

import torch

from ..args import FeatureL2Config
from ..capture import ActivationCapture, decoder_layers, layer_positions
from .base import CaptureStep, CapturingRegularizer, StepBatch


def layer_indices(spec: int | list[int], n_layers: int, given: bool = False) -> list[int]:
    """N evenly spaced layers (first and last included), or an explicit list (negatives count from the end).

    A count the user ``given`` that exceeds the model's layers is an error; the default count is capped.
    """
    from ..config_checks import check_layer_count, check_no_duplicate_layers

    if isinstance(spec, int):
        if given:
            check_layer_count(spec, n_layers)
        n = min(spec, n_layers)
        return sorted({round(i * (n_layers - 1) / max(1, n - 1)) for i in range(n)})
    check_no_duplicate_layers("treft.feature_l2.layers", spec, n_layers)
    return sorted(layer_positions(spec, n_layers, "treft.feature_l2.layers"))


def feature_distance(policy: list[torch.Tensor], reference: list[torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
    """Mean over samples of Σ_l ‖φ_l − φ_l^ref‖² with per-sample, per-layer Frobenius normalization.

    ``policy``/``reference``: per layer ``[N, H]`` rows; ``sample``: ``[N]`` sample id of each row.
    """
    ids, sample = torch.unique(sample, return_inverse=True)
    n = len(ids)
    total = policy[0].new_zeros(n, dtype=torch.float32)
    for h, h_ref in zip(policy, reference, strict=True):
        h, h_ref = h.float(), h_ref.float()
        norm = torch.zeros(n, device=h.device).index_add(0, sample, h.pow(2).sum(-1)).sqrt().clamp_min(1e-12)
        norm_ref = torch.zeros(n, device=h.device).index_add(0, sample, h_ref.pow(2).sum(-1)).sqrt().clamp_min(1e-12)
        diff = h / norm[sample, None] - h_ref / norm_ref[sample, None]
        total = total.index_add(0, sample, diff.pow(2).sum(-1))
    return total.mean()


class FeatureL2Regularizer(CapturingRegularizer):
    key = "feature_l2"

    def __init__(self, cfg: FeatureL2Config):
        super().__init__(cfg.weight)
        self.cfg = cfg

    def _modules(self, model) -> list:
        layers = decoder_layers(model)
        given = "layers" in self.cfg.model_fields_set
        return [layers[i] for i in layer_indices(self.cfg.layers, len(layers), given)]

    def setup(self, model, reference) -> None:
        self._policy = ActivationCapture(self._modules(reference.policy))
        self._reference = reference
        self._attach_reference(reference)

    def _selected(self, batch: StepBatch) -> torch.Tensor:
        return batch.valid

    def compute(self, batch: StepBatch, state: CaptureStep, outputs, reference, model) -> torch.Tensor:
        policy, ref = state.policy, state.reference
        if not len(state.pairs):
            return policy[0].sum() * 0.0
        self._require_gradient(policy, model)
        sample = batch.sample_index[state.pairs[:, 0], state.pairs[:, 1]]
        return feature_distance(policy, [r.to(policy[0].device) for r in ref], sample.to(policy[0].device))
