"""``train.sync_bn`` is checked before any data is loaded or the run folder is written (issue 19, item 2)."""

import pytest
import torch

from vggnet.engine import distributed, trainer
from vggnet.engine.distributed import Dist, check_sync_bn
from vggnet.engine.recipe import load_recipe

FAST = ["model.width=0.125", "data.image_size=32", "optim.batch_size=64", "train.threads=1",
        "train.precision=fp32", "train.channels_last=false", "schedule.epochs=1"]


class DataLoaded(Exception):
    """Raised in place of loading data: reaching it means the check let the run through."""


def test_cpu_processes_under_torchrun_are_refused_with_what_to_do():
    with pytest.raises(ValueError) as err:
        check_sync_bn(True, Dist(rank=0, world=2, device=torch.device("cpu")))
    message = str(err.value)
    assert "CUDA" in message and "train.sync_bn false" in message and "--set train.sync_bn=false" in message
    assert "2 torchrun processes" in message


def test_cuda_processes_pass_and_single_processes_get_a_note():
    assert check_sync_bn(True, Dist(rank=1, world=4, local_rank=1, device=torch.device("cuda", 1))) is None
    assert check_sync_bn(False, Dist(rank=0, world=2, device=torch.device("cpu"))) is None
    assert check_sync_bn(False, Dist()) is None
    note = check_sync_bn(True, Dist())  # one CPU process: batch norm sees the whole batch anyway
    assert note is not None and "ignored in a single process" in note
    assert "ignored" in check_sync_bn(True, Dist(device=torch.device("cuda", 0)))


def _no_data(*args, **kwargs):
    raise DataLoaded


def test_train_refuses_before_loading_data_or_writing_the_run_folder(tmp_path, monkeypatch):
    """The train entry as torchrun on two CPU processes would reach it: the refusal comes first."""
    monkeypatch.setattr(distributed, "setup", lambda device=None: Dist(rank=0, world=2, device=torch.device("cpu")))
    monkeypatch.setattr(distributed, "cleanup", lambda env: None)
    monkeypatch.setattr(trainer, "build_inputs", _no_data)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="sync_bn"):
        trainer.train(load_recipe("demo", [*FAST, "train.sync_bn=true"]), out)
    assert not out.exists()
    with pytest.raises(DataLoaded):  # the same run without sync_bn goes on to its data
        trainer.train(load_recipe("demo", [*FAST, "train.sync_bn=false"]), out)


def test_a_single_cpu_process_says_sync_bn_is_ignored_and_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "build_inputs", _no_data)
    with pytest.raises(DataLoaded):
        trainer.train(load_recipe("demo", [*FAST, "train.sync_bn=true"]), tmp_path / "run")
    assert "train.sync_bn: ignored in a single process" in capsys.readouterr().err
