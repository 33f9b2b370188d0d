"""Typed recipes: every value's type and range checked when the recipe is loaded, before any file is written."""

import pytest
import yaml

import vggnet
from vggnet.cli import main
from vggnet.engine.recipe import DEFAULTS, Recipe, RecipeError, apply_override, builtin_recipes, load_recipe


@pytest.mark.parametrize(("override", "key", "shown"), [
    ("optim.lr=abc", "optim.lr", "expected a number, got 'abc'"),
    ("schedule.epochs=two", "schedule.epochs", "expected an integer, got 'two'"),
])
def test_cli_bad_value_is_one_line_naming_the_key_and_writes_nothing(tmp_path, capsys, override, key, shown):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "demo", "--set", override, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{key}: {shown}" in err[0]
    assert not out.exists()


def test_cli_yaml_syntax_error_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  name: vgg11_bn\noptim:\n  lr: [0.1\n  momentum: 0.9\n")
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "YAML syntax error at line" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(("override", "match"), [
    ("optim.lr=-0.1", r"optim.lr: must be >= 0, got -0.1"),
    ("model.dropout=1.5", r"model.dropout: must be in \[0, 1\), got 1.5"),
    ("train.threads=0", r"train.threads: must be >= 1"),
    ("train.threads=2.5", r"train.threads: expected an integer or null, got 2.5"),
    ("train.stop_after_epoch=true", r"train.stop_after_epoch: expected an integer or null"),
    ("optim.name=adam", r"optim.name: expected one of sgd, nesterov, adamw, got 'adam'"),
    ("data.mean=[0.5, x, 0.5]", r"data.mean\[1\]: expected a number, got 'x'"),
    ("data.std=[0.5, 0, 0.5]", r"data.std\[1\]: must be > 0"),
    ("optim.betas=[0.9]", r"optim.betas: expected 2 values"),
    ("data.flip=sometimes", r"data.flip: expected true or false or alternate"),
    ("model.name=vgg12", r"model.name: unknown value 'vgg12'"),
    ("optim.lr_mult={features: fast}", r"optim.lr_mult.features: expected a number"),
    ("train.tracking=wandb", r"train.tracking: expected one of tensorboard, mlflow, none"),
])
def test_values_are_checked_at_load_time(override, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe("demo", [override])
    with pytest.raises(RecipeError, match=match):
        apply_override(load_recipe("demo"), override)


def test_accepted_forms_keep_their_value():
    r = Recipe.load("demo", ["data.flip=alternate", "data.in_memory=false", "data.scale=[1.0, 1.5]",
                             "train.stop_after_epoch=null", "model.channels=[4, 8, 8, 8, 8, 8, 8, 8]",
                             "schedule.step_epochs=2.5"])
    assert r.data.flip == "alternate" and r.data.in_memory is False and r.data.scale == [1.0, 1.5]
    assert r.model.channels == [4, 8, 8, 8, 8, 8, 8, 8] and r.schedule.step_epochs == 2.5
    assert Recipe.load("paper").data.scale == [256, 512]  # integers stay integers (the middle scale is an int)


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("schedule:\n  epochs: 0\n")
    with pytest.raises(RecipeError, match=r"mine.yaml: schedule.epochs: must be >= 1, got 0"):
        load_recipe(path)
    path.write_text("- a list\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(path)


@pytest.mark.parametrize("name", builtin_recipes())
def test_typed_and_mapping_forms_agree_and_round_trip(name, tmp_path):
    recipe = Recipe.load(name)
    assert recipe.to_dict() == load_recipe(name) and list(recipe.to_dict()) == list(DEFAULTS)
    path = tmp_path / "saved.yaml"
    path.write_text(recipe.dump())
    assert Recipe.load(path) == recipe


def test_old_run_folders_with_the_retired_record_shards_key_still_load(tmp_path):
    saved = load_recipe("demo")
    saved["train"]["record_shards"] = False  # as every recipe.yaml saved before the key went
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    assert Recipe.load(path) == Recipe.load("demo")
    with pytest.raises(RecipeError, match="train.record_shards was removed"):
        load_recipe("demo", ["train.record_shards=true"])


def test_print_recipe_shows_what_the_weights_fill_in(tmp_path, capsys):
    model = vggnet.create_model("vgg13_bn", num_classes=10, width=0.125, head="gap")
    meta = {"classes": [str(i) for i in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
    ckpt = vggnet.save_checkpoint(model, tmp_path / "src.safetensors", meta)
    assert main(["train", "--recipe", "finetune", "--weights", str(ckpt), "--print-recipe"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["name"] == "vgg13_bn" and printed["model"]["width"] == 0.125
    assert printed["model"]["head"] == "gap" and printed["model"]["weights"] == str(ckpt)
    assert printed["data"]["mean"] == [0.5] * 3 and printed["data"]["std"] == [0.25] * 3
    assert printed["data"]["image_size"] == 32
    assert main(["train", "--recipe", "finetune", "--print-recipe"]) == 0  # without weights: the nulls, as saved
    assert yaml.safe_load(capsys.readouterr().out)["model"]["name"] is None
