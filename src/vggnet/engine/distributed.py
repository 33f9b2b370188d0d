"""DDP plumbing for ``torchrun``: gloo on CPU, nccl on GPU, rank-0-only side effects."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vggnet.errors import UsageError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str | None = None) -> Dist:
    """Join the process group that torchrun describes in the environment (a no-op when run plainly)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def check_sync_bn(sync_bn: bool, env: Dist) -> str | None:
    """``train.sync_bn`` checked before any data is loaded or the run folder is written.

    torch's SyncBatchNorm runs only on CUDA devices: under torchrun on CPUs (gloo) it would fail at the first
    forward pass ("SyncBatchNorm layers only work with GPU modules"), so that is refused here, with what to do.
    In a single process batch norm already sees the whole batch, so the setting changes nothing: it is ignored
    and the returned note (None when there is nothing to say) tells the user so.
    """
    if not sync_bn:
        return None
    if not env.enabled:
        return ("train.sync_bn: ignored in a single process (batch norm already sees the whole batch); "
                "it applies under torchrun with CUDA devices")
    if env.device.type != "cuda":
        raise UsageError(f"train.sync_bn: true needs CUDA devices (torch's SyncBatchNorm only runs on GPUs), but "
                         f"these {env.world} torchrun processes run on the {env.device.type} (gloo). Run them on CUDA "
                         "devices, or set train.sync_bn false (--set train.sync_bn=false): each process's batch norm "
                         "then normalises its own shard of the batch, and the running statistics are still averaged "
                         "across processes at the end of every epoch")
    return None


def all_sum(values: torch.Tensor, env: Dist) -> torch.Tensor:
    """Sum a tensor of counts over ranks (identity without DDP)."""
    if env.enabled:
        values = values.to(env.device)
        dist.all_reduce(values)
    return values.cpu()


@torch.no_grad()
def average_buffers(model: torch.nn.Module, env: Dist) -> None:
    """Average BN running statistics over ranks at epoch end.

    DDP keeps parameters identical but each rank's last forward updates its own running stats;
    averaging makes evaluation, checkpoints and every rank's model the same. Modules held in eval mode
    (frozen BN when fine-tuning) update nothing, and a sum divided by the world size is not always the
    value itself in floating point, so their buffers are left alone.
    """
    if not env.enabled:
        return
    for module in model.modules():
        if not module.training:
            continue
        for buffer in module.buffers(recurse=False):
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= env.world


def barrier(env: Dist) -> None:
    if env.enabled:
        dist.barrier()


def cleanup(env: Dist) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
