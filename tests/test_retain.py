"""Data interleaving: exact mix counts, seed reproducibility, up- and down-sampling."""

from __future__ import annotations

import pytest
from datasets import Dataset

from axolotl_treft.datasets import mix_with_retain


def make(n, tag):
    return Dataset.from_dict({"input_ids": [[tag, i] for i in range(n)], "labels": [[tag, i] for i in range(n)]})


@pytest.mark.parametrize(("n_train", "n_retain", "ratio", "expected"), [
    (240, 20, 0.2, 60),   # up-sampled: 3 full copies
    (240, 100, 0.2, 60),  # down-sampled without replacement
    (100, 7, 0.5, 100),   # 14 copies + 2
    (50, 10, 0.0, 0),
])
def test_mix_has_the_requested_ratio(n_train, n_retain, ratio, expected):
    mixed, counts = mix_with_retain(make(n_train, 0), make(n_retain, 1), ratio, seed=3)
    tags = [ids[0] for ids in mixed["input_ids"]]
    assert tags.count(0) == n_train and tags.count(1) == expected == counts["retain"]
    assert counts["retain_fraction"] == pytest.approx(ratio, abs=1 / (n_train + expected + 1))
    retain_ids = sorted(ids[1] for ids in mixed["input_ids"] if ids[0] == 1)
    if expected <= n_retain:
        assert len(set(retain_ids)) == expected  # no duplicates when down-sampling
    else:  # every retain example appears floor or ceil(expected / n_retain) times
        per = {i: retain_ids.count(i) for i in range(n_retain)}
        assert set(per.values()) <= {expected // n_retain, expected // n_retain + 1}


def test_mix_is_reproducible_by_seed():
    a, _ = mix_with_retain(make(240, 0), make(20, 1), 0.2, seed=7)
    b, _ = mix_with_retain(make(240, 0), make(20, 1), 0.2, seed=7)
    c, _ = mix_with_retain(make(240, 0), make(20, 1), 0.2, seed=8)
    assert a["input_ids"] == b["input_ids"]
    assert a["input_ids"] != c["input_ids"]
