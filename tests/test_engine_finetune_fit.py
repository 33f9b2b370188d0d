"""The finetune recipe fits itself to the data: augmentation by crop size, a validation split only for folders
large enough to spare one, a batch that gives a small folder several steps an epoch, and a floor in optimizer
steps; each choice is printed, recorded in recipe.yaml, and the other recipes keep their values."""

import numpy as np
import pytest
import torch
from PIL import Image

import vggnet
from vggnet.data import load_image_folder
from vggnet.engine import inputs as engine_inputs
from vggnet.engine.distributed import Dist
from vggnet.engine.inputs import build_inputs
from vggnet.engine.recipe import Recipe, load_recipe
from vggnet.engine.trainer import train
from vggnet.models import load_checkpoint

PREP = ["data.image_size=32", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "train.threads=1",
        "train.precision=fp32", "train.channels_last=false", "train.deterministic=true", "train.tracking=none"]


def folder(root, per_class, size=32):
    """An ImageFolder tree of random images: per_class = {class name: count}."""
    rng = np.random.default_rng(0)
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def finetune(root, *overrides):
    """The finetune recipe on ``root`` with the preprocessing a checkpoint would give; its fitting left on."""
    return Recipe.load("finetune", [f"data.path={root}", *PREP, *overrides])


def test_tiny_crops_get_pad_crop_and_photos_the_isotropic_rescale(tmp_path):
    root = folder(tmp_path / "d", {"a": 6, "b": 6})
    tiny = build_inputs(finetune(root), Dist())
    assert tiny.recipe.data.augment == "flip_crop" and tiny.recipe.data.scale is None
    assert tiny.train.augment == "flip_crop" and tiny.train.pad == 4
    assert any(n.startswith("data.augment=flip_crop (auto): 32-px crops are tiny") for n in tiny.notes)
    photo = build_inputs(finetune(root, "data.image_size=96"), Dist())  # > 64 px: the paper's rescale
    assert photo.recipe.data.augment == "paper" and photo.recipe.data.scale == [1.0, 1.3]
    assert any("isotropic rescale, shorter side in [96, 125] px" in n for n in photo.notes)
    given = build_inputs(finetune(root, "data.augment=paper"), Dist())  # a value set by hand is kept
    assert given.recipe.data.augment == "paper" and not any(n.startswith("data.augment") for n in given.notes)


def test_a_small_folder_is_not_split_and_keeps_its_last_epoch(tmp_path):
    root = folder(tmp_path / "d", {"a": 12, "b": 12, "c": 12})
    inputs = build_inputs(finetune(root), Dist())
    assert inputs.val is None and inputs.keep_last and inputs.recipe.data.val_fraction == 0.0
    assert len(inputs.train.labels) == 36  # every image trains
    assert any("no validation split: 12 images in the smallest class (< 200)" in n for n in inputs.notes)


def test_a_large_enough_folder_holds_out_what_a_fixed_fraction_would(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_inputs, "AUTO_VAL_MIN_PER_CLASS", 10)  # 10 images per class count as large here
    root = folder(tmp_path / "d", {"a": 12, "b": 12, "c": 10})
    inputs = build_inputs(finetune(root), Dist())
    assert inputs.recipe.data.val_fraction == 0.1 and not inputs.keep_last
    _, val, _ = load_image_folder(root, val_fraction=0.1, seed=0)  # what evaluation reads from recipe.yaml
    assert torch.equal(inputs.val.labels, torch.tensor(val.targets)) and len(val) == 3
    assert any("3 images held out for validation (every class has >= 10 images)" in n for n in inputs.notes)
    (root / "c" / "9.png").unlink()  # the smallest class decides: 9 < 10
    assert build_inputs(finetune(root), Dist()).val is None


def test_a_val_folder_is_used_as_given(tmp_path):
    folder(tmp_path / "d" / "train", {"a": 5, "b": 5})
    folder(tmp_path / "d" / "val", {"a": 2, "b": 2})
    inputs = build_inputs(finetune(tmp_path / "d"), Dist())
    assert len(inputs.val.labels) == 4 and not inputs.keep_last
    assert any("validation on the val/ folder (4 images)" in n for n in inputs.notes)


def test_a_folder_smaller_than_a_few_batches_gets_a_smaller_batch_and_lr(tmp_path):
    root = folder(tmp_path / "d", {"a": 12, "b": 12, "c": 12})
    inputs = build_inputs(finetune(root), Dist())  # 36 images, batch 64: no step at all without the cut
    o = inputs.recipe.optim
    assert o.batch_size == 7 and o.lr == pytest.approx(0.01 * 7 / 64) and len(inputs.train) == 5
    assert any(n.startswith("optim.batch_size=7, optim.lr=0.00109: 36 training images") for n in inputs.notes)
    off = build_inputs(finetune(root, "optim.min_batches=0", "optim.batch_size=8"), Dist())
    assert off.recipe.optim.batch_size == 8 and off.recipe.optim.lr == 0.01 and len(off.train) == 4
    two = engine_inputs.fit_batch(finetune(root), 36, 2, [])  # several processes: a multiple of their number
    assert two == 6


