"""DDP plumbing for ``torchrun``: gloo on CPU, nccl on GPU, rank-0-only side effects.

Elastic runs (``torchrun --nnodes 1:2 --rdzv-backend c10d --max-restarts N``): when a worker dies, torchrun stops
the others and starts every process again; each new process joins a fresh process group here and resumes from the
run folder's newest complete checkpoint, which :func:`same_checkpoint` makes every rank agree on.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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
        store = _round_store(world, int(os.environ.get("RANK", "0")))
        if store is None:  # a launcher other than torchrun's agent: env:// as it describes
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        else:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=store,
                                    rank=int(os.environ["RANK"]), world_size=world)
    rank = dist.get_rank() if dist.is_initialized() else 0
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart and rank == 0:  # the log of an elastic run says why it starts again
        limit = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?")
        print(f"torchrun restart {restart} (of at most {limit}): {world} processes joined a new process group",
              file=sys.stderr, flush=True)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def _round_store(world: int, rank: int) -> dist.Store | None:
    """torchrun's shared store, seen through a prefix that only this group of processes uses; None off torchrun.

    torchrun's agent keeps one store for the workers of every restart (``TORCHELASTIC_USE_AGENT_STORE``; torch
    2.14 reuses its server across rendezvous rounds), so a restarted group finds the keys of the group that died:
    gloo's connectFullMesh read a killed rank's address and failed "Connection refused", and nccl can read an old
    unique id (pytorch/pytorch#135712). ``TORCHELASTIC_RESTART_COUNT`` is no key: each node counts its own
    restarts (pytorch/pytorch#108158). So rank 0 names the round with a fresh random token, every other rank
    answers under that token with its own fresh id, and rank 0 publishes who answered: a rank that read an old
    token does not find its id there and reads again. No value from an earlier group can carry a fresh id.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    timeout = dist.constants.default_pg_timeout
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    me = uuid.uuid4().hex
    if rank == 0:
        token = me
        store.set("vggnet/round", token)
        members = [me] + [store.get(f"vggnet/{token}/ack/{r}").decode() for r in range(1, world)]
        store.set(f"vggnet/{token}/go", " ".join(members))
        return dist.PrefixStore(f"vggnet/{token}/", store)
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        token = store.get("vggnet/round").decode()
        store.set(f"vggnet/{token}/ack/{rank}", me)
        try:
            store.wait([f"vggnet/{token}/go"], timedelta(seconds=1))
        except dist.DistStoreError:  # rank 0 has not heard everyone yet
            continue
        if me in store.get(f"vggnet/{token}/go").decode().split():
            return dist.PrefixStore(f"vggnet/{token}/", store)
        time.sleep(0.05)  # an earlier group's token: rank 0 of this one has not written its own yet
    raise RuntimeError(f"rank {rank}: no process group formed within {timeout} (rank 0 never answered)")


def same_checkpoint(ckpts: list[Path], env: Dist) -> list[Path]:
    """The checkpoints to resume from, once every rank has checked that it sees rank 0's newest one.

    After a torchrun restart every rank reads the run folder again. A rank that saw another newest checkpoint (an
    ``--out`` on a disk that only some nodes share, a network filesystem that has not shown the last save yet)
    would start from other weights, optimizer state and step than rank 0 while DDP quietly broadcasts rank 0's
    parameters: a run that looks fine and is not. So the ranks compare their newest checkpoint's name and, if any
    differs from rank 0's, all of them refuse together (none is left waiting in a collective). Identity without
    a process group (one process, or a ``Dist`` built by hand).
    """
    if not env.enabled or not dist.is_initialized():
        return ckpts
    seen: list[str | None] = [None] * env.world
    dist.all_gather_object(seen, ckpts[-1].name if ckpts else None)
    bad = [r for r, name in enumerate(seen) if name != seen[0]]
    if bad:
        where = ckpts[-1].parent if ckpts else "its run folder"
        raise UsageError(f"rank 0 resumes from {seen[0] or 'scratch (no checkpoint)'}, but "
                         + ", ".join(f"rank {r} sees {seen[r] or 'no checkpoint'}" for r in bad)
                         + f" (rank {env.rank} looked in {where}); put --out on a filesystem every node shares")
    return ckpts


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
