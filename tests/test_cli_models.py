"""`vggnet models` and `vggnet info` through the real entry point."""

import subprocess
import sys
from pathlib import Path

import vggnet
from vggnet.cli import main
from vggnet.models import save_checkpoint


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "vgg16_c" in out and "138,357,544" in out and "15.47" in out
    assert len([line for line in out.splitlines() if line.startswith("vgg")]) == 12


def test_models_json(capsys):
    import json

    assert main(["models", "--json", "--num-classes", "10"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(vggnet.list_models())
    assert all(r["paper_params_millions"] is None for r in rows)  # 10 classes: not the paper's nets
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["vgg16"]["paper_params_millions"] == 138 and round(rows["vgg16"]["params"] / 1e6) == 138
    assert rows["vgg16_bn"]["paper_params_millions"] is None


def test_info_layer_table(capsys):
    assert main(["info", "vgg11_lrn", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "block1_lrn" in out and "512×1×1" in out and "fc8" in out


def test_info_from_checkpoint(tmp_path, capsys):
    path = save_checkpoint(vggnet.create_model("vgg13", width=0.25, fc_width=32, num_classes=3),
                           tmp_path / "m.safetensors")
    assert main(["info", str(path), "--input-size", "64"]) == 0
    assert "fc8" in capsys.readouterr().out


def test_unknown_model_exits_2(capsys):
    assert main(["info", "vgg17"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_console_script_help():
    script = Path(sys.executable).parent / "vggnet"
    out = subprocess.run([str(script), "info", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "layer table" in out.stdout
    out = subprocess.run([sys.executable, "-m", "vggnet", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "models" in out.stdout
