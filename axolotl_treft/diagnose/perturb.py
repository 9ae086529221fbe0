"""Token perturbation: region tokens replaced by their nearest neighbours in the input-embedding matrix.

BOS and every special token (the template's markers, pad, EOS ...) are never replaced and never chosen: the
perturbation changes the words of a region, not the structure the tokenizer and template give it.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

import torch

NEIGHBOURS_TOP = 5
CHUNK_BYTES = 64 * 2**20  # float32 rows scored at once (a 152k × 4096 matrix is never copied whole)


def special_ids(tokenizer) -> set[int]:
    """BOS, every special token and every added token of ``tokenizer`` (template markers such as Qwen's
    ``<think>`` / ``<tool_call>`` are added tokens its tokenizer does not mark special)."""
    ids = set(tokenizer.all_special_ids)
    ids |= set(getattr(tokenizer, "added_tokens_decoder", None) or {})
    if tokenizer.bos_token_id is not None:
        ids.add(tokenizer.bos_token_id)
    return ids


class NeighbourTable:
    """Top-``top`` nearest neighbours of a token by cosine in an input-embedding matrix (itself and ``exclude``
    never). Scores are computed per token in float32 blocks of ``CHUNK_BYTES``; the matrix is not copied."""

    def __init__(self, embeddings: torch.Tensor, vocab_size: int | None = None, top: int = NEIGHBOURS_TOP,
                 exclude: Collection[int] = ()):
        self.embeddings = embeddings.detach()[: vocab_size or embeddings.shape[0]]
        n, width = self.embeddings.shape
        self.chunk_rows = max(1, CHUNK_BYTES // (4 * width))
        with torch.no_grad():
            self.norms = torch.cat([self.embeddings[s:s + self.chunk_rows].float().norm(dim=-1)
                                    for s in range(0, n, self.chunk_rows)]).clamp_min(1e-12)
        self.exclude = torch.tensor(sorted(i for i in exclude if 0 <= i < n), dtype=torch.long)
        self.top = top
        self._cache: dict[int, list[int]] = {}

    def __call__(self, token: int) -> list[int]:
        if token not in self._cache:
            with torch.no_grad():
                query = self.embeddings[token].float()
                scores = torch.cat([(self.embeddings[s:s + self.chunk_rows].float() @ query)
                                    for s in range(0, self.embeddings.shape[0], self.chunk_rows)]) / self.norms
                scores[token] = -float("inf")
                scores[self.exclude.to(scores.device)] = -float("inf")
                self._cache[token] = scores.topk(self.top).indices.tolist()
        return self._cache[token]


def perturb_ids(ids: Sequence[int], positions: Sequence[int], k: int, table: NeighbourTable,
                rng: random.Random, keep: Collection[int] = ()) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Replace ``k`` random ``positions`` (all if fewer) by a random top neighbour: (ids, [(pos, old, new)]).

    Positions holding a token in ``keep`` (BOS, special tokens) are never chosen.
    """
    out = list(ids)
    eligible = [p for p in positions if out[p] not in keep]
    chosen = sorted(rng.sample(eligible, min(k, len(eligible))))
    changes = []
    for pos in chosen:
        new = rng.choice(table(out[pos]))
        changes.append((pos, out[pos], new))
        out[pos] = new
    return out, changes