def test_the_epochs_are_raised_to_the_floor_in_steps(tmp_path):
    root = folder(tmp_path / "d", {"a": 12, "b": 12, "c": 12})
    inputs = build_inputs(finetune(root), Dist())  # 5 steps an epoch; 300 steps at least
    assert inputs.recipe.schedule.epochs == 60
    assert any(n == "schedule.epochs=60: 10 epochs x 5 steps = 50 steps, under schedule.min_steps=300; 60 epochs "
               "make 300 (--set schedule.min_steps=0 keeps 10)"
               for n in inputs.notes)
    assert build_inputs(finetune(root, "schedule.min_steps=0"), Dist()).recipe.schedule.epochs == 10
    assert build_inputs(finetune(root, "schedule.min_steps=40"), Dist()).recipe.schedule.epochs == 10  # 50 >= 40


def test_the_caller_recipe_is_not_changed(tmp_path):
    root = folder(tmp_path / "d", {"a": 6, "b": 6})
    recipe = finetune(root)
    build_inputs(recipe, Dist())
    assert recipe.data.augment == "auto" and recipe.data.val_fraction == "auto" and recipe.schedule.epochs == 10


@pytest.mark.parametrize("name", ["paper", "cifar10", "demo", "reproduce"])
def test_the_other_recipes_fit_nothing(name):
    r = Recipe.load(name)
    assert r.optim.min_batches == 0 and r.schedule.min_steps == 0
    assert r.data.augment != "auto" and r.data.val_fraction != "auto"


def test_the_demo_recipe_resolves_nothing():
    inputs = build_inputs(load_recipe("demo", ["optim.batch_size=64"]), Dist())
    assert inputs.notes == [] and inputs.recipe.to_dict() == load_recipe("demo", ["optim.batch_size=64"])


def test_plain_finetune_on_a_small_folder_end_to_end(tmp_path, capsys):
    """The user's command with nothing else: every choice printed in one block at the start, recorded in
    recipe.yaml, and best.safetensors is the last epoch (no validation split to choose another by)."""
    model = vggnet.create_model("vgg11", num_classes=5, width=0.125, fc_width=32, dropout=0.0)  # no BN, no dropout
    meta = {"classes": list("vwxyz"), "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
    ckpt = vggnet.save_checkpoint(model, tmp_path / "src.safetensors", meta)
    root = folder(tmp_path / "d", {"a": 10, "b": 10, "c": 10})
    out = tmp_path / "run"
    # lr 0, no augmentation or dropout: every epoch has the same training accuracy, so only the rule that the
    # last epoch is kept makes best.safetensors the last one (the highest-accuracy rule keeps the first)
    recipe = load_recipe("finetune", [f"data.path={root}", f"model.weights={ckpt}", "model.dropout=0",
                                      "data.augment=none", "optim.lr=0", "schedule.epochs=1", "schedule.min_steps=15",
                                      *PREP[3:]])
    train(recipe, out)
    log = capsys.readouterr().out
    block = log[log.index("fitted to the data"):].splitlines()[:4]
    assert block[0] == "fitted to the data (--set a key to choose it yourself):"
    assert block[1].startswith("  data.val_fraction=0 (auto): no validation split: 10 images")
    assert block[2].startswith("  optim.batch_size=6, optim.lr=0: 30 training images make fewer than")
    assert block[3] == ("  schedule.epochs=3: 1 epochs x 5 steps = 5 steps, under schedule.min_steps=15; 3 epochs make "
                        "15 (--set schedule.min_steps=0 keeps 1)")
    saved = load_recipe(out / "recipe.yaml")
    assert saved["data"]["val_fraction"] == 0.0 and saved["data"]["augment"] == "none"
    assert saved["optim"]["batch_size"] == 6 and saved["schedule"]["epochs"] == 3
    _, best = load_checkpoint(out / "best.safetensors")
    assert best["metrics"]["epoch"] == 3
    train(recipe, out)  # run again: the same choices from the same folder, so nothing is left to do
    assert "already trained to epoch 3 of 3" in capsys.readouterr().out


def test_an_explicit_epochs_or_batch_wins_over_its_floor(tmp_path):
    """`--epochs 3` means three epochs: a value given on the command line turns off the floor that would raise it,
    unless the floor is given too."""
    root = folder(tmp_path / "d", {"a": 12, "b": 12, "c": 12})
    assert build_inputs(finetune(root, "schedule.epochs=3"), Dist()).recipe.schedule.epochs == 3
    both = build_inputs(finetune(root, "schedule.epochs=3", "schedule.min_steps=300"), Dist())
    assert both.recipe.schedule.epochs == 60
    assert build_inputs(finetune(root, "optim.batch_size=32"), Dist()).recipe.optim.batch_size == 32
    assert build_inputs(finetune(root), Dist()).recipe.schedule.epochs == 60  # nothing given: the floor holds


def test_a_training_set_smaller_than_one_batch_is_a_one_line_error(tmp_path):
    root = folder(tmp_path / "d", {"a": 3, "b": 3})
    recipe = Recipe.load("demo", [f"data.path={root}", "data.dataset=folder", "data.val_fraction=0",
                                  "optim.batch_size=64", *PREP[3:]])
    with pytest.raises(vggnet.errors.UsageError, match="6 training images make no full batch of 64 per process: "
                                                        r"pass a smaller --batch-size \(at most 6\)"):
        build_inputs(recipe, Dist())
