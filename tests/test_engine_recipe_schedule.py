"""Recipes (YAML + overrides) and learning-rate schedules."""

import math
from pathlib import Path

import pytest

from vggnet.engine.recipe import DEFAULTS, apply_override, builtin_recipes, load_recipe, save_recipe
from vggnet.engine.schedule import LRSchedule


def test_builtin_recipes_exist_and_resolve():
    assert {"paper", "cifar10", "demo"} <= set(builtin_recipes())
    for name in builtin_recipes():
        recipe = load_recipe(name)
        assert set(recipe) == set(DEFAULTS)


def test_train_help_lists_every_packaged_recipe(capsys):
    """`vggnet train --help` names the built-in recipes from the packaged folder, so a new file shows up there."""
    import vggnet.recipes
    from vggnet.cli import main

    packaged = sorted(p.stem for p in Path(vggnet.recipes.__file__).parent.glob("*.yaml"))
    assert len(packaged) >= 5 and builtin_recipes() == packaged
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"(built-in: {', '.join(packaged)}; or a YAML path)" in text
    assert f"built-in recipe name ({', '.join(packaged)}) or YAML file" in text


def test_paper_recipe_is_the_papers():
    r = load_recipe("paper")
    assert (r["optim"]["name"], r["optim"]["lr"], r["optim"]["momentum"]) == ("sgd", 0.01, 0.9)
    assert (r["optim"]["weight_decay"], r["optim"]["batch_size"]) == (0.0005, 256)
    assert (r["schedule"]["name"], r["schedule"]["factor"], r["schedule"]["max_drops"]) == ("plateau", 0.1, 3)
    assert r["schedule"]["epochs"] == 74 and r["model"]["dropout"] == 0.5
    assert r["data"]["scale"] == [256, 512] and r["data"]["image_size"] == 224


def test_overrides_parse_yaml_values(tmp_path):
    r = load_recipe("demo", ["optim.lr=0.2", "data.scale=[32, 64]", "model.init_from=null", "train.ema=0.99"])
    assert r["optim"]["lr"] == 0.2 and r["data"]["scale"] == [32, 64] and r["train"]["ema"] == 0.99
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  name: vgg16\nschedule:\n  epochs: 3\n")
    r = load_recipe(path)
    assert r["model"]["name"] == "vgg16" and r["schedule"]["epochs"] == 3 and r["optim"]["lr"] == 0.01


def test_exponents_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 as a string; a recipe means a number, in a file or an override."""
    file = tmp_path / "r.yaml"
    file.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-4\ndescription: 1e3 images\n")
    recipe = load_recipe(file, ["optim.momentum=9e-1"])
    assert recipe["optim"]["lr"] == 0.001 and recipe["optim"]["weight_decay"] == 0.0005
    assert recipe["optim"]["momentum"] == 0.9
    assert recipe["description"] == "1e3 images"  # not a number: left alone
    import yaml

    assert yaml.safe_load("x: 1e-3") == {"x": "1e-3"}  # PyYAML's own loader is not changed
    recipe["description"] = "1e3"  # a string that looks like a number survives save and load as a string
    save_recipe(recipe, tmp_path / "saved.yaml")
    again = load_recipe(tmp_path / "saved.yaml")
    assert again["description"] == "1e3" and again["optim"]["lr"] == 0.001
    assert yaml.safe_dump({"x": "1e3"}) == "x: 1e3\n"  # nor is its dumper


@pytest.mark.parametrize("bad", ["optim.lr_rate=1", "nosection.x=1", "optim=3", "lr"])
def test_typos_are_errors(bad):
    with pytest.raises(ValueError):
        apply_override(load_recipe("demo"), bad)


def test_unknown_recipe_and_missing_file():
    with pytest.raises(ValueError, match="built-in"):
        load_recipe("imagenet-sota")
    with pytest.raises(FileNotFoundError):
        load_recipe("missing.yaml")


def test_a_folder_named_like_a_recipe_does_not_shadow_it(tmp_path, monkeypatch):
    (tmp_path / "cifar10").mkdir()  # e.g. the data folder, next to where the command runs
    monkeypatch.chdir(tmp_path)
    assert load_recipe("cifar10")["model"]["name"] == "vgg13_bn"


def sched(name, **kw):
    cfg = {**DEFAULTS["schedule"], "name": name, "epochs": 10, **kw}
    return LRSchedule(cfg, base_lr=0.1, steps_per_epoch=10)


def test_plateau_divides_by_ten_three_times_at_most():
    s = sched("plateau", patience=1)
    drops = []
    for acc in [50, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60]:
        if s.epoch_end(acc):
            drops.append(s.lr_at(0))
    assert drops == pytest.approx([0.01, 0.001, 0.0001])
    restored = sched("plateau", patience=1)
    restored.load_state_dict(s.state_dict())
    assert restored.lr_at(5) == s.lr_at(5) and restored.drops == 3


def test_warmup_then_cosine_and_step_and_onecycle():
    s = sched("cosine", warmup_epochs=2)
    assert s.lr_at(0) == pytest.approx(0.1 / 20) and s.lr_at(19) == pytest.approx(0.1)
    assert s.lr_at(99) < 0.001 and s.lr_at(60) < s.lr_at(30)
    s = sched("step", step_epochs=3)
    assert [round(s.lr_at(e * 10), 6) for e in (0, 3, 6)] == [0.1, 0.01, 0.001]
    s = sched("onecycle", pct_start=0.5)
    lrs = [s.lr_at(i) for i in range(100)]
    assert max(lrs) == pytest.approx(0.1, rel=0.02) and lrs[0] < 0.01 and lrs[-1] < 0.01
    assert lrs.index(max(lrs)) in range(45, 55)
    with pytest.raises(ValueError, match="unknown schedule"):
        sched("exp")
    assert math.isfinite(sched("constant").lr_at(1000))
