"""The training engine end to end on the embedded digits: resume, kill, DDP, errors, artifacts."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vggnet.engine.distributed import Dist
from vggnet.engine.inputs import build_inputs
from vggnet.engine.recipe import load_recipe
from vggnet.engine.trainer import ResumeError, train
from vggnet.models import load_checkpoint

FAST = ["model.width=0.125", "data.image_size=32", "optim.batch_size=64", "train.threads=1",
        "train.deterministic=true", "train.precision=fp32", "train.channels_last=false"]


def recipe(*overrides):
    return load_recipe("demo", [*FAST, *overrides])


def weights(run: Path, epoch: int) -> dict:
    model, _ = load_checkpoint(run / "checkpoints" / f"epoch-{epoch:04d}" / "model.safetensors")
    return model.state_dict()


def test_run_folder_has_everything(tmp_path):
    out = tmp_path / "run"
    result = train(recipe("schedule.epochs=2"), out)
    assert result["epoch"] == 2 and 0 <= result["val_top1"] <= 100
    # val top-1 recomputed here, without the engine's evaluate: epoch 2's weights on the validation split
    net, _ = load_checkpoint(out / "last.safetensors")
    hits = seen = 0
    with torch.no_grad():
        for images, targets in build_inputs(recipe("schedule.epochs=2"), Dist()).val:
            hits += int((net.eval()(images).argmax(1) == targets).sum())
            seen += len(targets)
    assert seen == 359  # the demo's 20 % of 1,797 digits
    assert result["val_top1"] == pytest.approx(100 * hits / seen, abs=1e-9)
    assert result["val_top1"] > 50  # ten classes: chance is 10 %
    for name in ("recipe.yaml", "metrics.jsonl", "metrics.csv", "curves.png", "confusion.png", "final.json",
                 "last.safetensors", "best.safetensors"):
        assert (out / name).is_file(), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    for key in ("train_loss", "val_top1", "val_top5", "lr", "img_per_s", "data_wait_frac", "epoch_time"):
        assert key in json.loads(lines[-1])
    model, extra = load_checkpoint(out / "last.safetensors")
    assert extra["classes"] == [str(i) for i in range(10)] and extra["epoch"] == 2
    assert any((out / "tb").iterdir())


def test_two_epochs_equal_one_plus_resume_plus_one(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(recipe("schedule.epochs=2", "model.dropout=0.3"), straight)
    train(recipe("schedule.epochs=2", "model.dropout=0.3", "train.stop_after_epoch=1"), resumed)
    assert not (resumed / "checkpoints" / "epoch-0002").exists()
    first = capsys.readouterr()
    assert "resuming" not in first.out
    train(recipe("schedule.epochs=2", "model.dropout=0.3"), resumed)  # picks up epoch 1's checkpoint
    second = capsys.readouterr()
    assert f"resuming {resumed} from epoch 1 of 2 (checkpoints/epoch-0001), continuing with epoch 2\n" in second.out
    # progress=None (the CLI's default) off a terminal: epochs shorter than 30 s print only their epoch line
    for captured in (first, second):
        assert not [line for line in captured.err.splitlines() if line.startswith(("epoch ", "validation "))]
    assert "epoch 2/2  train loss" in second.out
    a, b = weights(straight, 2), weights(resumed, 2)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    epochs = [json.loads(line)["epoch"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_resume_with_ema_and_optimizer_state(tmp_path):
    straight, resumed = tmp_path / "s", tmp_path / "r"
    extra = ("train.ema=0.9", "optim.name=adamw", "optim.lr=0.002", "schedule.name=cosine")
    train(recipe("schedule.epochs=2", *extra), straight)
    train(recipe("schedule.epochs=2", "train.stop_after_epoch=1", *extra), resumed)
    train(recipe("schedule.epochs=2", *extra), resumed)
    a = load_checkpoint(straight / "checkpoints/epoch-0002/ema.safetensors")[0].state_dict()
    b = load_checkpoint(resumed / "checkpoints/epoch-0002/ema.safetensors")[0].state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_resume_refuses_another_model(tmp_path):
    train(recipe("schedule.epochs=1"), tmp_path)
    with pytest.raises(ResumeError, match="model"):
        train(recipe("schedule.epochs=2", "model.name=vgg13_bn"), tmp_path)


def test_resume_refuses_other_classes(tmp_path):
    data = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (data / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), (i * 40, 10, 200 if cls == "cat" else 0)).save(data / cls / f"{i}.png")
    run = tmp_path / "run"
    train(load_recipe("demo", [*FAST, "schedule.epochs=1", "data.dataset=folder", f"data.path={data}",
                               "data.val_fraction=0.34", "optim.batch_size=4"]), run)
    (data / "bird").mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (0, i * 40, 0)).save(data / "bird" / f"{i}.png")
    with pytest.raises(ResumeError, match="classes"):
        train(load_recipe("demo", [*FAST, "schedule.epochs=2", "data.dataset=folder", f"data.path={data}",
                                   "data.val_fraction=0.34", "optim.batch_size=4"]), run)


def test_keep_n_and_full_disk(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(recipe("schedule.epochs=3", "train.keep=2"), out)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["epoch-0002", "epoch-0003"]
    import vggnet.engine.checkpoint as ck

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", disk_full)
    with pytest.warns(UserWarning, match="previous one is intact"):
        train(recipe("schedule.epochs=4", "train.keep=2"), out)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["epoch-0002", "epoch-0003"]
    assert load_checkpoint(out / "last.safetensors")[1]["epoch"] == 3


def test_missing_data_folder_is_clear(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match="nope"):
        train(load_recipe("demo", [*FAST, "data.dataset=folder", f"data.path={tmp_path / 'nope'}"]), tmp_path / "r")


def _cli(*args, env=None):
    return [sys.executable, "-m", "vggnet", "train", *args]


# `vggnet train` ARGS twice in one process, the first time stopping after epoch 1, with the progress interval cut
# from 30 s to 0 (a line per batch), so that a tiny run shows what a long one prints every 30 s.
TRAIN_TWICE = """
import sys
import vggnet.progress
from vggnet.engine import evaluation
vggnet.progress.LOG_INTERVAL_S = evaluation.LOG_INTERVAL_S = 0.0
from vggnet.cli import main
if main([*sys.argv[1:], "train.stop_after_epoch=1"]) != 0:
    sys.exit(1)
