"""``--engine ray`` (Ray Data actor pool) against the single-process commands, on one local 2-CPU Ray.

Ray starts once for the module (it takes seconds) and is shut down at the end; every job is a real Ray Data
pipeline with an actor pool of two actors, one model each.
"""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vggnet
from vggnet.cli import main

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
pq = pytest.importorskip("pyarrow.parquet")

CLASSES = ["red", "green", "blue"]
META = {"classes": CLASSES, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3], "image_size": 32}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from vggnet.infer.raydata import connect

    connect(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = vggnet.create_model("vgg11_bn", num_classes=3, width=0.125, fc_width=32, head="fc").eval()
    for m in model.modules():  # batch-norm statistics and a wide spread of logits: preprocessing mistakes show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
        if isinstance(m, torch.nn.Linear):
            m.weight.data *= 10
    file = tmp_path_factory.mktemp("run") / "best.safetensors"
    vggnet.save_checkpoint(model, file, META)
    return file


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """21 PNG / JPEG images of assorted sizes in class folders (an ImageFolder tree), one of them corrupt."""
    root = tmp_path_factory.mktemp("photos")
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(7 if c < 2 else 6):
            pixels = torch.randint(0, 90, (36 + 5 * i, 44 + 3 * c, 3), generator=g, dtype=torch.uint8)
            pixels[..., c] += 140
            ext = "jpg" if i % 3 == 0 else "png"
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.{ext}")
    (root / "blue" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated, not a JPEG")
    return root


def predict(argv, capsys):
    code = main(["predict", "--json", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def test_predictions_equal_the_single_process_ones_and_parquet(ckpt, photos, tmp_path, capsys):
    common = ["--ckpt", str(ckpt), "--topk", "3", "--skip-unreadable", "--batch-size", "4", str(photos)]
    code, local, _ = predict(common, capsys)
    out = tmp_path / "labels.parquet"
    code_ray, distributed, err = predict([*common, "--engine", "ray", "--concurrency", "2", "--out", str(out)],
                                         capsys)
    assert code == code_ray == 1  # one unreadable image, reported
    assert "1 of 21 images could not be read" in err
    assert {k: v for k, v in local.items() if k != "predictions"} == \
        {k: v for k, v in distributed.items() if k != "predictions"}
    assert [r["image"] for r in local["predictions"]] == [r["image"] for r in distributed["predictions"]]
    for a, b in zip(local["predictions"], distributed["predictions"], strict=True):
        if "error" in a:
            assert a == b and a["image"].endswith("broken.jpg")
            continue
        assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
        np.testing.assert_allclose([t["probability"] for t in a["top"]], [t["probability"] for t in b["top"]],
                                   rtol=0, atol=1e-5)
    table = pq.read_table(out)
    assert table.num_rows == 21 and table.column_names == ["path", "error", "labels", "indices", "probabilities"]
    first = table.slice(0, 1).to_pylist()[0]
    top = distributed["predictions"][0]["top"]
    assert first["path"] == distributed["predictions"][0]["image"] and first["error"] is None
    assert first["labels"] == [t["label"] for t in top]
    assert first["probabilities"] == pytest.approx([t["probability"] for t in top])
    broken = [r for r in table.to_pylist() if r["error"]]
    assert len(broken) == 1 and broken[0]["path"].endswith("broken.jpg") and broken[0]["labels"] == []


def test_an_unreadable_image_is_named_not_a_crashed_job(ckpt, photos, capsys):
    code, document, err = predict(["--ckpt", str(ckpt), "--engine", "ray", str(photos)], capsys)
    assert code == 2 and document is None  # as in one process without --skip-unreadable: a one-line error
    assert "broken.jpg: unreadable image" in err and "Traceback" not in err
    assert (code, None, err) == predict(["--ckpt", str(ckpt), str(photos)], capsys)  # the same line


def test_uris_are_read_by_ray_in_path_order(ckpt, photos, capsys):
    """A URI is listed and read by Ray's file systems on the workers (file:// here, s3:// on a cluster)."""
    from vggnet.infer.raydata import predict_ray

    rows = predict_ray([f"file://{photos}"], ckpt, topk=2, batch_size=4, concurrency=2)
    code, local, _ = predict(["--ckpt", str(ckpt), "--topk", "2", "--skip-unreadable", str(photos)], capsys)
    assert code == 1 and len(rows) == 21
    assert [r["image"] for r in rows] == sorted(r["image"] for r in local["predictions"])
    by_path = {r["image"]: r for r in local["predictions"]}
    for row in rows:
        expected = by_path[row["image"]]
        assert ("error" in row) == ("error" in expected)
        if "top" in row:
            assert [t["index"] for t in row["top"]] == [t["index"] for t in expected["top"]]
            assert [t["probability"] for t in row["top"]] == pytest.approx(
                [t["probability"] for t in expected["top"]], abs=1e-5)


def test_features_equal_the_single_process_ones(ckpt, photos, tmp_path, capsys):
    from vggnet.transfer import load_features

    common = ["features", "--ckpt", str(ckpt), "--data", str(photos), "--scales", "1,48", "--val-fraction", "0.3",
              "--device", "cpu", "--no-bf16", "--batch-size", "5"]
    assert main([*common, "--out", str(tmp_path / "local.npz")]) == 0
    assert main([*common, "--engine", "ray", "--out", str(tmp_path / "ray.npz")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("1 unreadable skipped") == 2
    local, distributed = load_features(tmp_path / "local.npz"), load_features(tmp_path / "ray.npz")
    assert local.paths == distributed.paths and len(local.paths) == 20
    assert (local.labels == distributed.labels).all() and (local.split == distributed.split).all()
    assert local.fingerprint == distributed.fingerprint and local.describe() == distributed.describe()
    np.testing.assert_allclose(distributed.features, local.features, rtol=0, atol=1e-5)


def test_in_memory_images_through_the_python_api(ckpt):
    """The demo's digits live in memory, not in files: the arrays travel to the actors."""
    from vggnet.models import load_checkpoint
    from vggnet.transfer.features import extract_features
    from vggnet.transfer.ray_features import features_ray

    model, _ = load_checkpoint(ckpt)
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 32 + 2 * (i % 4), 40), generator=g, dtype=torch.uint8) for i in range(9)]
    options = {"layer": "block5_pool", "scales": [32], "crop": 32, "mean": META["mean"], "std": META["std"],
               "amp_bf16": False}
    expected, ok = extract_features(model, images, batch_size=9, **options)
    feats, ok_ray = features_ray(model, images, batch_size=2, concurrency=2, **options)
    assert ok.all() and ok_ray.all()
    torch.testing.assert_close(feats, expected, rtol=0, atol=1e-5)


def test_ray_flags_need_the_ray_engine(ckpt, photos, capsys):
    code, _, err = predict(["--ckpt", str(ckpt), "--concurrency", "4", str(photos)], capsys)
    assert code == 2 and "--concurrency applies only to --engine ray" in err


def test_missing_extra_is_one_line(ckpt, photos, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import ray` fails as it does without the extra
    code, _, err = predict(["--ckpt", str(ckpt), "--engine", "ray", str(photos)], capsys)
    assert code == 2 and "pip install 'vggnet[ray]'" in err and len(err.strip().splitlines()) == 1
    code = main(["features", "--ckpt", str(ckpt), "--data", str(photos), "--engine", "ray",
                 "--out", str(tmp_path / "f.npz")])
    assert code == 2 and "pip install 'vggnet[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "f.npz").exists()
