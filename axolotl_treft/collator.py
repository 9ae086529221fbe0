"""Carry ``treft_segments`` through whatever collator Axolotl chose (padding or sample packing).

Axolotl picks among several collators; rather than mirror that choice, the trainer wraps the collator
instance it was given. The wrapper takes the segments out of each sample, lets the inner collator build
the batch, then lays the segments out the same way: samples of a packed row concatenated in order, each
cut to its (possibly truncated) ``input_ids`` length, and padding marked ``-1`` on the tokenizer's side.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .spans import PAD_SEGMENT, SEGMENTS_KEY


def _row_segments(samples: list[dict]) -> np.ndarray:
    parts = []
    for sample in samples:
        seg = np.asarray(sample.pop(SEGMENTS_KEY), dtype=np.int8)
        n = len(sample["input_ids"])
        if len(seg) < n:
            seg = np.concatenate([seg, np.zeros(n - len(seg), dtype=np.int8)])
        parts.append(seg[:n])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int8)


class SegmentsCollator:
    """Wraps a collator; adds a ``treft_segments`` ``[B, T]`` int8 tensor (``-1`` = padding)."""

    def __init__(self, inner, padding_side: str = "right"):
        self.inner = inner
        self.padding_side = padding_side

    def __getattr__(self, name: str) -> Any:  # behave like the wrapped collator
        # only called for names not found normally; copy/pickle probe dunders on an instance without `inner`
        if name == "inner" or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, features, *args, **kwargs):
        if not features:
            return self.inner(features, *args, **kwargs)
        packed = isinstance(features[0], list)
        bins = features if packed else [[f] for f in features]
        if SEGMENTS_KEY not in bins[0][0]:
            return self.inner(features, *args, **kwargs)
        bins = [[dict(s) for s in b] for b in bins]  # never mutate the dataset's rows
        rows = [_row_segments(b) for b in bins]
        batch = self.inner(bins if packed else [b[0] for b in bins], *args, **kwargs)
        width = batch["input_ids"].shape[-1]
        out = torch.full((len(rows), width), PAD_SEGMENT, dtype=torch.int8)
        for i, seg in enumerate(rows):
            seg_t = torch.from_numpy(seg[:width])
            if self.padding_side == "left":
                out[i, width - len(seg_t):] = seg_t
            else:
                out[i, : len(seg_t)] = seg_t
        batch[SEGMENTS_KEY] = out
        return batch