sys.exit(main(sys.argv[1:]))
"""


def test_under_a_pipe_progress_comes_as_lines_with_time_left_and_a_resume_says_so(tmp_path):
    """`vggnet train ... 2>&1 | cat`: the default --progress writes whole lines (no carriage returns) with the
    epoch's and the whole run's time left, validation included; the resumed run names its epoch and checkpoint."""
    out = tmp_path / "run"
    args = ["train", "--recipe", "demo", "--out", str(out), "--set", *FAST, "schedule.epochs=3"]
    proc = subprocess.run([sys.executable, "-c", TRAIN_TWICE, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    text = proc.stdout
    assert "\r" not in text
    lines = text.splitlines()
    for epoch in (1, 2, 3):
        bar = [line for line in lines if line.startswith(f"epoch {epoch}/3: ")]
        assert bar and all(" batch (" in line and " left, " in line for line in bar), (epoch, bar[:3])
        assert any(line.startswith(f"validation {epoch}/3: ") for line in lines), epoch
    # the run's estimate beside the epoch's, where later epochs remain (the first call stops after epoch 1)
    assert any("run_left=" in line for line in lines if line.startswith("epoch 2/3: "))
    assert not any("run_left=" in line for line in lines if line.startswith(("epoch 1/3: ", "epoch 3/3: ")))
    resume = [line for line in lines if line.startswith("resuming ")]
    assert resume == [f"resuming {out} from epoch 1 of 3 (checkpoints/epoch-0001), continuing with epoch 2"]
    assert lines.index(resume[0]) < min(i for i, line in enumerate(lines) if line.startswith("epoch 2/3"))


def test_without_tensorboard_the_run_says_why_and_goes_on(tmp_path, capsys, monkeypatch):
    """TensorBoard is the default tracker but an optional extra: without it the run prints one line and trains."""
    from vggnet.engine.artifacts import RunLogger

    for name in [m for m in sys.modules if m.split(".")[0] == "tensorboard" or m.startswith("torch.utils.tensorboard")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `from torch.utils.tensorboard ...` fails
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    out = tmp_path / "run"
    result = train(recipe("schedule.epochs=1"), out)
    assert result["epoch"] == 1 and (out / "last.safetensors").is_file() and not (out / "tb").exists()
    err = capsys.readouterr().err
    assert err.count("no tb/: TensorBoard is not installed (pip install 'vggnet[tensorboard]'), or set "
                     "train.tracking: none\n") == 1, err
    assert RunLogger(tmp_path / "quiet", tensorboard=False).tensorboard_note is None  # train.tracking: none


# `vggnet train` in a child process that SIGKILLs itself as it is about to take global step KILL_AT (argv[1]):
# a deterministic point inside an epoch, not a timer. The hook only watches the schedule's step counter.
KILL_AT_STEP = """
import os, signal, sys
from vggnet.engine import trainer
kill_at, lr_at = int(sys.argv[1]), trainer.LRSchedule.lr_at

