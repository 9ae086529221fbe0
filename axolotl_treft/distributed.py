"""Ranks, and the one way start-up work is computed once and shared by every rank.

Work that runs before training (persona steering's direction, retain selection) is cached in a file under
``dataset_prepared_path`` named by a digest of its inputs, written atomically by rank 0. Who computes depends on
the work:

* a forward pass of the trained model (the steering direction) runs on every rank, because ZeRO-3 partitions the
  weights and each forward needs every rank; :func:`all_ranks` decides "cached" for all of them at once and
  :func:`from_main_process` hands rank 0's result to the others;
* work on models loaded apart from the trainer (retain selection) runs on rank 0 while the others wait
  (:func:`main_process_first`), and every rank then reads rank 0's file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path


def process_group():
    """``torch.distributed`` while a process group is up, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_main_process() -> bool:
    """Rank 0 of the process group; with none up (a single process, or after Axolotl tore the group down before
    its second ``post_train`` call), the launcher's ``RANK`` / ``LOCAL_RANK``."""
    dist = process_group()
    if dist is not None:
        return dist.get_rank() == 0
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def all_ranks(flag: bool, device=None) -> bool:
    """Whether ``flag`` holds on every rank (the same answer on all of them)."""
    import torch

    dist = process_group()
    if dist is None:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def from_main_process(tensor, device=None):
    """Rank 0's ``tensor`` on every rank (on the CPU)."""
    dist = process_group()
    if dist is None:
        return tensor
    value = tensor.to(device)
    dist.broadcast(value, src=0)
    return value.cpu()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first; the other ranks wait at a barrier, then run it (and find rank 0's files)."""
    from axolotl.utils.distributed import zero_first

    with zero_first(is_main_process()):
        yield


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename onto ``path``: the file is whole or absent, whatever stops the process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)
