"""``vggnet predict`` and ``vggnet export`` end to end on a tiny checkpoint and a folder of PNGs."""

import json
from importlib import resources

import pytest
import torch
from PIL import Image

import vggnet
from vggnet.cli import build_parser, main
from vggnet.infer import Predictor, load_image

CLASSES = ["red", "green", "blue"]
META = {"classes": CLASSES, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "image_size": 32}
DIGITS_META = {"classes": [str(i) for i in range(10)], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
               "image_size": 32}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = vggnet.create_model("vgg11_bn", num_classes=3, width=0.125, head="gap").eval()
    run = tmp_path_factory.mktemp("run")
    vggnet.save_checkpoint(model, run / "best.safetensors", META)
    return run


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A run folder of the demo recipe, as far as predict reads one: a 10-class digits checkpoint beside the
    built-in demo recipe (untrained: where the calibration images come from is tested here, not accuracy)."""
    torch.manual_seed(0)
    model = vggnet.create_model("vgg11_bn", num_classes=10, width=0.125, head="gap").eval()
    run = tmp_path_factory.mktemp("demo")
    vggnet.save_checkpoint(model, run / "best.safetensors", DIGITS_META)
    (run / "recipe.yaml").write_text((resources.files("vggnet.recipes") / "demo.yaml").read_text())
    return run


def record_calibration(monkeypatch):
    """The calibration batch every runtime built in this test is given, in order (the real runtime still builds)."""
    import vggnet.infer.predictor as predictor

    seen = []
    build = predictor.make_runtime

    def recording(name, model, prep, calib=None, **options):
        seen.append(calib)
        return build(name, model, prep, calib, **options)

    monkeypatch.setattr(predictor, "make_runtime", recording)
    return seen


def rows(batch):
    """The images of a batch as a set of bytes, to test membership exactly."""
    return {image.numpy().tobytes() for image in batch}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Five noisy PNGs of different sizes in a folder and a sub-folder."""
    root = tmp_path_factory.mktemp("imgs")
    (root / "more").mkdir()
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate([(40, 50), (32, 32), (64, 36), (33, 47), (50, 40)]):
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / ("more" if i == 4 else ".") / f"{i}.png")
    return root


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def predict_json(argv, capsys):
    code, out, err = run_cli(["predict", "--json", *argv], capsys)
    return code, (json.loads(out) if out.strip() else None), err


def expected(run_dir, paths, topk):
    predictor = Predictor.from_checkpoint(run_dir)
    return predictor.predict([load_image(p) for p in paths], topk=topk)