def lr_at_or_die(self, step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return lr_at(self, step)

trainer.LRSchedule.lr_at = lr_at_or_die
from vggnet.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Killed after step 7 of epoch 2 (of 2), resumed from epoch 1's checkpoint: the partial epoch is redone
    with the data order, augmentation and dropout streams it had, so the weights equal an uninterrupted run's."""
    extra = ["schedule.epochs=2"]  # the demo recipe: dropout 0.2, flip/crop augmentation, one-cycle schedule
    steps = len(build_inputs(recipe(*extra), Dist()).train)
    kill_at = steps + 7  # global step index: the 8th step of epoch 2
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    args = ["--recipe", "demo", "--out", str(killed), "--set", *FAST, *extra]
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STEP, str(kill_at), "train", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["epoch-0001"]  # epoch 2 never finished
    assert [json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()] == [1]
    result = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300)  # resumes from epoch 1
    assert result.returncode == 0, result.stderr[-2000:]
    epochs = [json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    train(recipe(*extra), straight)
    a, b = weights(straight, 2), weights(killed, 2)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit: deterministic fp32 on one CPU thread


# `vggnet train` under torchrun, each rank recording through the public TrainHooks the sample indices of its
# first epoch and a digest of its final weights (argv: the `vggnet` arguments).
RECORD_RANKS = """
import json, os, sys
from pathlib import Path
from vggnet.engine import TrainHooks, trainer

seen, plain_train = {}, trainer.train

def check_inputs(inputs):
    inputs.train.set_epoch(1)  # the order the loop gives epoch 1
    seen["indices"] = inputs.train.epoch_indices().tolist()

def wrap_model(model, inputs):
    seen["model"] = model  # the very module DDP trains: its weights are final when train returns
    return model

def recording_train(recipe, out_dir, **kwargs):
    result = plain_train(recipe, out_dir, hooks=TrainHooks(check_inputs=check_inputs, wrap_model=wrap_model),
                         **kwargs)
    digest = sum(float(p.double().sum()) * (i + 1) for i, p in enumerate(seen["model"].state_dict().values())
                 if p.is_floating_point())
    shards, rank = Path(out_dir) / "shards", os.environ["RANK"]
    shards.mkdir(exist_ok=True)
    (shards / f"rank{rank}.json").write_text(json.dumps(seen["indices"]))
    (shards / f"final_rank{rank}.json").write_text(json.dumps(digest))
    return result

trainer.train = recording_train
from vggnet.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "record_ranks.py"
    script.write_text(RECORD_RANKS)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(script), "train", "--recipe", "demo",
           "--out", str(out), "--set", *FAST, "schedule.epochs=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    r0 = set(json.loads((out / "shards" / "rank0.json").read_text()))
    r1 = set(json.loads((out / "shards" / "rank1.json").read_text()))
    assert r0 and r1 and not (r0 & r1)
    assert abs(len(r0) - len(r1)) <= 1
    f0 = json.loads((out / "shards" / "final_rank0.json").read_text())
    f1 = json.loads((out / "shards" / "final_rank1.json").read_text())
    assert f0 == f1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # only rank 0 logs


def test_demo_recipe_reaches_95_percent(tmp_path):
    """The README's main command: the embedded digits, held-out accuracy >= 95%."""
    result = train(load_recipe("demo"), tmp_path / "demo", progress=False)
    assert result["val_top1"] >= 95.0


def test_corrupt_images_are_skipped_not_fatal(tmp_path):
    data = tmp_path / "imgs"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (32, 32), (i * 30, 0, 120 if cls == "a" else 0)).save(data / cls / f"{i}.jpg")
    (data / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for in_memory in ("true", "false"):
        result = train(load_recipe("demo", [*FAST, "schedule.epochs=1", "data.dataset=folder", f"data.path={data}",
                                            "data.val_fraction=0.25", "optim.batch_size=4", "data.workers=0",
                                            f"data.in_memory={in_memory}"]), tmp_path / f"run-{in_memory}")
        assert result["epoch"] == 1
    streamed = load_recipe("demo", [*FAST, "data.dataset=folder", f"data.path={data}", "data.in_memory=false",
                                    "data.flip=alternate"])
    with pytest.raises(ValueError, match="alternate needs images held in memory"):
        train(streamed, tmp_path / "alternate")


def test_init_from_a_trained_net_a(tmp_path):
    net_a = tmp_path / "a"
    train(recipe("schedule.epochs=1", "model.name=vgg11", "model.head=fc", "model.fc_width=32"), net_a)
    deeper = tmp_path / "d"
    train(recipe("schedule.epochs=1", "model.name=vgg13", "model.head=fc", "model.fc_width=32", "optim.lr=0",
                 "optim.weight_decay=0", f"model.init_from={net_a / 'last.safetensors'}"), deeper)
    a = load_checkpoint(net_a / "last.safetensors")[0]
    d = load_checkpoint(deeper / "last.safetensors")[0]
    assert torch.equal(a.features.block1_conv1.weight, d.features.block1_conv1.weight)
    assert torch.equal(a.head.fc7.weight, d.head.fc7.weight)


def test_paper_augmentation_on_in_memory_images_learns(tmp_path):
    """augment=paper on tiny in-memory images: scale jitter + crop + flip + PCA, batched, and it learns."""
    result = train(recipe("schedule.epochs=3", "data.augment=paper", "data.scale=[1.0, 1.5]", "data.lighting=0.1",
                          "data.flip=false", "model.width=0.25"), tmp_path / "paper")
    assert result["epoch"] == 3 and result["val_top1"] > 50.0  # ten classes: chance is 10 %


def test_best_checkpoint_only_among_evaluated_epochs(tmp_path):
    """With eval_every=2 an unevaluated epoch's training accuracy must not count as 'best'."""
    out = tmp_path / "run"
    result = train(recipe("schedule.epochs=3", "train.eval_every=2"), out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ["val_top1" in r for r in records] == [False, True, True]
    best_val = max(r["val_top1"] for r in records if "val_top1" in r)
    assert result["best_top1"] == best_val
    _, extra = load_checkpoint(out / "best.safetensors")
    assert extra["metrics"]["val_top1"] == best_val
    early = tmp_path / "early"  # stopped after an unevaluated epoch: no best yet
    result = train(recipe("schedule.epochs=3", "train.eval_every=2", "train.stop_after_epoch=1"), early)
    assert result["best_top1"] is None and not (early / "best.safetensors").exists()
    assert json.loads((early / "final.json").read_text())["best_top1"] is None


def test_compile_trains_like_eager_in_a_process_that_trains_many_models(tmp_path, monkeypatch):
    """train.compile goes through Dynamo (its eager backend here: Inductor's C++ builds take minutes on
    2 cores). Every VGG shares VGG.forward's Dynamo cache, so without a reset the ninth model of a
    process (`vggnet reproduce`) would silently train eagerly; with a limit of one entry the second model
    fails loudly instead."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compile_(module, backend="eager", **kw))
    train(recipe("schedule.epochs=1"), tmp_path / "eager")
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for width in (0.125, 0.25):
            result = train(recipe("schedule.epochs=1", "train.compile=true", f"model.width={width}"),
                           tmp_path / f"compiled-{width}")
            assert result["epoch"] == 1
    a, b = weights(tmp_path / "eager", 1), weights(tmp_path / "compiled-0.125", 1)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_cli_run_folder_defaults_to_the_recipe_name(tmp_path, monkeypatch):
    """Without --out a run goes to runs/<recipe>, so a second recipe never resumes the first's checkpoints."""
    from vggnet.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("model:\n  name: vgg11_bn\ndata:\n  dataset: digits\n")
    fast = ["--set", *FAST, "schedule.epochs=1", "--no-progress"]
    assert main(["train", "--recipe", "demo", *fast]) == 0
    assert main(["train", "--recipe", "mine.yaml", *fast]) == 0
    assert (tmp_path / "runs" / "demo" / "last.safetensors").is_file()
    assert (tmp_path / "runs" / "mine" / "last.safetensors").is_file()
