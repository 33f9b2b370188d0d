"""``vggnet eval`` end to end on tiny checkpoints and a tiny ImageFolder of PNGs; nothing is trained."""

import json
import re
import sys

import pytest
import torch
import yaml
from PIL import Image

import vggnet
from vggnet.cli import build_parser, main
from vggnet.data import digits_tensors, load_image_folder
from vggnet.evaluate import eval_images, load_models

CLASSES = ["cat", "dog", "fox"]
META = {"classes": CLASSES, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "image_size": 32}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def save_tiny(path, meta=META, num_classes=3, seed=0, head="fc"):
    torch.manual_seed(seed)
    model = vggnet.create_model("vgg11", width=0.125, fc_width=32, num_classes=num_classes, head=head)
    return vggnet.save_checkpoint(model, path, meta)


@pytest.fixture
def folder(tmp_path):
    """4 PNGs per class in varying, non-square sizes; each class has its own dominant colour."""
    root = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    sizes = [(36, 44), (40, 40), (48, 34), (33, 50)]
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            pixels = torch.randint(0, 80, (h, w, 3), generator=g, dtype=torch.uint8)
            pixels[..., c] += 150
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def ckpt(tmp_path):
    return save_tiny(tmp_path / "m.safetensors")


def run_cli(args, capsys):
    code = main(["eval", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_prints_a_table_and_writes_json_md_png(ckpt, folder, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    code, out, err = run_cli(["--ckpt", str(ckpt), "--data", str(folder), "--protocol", "single",
                              "--protocol", "dense@1.0,1.25", "--protocol", "multicrop@32,1.5",
                              "--protocol", "dense+multicrop", "--batch-size", "16", "--out", str(out_dir)], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "| protocol | top-1 err (%) | top-3 err (%) | n | seconds |"  # top-5 of 3 classes is top-3
    assert [line.split("|")[1].strip() for line in lines[2:]] == [
        "single@1", "dense@1,1.25", "multicrop@32,1.5", "dense+multicrop@1"]
    report = json.loads((out_dir / "eval.json").read_text())
    assert report["classes"] == CLASSES and report["split"] == "val" and report["image_size"] == 32
    assert report["checkpoints"] == [str(ckpt)]
    results = report["results"]
    assert [r["scales_px"] for r in results] == [[32], [32, 40], [32, 48], [32]]
    assert [r["views_per_image"] for r in results] == [1, 4, 100, 52]
    for r in results:
        assert r["n"] == 3  # no recipe: the default split holds out one image per class
        confusion = torch.tensor(r["confusion"])
        assert confusion.shape == (3, 3) and confusion.sum() == 3
        assert r["top1_err"] == pytest.approx(100 * (1 - confusion.trace().item() / 3))
        assert r["top5_err"] == 0.0
        assert set(r["per_class_acc"]) == set(CLASSES)
        assert f"| {r['protocol']} | {r['top1_err']:.2f} |" in out
    md = (out_dir / "eval.md").read_text()
    assert "| protocol |" in md and "dense+multicrop@1" in md and str(ckpt) in md
    assert (out_dir / "confusion.png").read_bytes()[:8] == PNG_SIGNATURE


def test_eval_json_flag_prints_the_report(ckpt, folder, capsys):
    code, out, _ = run_cli(["--ckpt", str(ckpt), "--data", str(folder), "--json", "--split", "train"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["split"] == "train" and report["results"][0]["protocol"] == "single@1"
    assert report["results"][0]["n"] == 9  # 12 images minus the 3 held out


def test_run_folder_recipe_split_and_ensemble(folder, tmp_path, capsys):
    run = tmp_path / "run"
    save_tiny(run / "last.safetensors", seed=1)
    save_tiny(run / "best.safetensors", seed=2)  # preferred over last
    recipe = {"data": {"dataset": "folder", "path": None, "val_fraction": 0.5, "split_seed": 3}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    other = save_tiny(tmp_path / "other.safetensors", seed=4, head="gap")

    images, labels, classes = eval_images(run, folder, "val", classes=CLASSES)
    _, val, _ = load_image_folder(folder, val_fraction=0.5, seed=3)
    assert images.paths == [p for p, _ in val.samples] and labels == val.targets and classes == CLASSES
    assert images[0].dtype == torch.uint8 and images[0].shape[0] == 3

    models, meta = load_models([run, other])
    assert meta["checkpoints"] == [str(run / "best.safetensors"), str(other)] and len(models) == 2
    code, out, err = run_cli(["--ckpt", str(run), "--ckpt", str(other), "--data", str(folder), "--json",
                              "--protocol", "dense"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["results"][0]["n"] == 6 and report["results"][0]["views_per_image"] == 2  # per model
    code, out, _ = run_cli(["--ckpt", str(run), "--data", str(folder), "--limit", "2", "--json"], capsys)
    assert code == 0 and json.loads(out)["results"][0]["n"] == 2


def test_digits_run_uses_the_embedded_validation_split(tmp_path, capsys):
    run = tmp_path / "digits"
    meta = {**META, "classes": [str(i) for i in range(10)]}
    save_tiny(run / "best.safetensors", meta=meta, num_classes=10, head="gap")
    recipe = {"data": {"dataset": "digits", "image_size": 32, "val_fraction": 0.2, "split_seed": 0}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    images, labels, classes = eval_images(run, None, "val")
    x, y = digits_tensors("val", size=32, channels=3, val_fraction=0.2, seed=0)
    assert torch.equal(images, x) and labels == y.tolist() and classes == meta["classes"]
    assert images.shape[1:] == (3, 32, 32) and 300 < len(labels) < 400  # a fifth of 1,797
    code, out, err = run_cli(["--ckpt", str(run), "--limit", "20", "--protocol", "single:flip", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)["results"][0]
    assert result["n"] == 20 and result["protocol"] == "single@1:flip" and result["top5_k"] == 5


@pytest.mark.parametrize("case", ["missing", "empty_run", "bad_protocol", "mismatch", "wrong_classes", "no_data"])
def test_errors_exit_2_with_one_line(case, ckpt, folder, tmp_path, capsys):
    args = ["--ckpt", str(ckpt), "--data", str(folder)]
    if case == "missing":
        args = ["--ckpt", str(tmp_path / "nope.safetensors"), "--data", str(folder)]
        expect = "nope.safetensors"
    elif case == "empty_run":
        (tmp_path / "empty").mkdir()
        args = ["--ckpt", str(tmp_path / "empty"), "--data", str(folder)]
        expect = "best.safetensors or last.safetensors"
    elif case == "bad_protocol":
        args += ["--protocol", "dense@1,,2"]
        expect = "bad protocol"
    elif case == "mismatch":
        other = save_tiny(tmp_path / "o.safetensors", meta={**META, "image_size": 64})
        args += ["--ckpt", str(other)]
        expect = "cannot ensemble"
    elif case == "wrong_classes":
        other = save_tiny(tmp_path / "o.safetensors", meta={**META, "classes": ["a", "b", "c"]})
        args = ["--ckpt", str(other), "--data", str(folder)]
        expect = "differ from those of"
    else:
        args = ["--ckpt", str(ckpt)]
        expect = "--data PATH"
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and expect in err and err.startswith("vggnet eval: error:")


def test_help_explains_protocols_and_relative_scales(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("KIND[@SCALE,SCALE,...]", "RELATIVE", "PIXELS", "1.143,1.714,2.286", "dense+multicrop@256,384,512",
                   "5x5", ":noflip"):
        assert needle in text
    names = list(build_parser()._subparsers._group_actions[0].choices)
    assert names.index("eval") == names.index("train") + 1


# --- the cost, said before the first image ---------------------------------------------------------------------------

def test_eval_says_views_time_and_limit_before_it_starts(ckpt, folder, capsys, monkeypatch):
    import vggnet.evaluate

    seen: list[str] = []
    real = vggnet.evaluate.predict_proba

    def spy(*args, **kwargs):  # what stderr held when the first protocol started
        if not seen:
            out, err = capsys.readouterr()
            seen.append(err)
            sys.stdout.write(out)
        return real(*args, **kwargs)

    monkeypatch.setattr(vggnet.evaluate, "predict_proba", spy)
    code, out, err = run_cli(["--ckpt", str(ckpt), "--data", str(folder), "--protocol", "single",
                              "--protocol", "multicrop@1.14,1.5"], capsys)
    assert code == 0, err
    block = seen[0].splitlines()
    assert block[0].startswith("vggnet eval: 3 images; time estimated from a timed batch on cpu")
    assert block[1].split()[:3] == ["single@1", "1", "view/image"] and block[1].split()[3] == "3"
    assert block[2].split()[:3] == ["multicrop@1.14,1.5", "100", "views/image"] and block[2].split()[3] == "300"
    assert all(re.search(r"~\d+(\.\d)? (s|min|h)$", line) for line in block[1:3])
    assert "--limit" in block[3] and len(block) == 4
    assert "| multicrop@1.14,1.5 |" in out  # and then it ran


def test_a_protocol_that_cannot_run_is_refused_before_the_cost_is_said(ckpt, folder, capsys):
    code, out, err = run_cli(["--ckpt", str(ckpt), "--data", str(folder), "--protocol", "single",
                              "--protocol", "multicrop@0.5"], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "smaller than the 32-px training crop" in err


def test_cost_block_counts_views_estimates_time_and_suggests_a_limit():
    from vggnet.evaluate import parse_protocol
    from vggnet.evaluate.cost import cost_block, crop_units, format_seconds

    multicrop, dense = parse_protocol("multicrop@1.14,1.5"), parse_protocol("dense@1,2")
    assert crop_units(multicrop, 224) == 100 and crop_units(parse_protocol("single"), 224) == 1
    assert crop_units(dense, 32) == 2 * (1 + 4)  # a dense view at 2x the crop is four crops of work, x 2 flips
    assert [format_seconds(s) for s in (0.2, 40, 1200, 12600)] == ["~1 s", "~40 s", "~20 min", "~3.5 h"]
    text = cost_block([multicrop], 224, 5000, per_crop=0.0024, device="cuda")  # 100 x 5,000 x 2.4 ms = 20 min
    assert "100 views/image" in text and "500,000 forward passes" in text and "~20 min" in text
    assert "--limit 250 (about a minute" in text
    assert "--limit 50: only these" in cost_block([multicrop], 224, 50, per_crop=0.0024, limit=50)
    quiet = cost_block([multicrop], 224, 50, per_crop=None, models=2)
    assert "x 2 models" in quiet and "10,000 forward passes" in quiet and "~" not in quiet
    assert "--limit N evaluates only N images" in quiet
