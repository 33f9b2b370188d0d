"""Elastic training under torchrun (issue 33, part 3): a worker killed mid-epoch, torchrun restarts the group, the
run resumes from its newest complete checkpoint and ends with the weights of a run that was never interrupted.

Two CPU processes (gloo) on loopback, the c10d rendezvous of ``torchrun --nnodes 1:2``. The faults are planted by a
test-only wrapper around ``vggnet.cli.main`` (argv: what to kill, then the ``vggnet`` arguments), so the engine
carries no fault-injection code: rank 1 SIGKILLs itself at a global step, or rank 0 SIGKILLs itself halfway through
writing a checkpoint, on torchrun's first attempt only (``TORCHELASTIC_RESTART_COUNT`` tells attempts apart).
Why the weights can be equal bit for bit: fp32 on one thread per process, deterministic kernels, the same world
size on every attempt (so each rank's shard and gloo's two-process reduction order are the same), and a checkpoint
holding every rank's RNG state and the loader's position (see tests/test_engine_train.py for one process).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vggnet.engine.distributed import Dist
from vggnet.engine.inputs import build_inputs
from vggnet.engine.recipe import load_recipe
from vggnet.models import load_checkpoint

TORCHRUN = Path(sys.executable).parent / "torchrun"
FAST = ["model.width=0.125", "data.image_size=32", "optim.batch_size=64", "train.threads=1",
        "train.deterministic=true", "train.precision=fp32", "train.channels_last=false", "schedule.epochs=2"]

pytestmark = pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None,
                                reason="torchrun not installed")

FAULTS = """
import os, signal, sys
from vggnet.engine import checkpoint, trainer
fault, at = sys.argv[1], int(sys.argv[2])
first_attempt = os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
rank = os.environ["RANK"]

if fault == "kill-rank1-at-step":  # the schedule asks for the lr once per step, before the forward pass
    lr_at = trainer.LRSchedule.lr_at
    def lr_at_or_die(self, step):
        if step == at and rank == "1" and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
        return lr_at(self, step)
    trainer.LRSchedule.lr_at = lr_at_or_die
elif fault == "kill-rank0-mid-save":  # model.safetensors is in the temporary folder, state.pt is not yet
    save = checkpoint.save_checkpoint
    def save_then_die(model, path, metadata):
        save(model, path, metadata)
        if metadata["epoch"] == at and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_checkpoint = save_then_die
elif fault == "rank1-sees-no-checkpoint":  # a node whose disk lacks the run folder
    listed = trainer.list_checkpoints
    trainer.list_checkpoints = lambda out: [] if rank == "1" else listed(out)
from vggnet.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, restarts: int, program: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --nnodes 1:2 ... PROGRAM train ...``; last_call_timeout=1: the rendezvous waits 1 s, not 30, for a
    second node that never comes."""
    cmd = [str(TORCHRUN) if TORCHRUN.exists() else "torchrun", "--nnodes", "1:2", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
           "--rdzv-conf", "last_call_timeout=1", "--max-restarts", str(restarts), *program,
           "train", "--recipe", "demo", "--out", str(out), "--no-progress", "--no-reference", "--set", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _faulty(tmp_path: Path, fault: str, at: int) -> list[str]:
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    return [str(script), fault, str(at)]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(path)
    return model.state_dict()


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key  # bit for bit


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """Run A: `torchrun ... -m vggnet train`, never interrupted (the module the documented command runs)."""
    out = tmp_path_factory.mktemp("elastic") / "straight"
    result = _torchrun(out, 1, ["-m", "vggnet"])
    if result.returncode != 0 and any(s in result.stderr for s in ("RendezvousConnectionError", "EADDRINUSE",
                                                                   "Address already in use", "Cannot assign")):
        pytest.skip(f"torchrun's c10d rendezvous cannot bind on 127.0.0.1 here: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_worker_killed_mid_epoch_restarts_the_group_and_ends_with_the_uninterrupted_weights(straight, tmp_path):
    steps = len(build_inputs(load_recipe("demo", FAST), Dist(rank=0, world=2)).train)  # per epoch, each rank
    out = tmp_path / "killed"
    result = _torchrun(out, 1, _faulty(tmp_path, "kill-rank1-at-step", steps + 5))  # epoch 2's 6th step
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exitcode: -9" in result.stderr  # torchrun saw rank 1 die of the SIGKILL ...
    assert "torchrun restart 1 (of at most 1): 2 processes joined a new process group" in result.stderr  # ... restarted
    assert f"resuming {out} from epoch 1 of 2 (checkpoints/epoch-0001)" in result.stdout
    assert json.loads((out / "final.json").read_text())["epoch"] == 2
    assert _epochs(out) == [1, 2]  # rank 0 alone logs: one line an epoch, epoch 2's only from the second attempt
    _assert_same_weights(straight / "checkpoints" / "epoch-0002" / "model.safetensors",
                         out / "checkpoints" / "epoch-0002" / "model.safetensors")
    _assert_same_weights(straight / "last.safetensors", out / "last.safetensors")


def test_a_checkpoint_half_written_when_rank0_dies_is_never_resumed_from(straight, tmp_path):
    out = tmp_path / "killed"
    result = _torchrun(out, 1, _faulty(tmp_path, "kill-rank0-mid-save", 2))
    assert result.returncode == 0, result.stderr[-3000:]
    half = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".epoch-0002.")]
    assert len(half) == 1 and (half[0] / "model.safetensors").is_file() and not (half[0] / "state.pt").exists()
    assert f"resuming {out} from epoch 1 of 2 (checkpoints/epoch-0001)" in result.stdout  # not from the half
    assert _epochs(out) == [1, 2]
    _assert_same_weights(straight / "checkpoints" / "epoch-0002" / "model.safetensors",
                         out / "checkpoints" / "epoch-0002" / "model.safetensors")


def test_ranks_that_see_different_newest_checkpoints_refuse_together(straight, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(straight, out)
    result = _torchrun(out, 0, _faulty(tmp_path, "rank1-sees-no-checkpoint", 0))
    assert result.returncode != 0
    line = "rank 0 resumes from epoch-0002, but rank 1 sees no checkpoint"
    assert result.stderr.count(line) == 2, result.stderr[-3000:]  # both ranks say it; neither waits forever
    assert "put --out on a filesystem every node shares" in result.stderr
