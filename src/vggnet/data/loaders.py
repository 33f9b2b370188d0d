"""A ``DataLoader`` for the streaming path with defaults that suit a two-core machine.

Two workers at most (more would fight the model for the cores), kept alive between epochs
(re-forking them each epoch costs seconds), pinned memory only when there is a GPU to copy to,
corrupt files dropped by :func:`collate_skip_none`, and a seeded generator so the shuffle order
is reproducible and can be re-seeded per epoch.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .folder import collate_skip_none


def build_dataloader(dataset: Dataset, batch_size: int, train: bool, workers: int | None = None,
                     seed: int = 0, distributed: bool = False) -> DataLoader:
    """Shuffled, last partial batch dropped when ``train``; in order and complete otherwise."""
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    sampler = None
    if distributed:
        import torch.distributed as dist  # lazily: the data package must not pull in the distributed stack

        ready = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if ready else (1, 0)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed,
                                     drop_last=train)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train if sampler is None else False, sampler=sampler,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        drop_last=train, collate_fn=collate_skip_none, generator=torch.Generator().manual_seed(seed),
    )