def test_table_lists_every_image_with_topk_labels(run_dir, images, capsys):
    code, out, err = run_cli(["predict", "--ckpt", str(run_dir), "--topk", "2", "--batch-size", "2", str(images)],
                             capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["image", "top-1", "top-2"]
    paths = sorted(images.rglob("*.png"))
    assert [line.split()[0] for line in lines[1:]] == [str(p) for p in paths]
    want = expected(run_dir, paths, 2)
    for line, row in zip(lines[1:], want, strict=True):
        fields = line.split()
        assert fields[1] == row[0][0] and fields[3] == row[1][0]
        assert float(fields[2].rstrip("%")) == pytest.approx(100 * row[0][1], abs=0.051)


def test_json_output_is_complete_and_matches_the_api(run_dir, images, capsys):
    code, report, err = predict_json(["--ckpt", str(run_dir), "--topk", "9", f"{images}/*.png"], capsys)
    assert code == 0, err
    assert report["runtime"] == "eager" and report["topk"] == 3 and report["failed"] == 0  # top-9 of 3 classes
    assert report["checkpoint"] == str(run_dir / "best.safetensors")
    paths = sorted(images.glob("*.png"))
    assert [p["image"] for p in report["predictions"]] == [str(p) for p in paths]
    for pred, row in zip(report["predictions"], expected(run_dir, paths, 3), strict=True):
        assert [t["label"] for t in pred["top"]] == [label for label, _ in row]
        assert [CLASSES[t["index"]] for t in pred["top"]] == [t["label"] for t in pred["top"]]
        assert sum(t["probability"] for t in pred["top"]) == pytest.approx(1.0, abs=1e-5)


def test_a_calibrated_runtime_uses_calib_data(run_dir, images, capsys):
    args = ["--ckpt", str(run_dir), "--runtime", "onnx-int8", "--calib-data", str(images / "more"), str(images)]
    code, report, err = predict_json(args, capsys)
    assert code == 0, err
    assert report["runtime"] == "onnx-int8" and len(report["predictions"]) == 5


def test_calibrated_runtime_without_calib_data_is_an_error(run_dir, images, capsys):
    code, out, err = run_cli(["predict", "--ckpt", str(run_dir), "--runtime", "int8", str(images)], capsys)
    assert code == 2 and "--calib-data" in err and out == ""
    # run_dir holds a checkpoint and no recipe.yaml: a bare checkpoint, whose training images are unknown
    assert len(err.splitlines()) == 1, err
    assert err.startswith("vggnet predict: error: --runtime int8 needs calibration images: ")
    assert f"{run_dir / 'best.safetensors'} has no recipe.yaml beside it" in err


def test_int8_on_a_demo_run_calibrates_on_its_training_split_without_calib_data(demo_run, images, capsys,
                                                                                 monkeypatch):
    """The rule of every INT8 path: no --calib-data, so the run's own training split (the embedded digits, rebuilt
    from recipe.yaml as `vggnet eval` does), never its validation split; one stderr line says so."""
    from vggnet.evaluate import eval_images
    from vggnet.infer import Preprocessing, preprocess

    seen = record_calibration(monkeypatch)
    code, report, err = predict_json(["--ckpt", str(demo_run), "--runtime", "int8", str(images)], capsys)
    assert code == 0, err
    assert report["runtime"] == "int8" and len(report["predictions"]) == 5 and report["failed"] == 0
    said = [line for line in err.splitlines() if "calibrat" in line]
    assert said == [f"vggnet predict: calibrating int8 on 64 images of the training split of "
                    f"{demo_run / 'recipe.yaml'} (digits)"], err
    prep = Preprocessing.from_meta({**DIGITS_META, "in_channels": 3, "num_classes": 10})
    train, val = (rows(preprocess(list(eval_images(demo_run, split=split)[0]), prep)) for split in ("train", "val"))
    (calib,) = seen
    assert calib.shape == (64, 3, 32, 32) and len(rows(calib)) == 64
    assert rows(calib) <= train and not rows(calib) & val


def test_calib_data_still_wins_over_the_runs_training_split(demo_run, images, capsys, monkeypatch):
    from vggnet.capture.calibration import calibration_batch
    from vggnet.infer import Preprocessing, expand_image_paths, preprocess

    seen = record_calibration(monkeypatch)
    code, report, err = predict_json(["--ckpt", str(demo_run), "--runtime", "onnx-int8", "--calib-data", str(images),
                                      str(images)], capsys)
    assert code == 0, err
    assert [line for line in err.splitlines() if "calibrat" in line] == [
        f"vggnet predict: calibrating onnx-int8 on 5 images of {images}"]
    prep = Preprocessing.from_meta({**DIGITS_META, "in_channels": 3, "num_classes": 10})
    want = calibration_batch(expand_image_paths([images]), 64, lambda batch: preprocess(batch, prep))
    assert len(seen) == 1 and torch.equal(seen[0], want)


@pytest.mark.parametrize("case, message", [
    ("missing-ckpt", "checkpoint not found"),
    ("foreign-ckpt", "not a vggnet checkpoint"),
    ("missing-image", "image not found"),
    ("bad-runtime", "unknown runtime 'tpu'"),
])
def test_clear_errors_exit_2(case, message, run_dir, images, tmp_path, capsys):
    ckpt, target, extra = str(run_dir), [str(images)], []
    if case == "missing-ckpt":
        ckpt = str(tmp_path / "nope.safetensors")
    elif case == "foreign-ckpt":
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
        ckpt = str(tmp_path / "foreign.safetensors")
    elif case == "missing-image":
        target = [str(images / "0.png"), str(images / "missing.png")]
    else:
        extra = ["--runtime", "tpu"]
    code, out, err = run_cli(["predict", "--ckpt", ckpt, *extra, *target], capsys)
    assert code == 2 and message in err and err.startswith("vggnet predict: error:")


def test_an_unreadable_image_stops_or_is_reported(run_dir, images, tmp_path, capsys):
    bad = tmp_path / "truncated.png"
    bad.write_bytes((images / "0.png").read_bytes()[:200])
    code, out, err = run_cli(["predict", "--ckpt", str(run_dir), str(images / "1.png"), str(bad)], capsys)
    assert code == 2 and str(bad) in err and "unreadable image" in err
    code, report, err = predict_json(["--ckpt", str(run_dir), "--skip-unreadable", str(bad), str(images / "1.png")],
                                     capsys)
    assert code == 1 and report["failed"] == 1 and "1 of 2 images could not be read" in err
    assert report["predictions"][0]["image"] == str(bad) and "unreadable image" in report["predictions"][0]["error"]
    assert report["predictions"][1]["top"][0]["label"] in CLASSES


def test_progress_bar_on_request(run_dir, images, capsys):
    code, _, err = run_cli(["predict", "--ckpt", str(run_dir), "--progress", "--batch-size", "2", str(images)], capsys)
    assert code == 0 and "predict" in err and "5/5" in err


def test_export_then_predict_with_the_exported_file(run_dir, images, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, text, err = run_cli(["export", "--ckpt", str(run_dir), "--out", str(out)], capsys)  # format from suffix
    assert code == 0, err
    assert f"wrote {out} (onnx" in text and "max relative error vs eager fp32: batch 1:" in text
    assert "classes: red, green, blue" in text
    code, exported, err = predict_json(["--ckpt", str(out), str(images)], capsys)
    assert code == 0, err
    assert exported["runtime"] == "exported onnx"
    _, checkpoint, _ = predict_json(["--ckpt", str(run_dir), str(images)], capsys)
    assert [[t["label"] for t in p["top"]] for p in exported["predictions"]] == [
        [t["label"] for t in p["top"]] for p in checkpoint["predictions"]]
    code, _, err = run_cli(["predict", "--ckpt", str(out), "--runtime", "int8", str(images)], capsys)
    assert code == 2 and "runs as exported" in err


def test_export_json_report_and_errors(run_dir, tmp_path, capsys):
    code, out, err = run_cli(["export", "--ckpt", str(run_dir), "--format", "torchscript", "--out",
                              str(tmp_path / "m"), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["path"] == str(tmp_path / "m.pt") and report["format"] == "torchscript"
    assert set(report["max_rel_error"]) == {"1", "3", "8"} and report["preprocessing"]["classes"] == CLASSES
    code, _, err = run_cli(["export", "--ckpt", str(run_dir), "--out", str(tmp_path / "m.mlmodel")], capsys)
    assert code == 2 and "cannot tell the format" in err
    code, _, err = run_cli(["export", "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and "checkpoint not found" in err


def test_help_texts_name_the_runtimes_and_formats(capsys):
    parser = build_parser()
    for command, words in (("predict", ["int8-dynamic", "onnx-int8", "auto", "--calib-data", "--topk"]),
                           ("export", ["onnx", "pt2", "torchscript", "metadata_props", "1e-4"])):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        out = capsys.readouterr().out
        assert all(word in out for word in words), command


def test_help_texts_state_one_calibration_rule(capsys):
    """predict, serve and export say the same: --calib-data when given, else the run's training split (never its
    validation split), else an error for a checkpoint outside a run folder."""
    parser = build_parser()
    for command in ("predict", "serve", "export"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(a folder, glob or file of training images) when given; else the training split of" in text, command
        assert "recipe.yaml" in text and "the embedded digits for the demo" in text, command
        assert "never its validation split); else an error" in text and "outside a run folder" in text, command
        others = [other for other in ("vggnet predict", "vggnet serve", "vggnet export") if other[7:] != command]
        assert all(other in text for other in others), command


def test_int8_dynamic_on_a_conv_head_is_one_line_and_exit_2(images, tmp_path, capsys):
    """The conv head has no Linear layer for int8-dynamic to quantize: a user's choice to change, so one line
    naming the problem and exit 2, before torchao is imported (whose import would log) or anything compiles."""
    torch.manual_seed(0)
    model = vggnet.create_model("vgg11_bn", num_classes=3, width=0.125, head="conv").eval()
    vggnet.save_checkpoint(model, tmp_path / "best.safetensors", META)
    code, out, err = run_cli(["predict", "--ckpt", str(tmp_path), "--runtime", "int8-dynamic", str(images)], capsys)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("vggnet predict: error: int8-dynamic quantizes Linear (FC) layers")
    assert "'conv' head has none; use the int8 runtime" in err


def test_calibration_images_are_read_as_eval_reads_them(run_dir, images, tmp_path, capsys, monkeypatch):
    """--calib-data goes through vggnet.capture.calibration: eval's reader, and a bad file is named."""
    from vggnet.capture.calibration import calibration_batch
    from vggnet.evaluate import FolderImages
    from vggnet.infer import Preprocessing, expand_image_paths, preprocess

    prep = Preprocessing.from_meta({**META, "in_channels": 3, "num_classes": 3})
    paths = expand_image_paths([images])
    got = calibration_batch(paths, 3, lambda batch: preprocess(batch, prep))
    chosen = [paths[0], paths[1], paths[3]]  # 3 of 5, evenly spaced
    assert torch.equal(got, preprocess(list(FolderImages([str(p) for p in chosen])), prep))
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a.png").write_bytes((images / "0.png").read_bytes())
    (calib / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, out, err = run_cli(["predict", "--ckpt", str(run_dir), "--runtime", "onnx-int8", "--calib-data", str(calib),
                              str(images)], capsys)
    assert code == 2 and out == "" and f"calibration image {calib / 'b.png'}: unreadable" in err
