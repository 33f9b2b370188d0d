"""Quantization-aware training (torchao PT2E) on a tiny VGG-11-BN trained on the embedded digits at 32×32.

One source run and one finished 1-epoch QAT folder are shared by the module (a QAT run builds a PTQ baseline
and converts and saves the INT8 model, which is most of its cost); the QAT model is evaluated eagerly
(``compile=False``) to keep Inductor compiles to the one the PTQ baseline needs.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vggnet.cli import main
from vggnet.compress.qat import (
    QuantizedModelError,
    calibrate_qat,
    convert_qat,
    load_qat,
    prepare_qat,
    qat_finetune,
    set_qat_mode,
)
from vggnet.engine.distributed import Dist
from vggnet.engine.inputs import build_inputs
from vggnet.engine.recipe import load_recipe
from vggnet.engine.trainer import train
from vggnet.infer import top1_agreement
from vggnet.models import WeightsNotFoundError, checkpoint_file, load_checkpoint

FAST = ["model.width=0.125", "data.image_size=32", "optim.batch_size=64", "train.threads=1",
        "train.deterministic=true", "train.precision=fp32", "train.channels_last=false", "schedule.epochs=3"]
CALIB = 64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained tiny run (~97 % on the digits' validation split): QAT must keep what it learned."""
    out = tmp_path_factory.mktemp("qat") / "run"
    train(load_recipe("demo", FAST), out, progress=False)
    return out


@pytest.fixture(scope="module")
def qat_run(run):
    """A finished one-epoch QAT folder."""
    out = run.parent / "qat-1"
    result = qat_finetune(run, out, epochs=1, calib_images=CALIB, compile=False, progress=False)
    assert result["trained_epochs"] == [1]
    return out


@pytest.fixture(scope="module")
def data(run):
    model, _ = load_checkpoint(run / "best.safetensors")
    inputs = build_inputs(load_recipe(run / "recipe.yaml"), Dist())
    train_batch = next(iter(inputs.train))
    val_x = torch.cat([x for x, _ in inputs.val])
    return model, train_batch, val_x


def test_prepare_train_one_step_convert_agrees_with_fp32(data):
    model, (images, targets), val_x = data
    prepared = prepare_qat(model, images)
    calibrate_qat(prepared, images)  # ranges from training images, as qat_finetune starts
    set_qat_mode(prepared, train=True)
    before = {k: v.detach().clone() for k, v in prepared.named_parameters()}
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3, momentum=0.9)
    loss = F.cross_entropy(prepared(images), targets)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [k for k, v in prepared.named_parameters() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)  # every conv and the classifier got a gradient through the fake quantizers

    converted = convert_qat(prepared)
    ops = {str(n.target) for n in converted.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in op for op in ops) and any("dequantize_per_channel" in op for op in ops)
    with torch.no_grad():
        want, got = model.eval()(val_x), converted(val_x)
    # INT8 rounding moves logits a little; a ~97 % model's decisions must not move: >= 97 % of 359 images agree,
    # and no logit is off by more than a tenth of the largest one (measured: 0.997 and 0.045).
    assert top1_agreement(got, want) >= 0.97
    assert float((got - want).abs().max() / want.abs().max()) < 0.1


def test_finished_run_reports_fp32_ptq_and_qat(qat_run, run):
    metrics = json.loads((qat_run / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["calib_images"] == CALIB and metrics["method"] == "qat"
    fp32, ptq, qat = metrics["fp32"]["top1"], metrics["ptq"]["top1"], metrics["qat"]["top1"]
    assert fp32 > 90 and abs(ptq - fp32) < 3 and abs(qat - fp32) < 3
    assert metrics["qat"]["agreement_with_fp32"] > 0.95 and metrics["ptq"]["agreement_with_fp32"] > 0.95
    assert [h["epoch"] for h in metrics["history"]] == [1]
    assert sorted(p.name for p in (qat_run / "checkpoints").iterdir()) == ["epoch-0001"]
    assert not list(qat_run.glob(".*"))  # no temporary file left behind
    with pytest.raises(WeightsNotFoundError):  # the folder offers no fp32 weights as its model (eval, export ...)
        checkpoint_file(qat_run)


def test_resume_trains_only_the_new_epoch(qat_run, run, tmp_path):
    out = tmp_path / "qat"
    shutil.copytree(qat_run, out)
    first = (out / "checkpoints" / "epoch-0001" / "state.pt").read_bytes()
    result = qat_finetune(run, out, epochs=2, calib_images=CALIB, compile=False, progress=False)
    assert result["trained_epochs"] == [2]
    assert [h["epoch"] for h in result["history"]] == [1, 2] and result["epochs"] == 2
    assert (out / "checkpoints" / "epoch-0001" / "state.pt").read_bytes() == first  # epoch 1 was not redone
    # QAT's part of the training loop's checkpoints: the prepared graph and the baseline
    one = torch.load(out / "checkpoints" / "epoch-0001" / "state.pt", weights_only=True)["module"]
    two = torch.load(out / "checkpoints" / "epoch-0002" / "state.pt", weights_only=True)["module"]
    assert one["baseline"] == two["baseline"]  # fp32 and PTQ measured once, carried over
    assert any(not torch.equal(one["graph"][k], two["graph"][k]) for k in one["graph"] if k.endswith("weight"))
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
    again = qat_finetune(run, out, epochs=2, calib_images=CALIB, compile=False, progress=False)
    assert again["trained_epochs"] == []
    with pytest.raises(ValueError, match="other settings"):
        qat_finetune(run, out, epochs=3, lr=0.5, calib_images=CALIB, compile=False, progress=False)


def test_interrupted_runs_leave_nothing_that_looks_finished(qat_run, run, tmp_path, monkeypatch):
    import vggnet.compress.qat as qat

    out = tmp_path / "qat"
    shutil.copytree(qat_run, out)
    finished = {p.name for p in qat_run.iterdir()}  # the training loop's run folder, qat.json, and the results
    assert {"checkpoints", "qat.json", "qat.pt2", "metrics.json"} <= finished

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    def killed_training(module, train):  # the loop switches the graph to training form as an epoch starts
        if train:
            raise KeyboardInterrupt
        set_qat_mode(module, train)

    def unfinished() -> None:  # everything of the run folder but the results, and no temporary file
        assert {p.name for p in out.iterdir()} == finished - {"qat.pt2", "metrics.json"}

    with monkeypatch.context() as m:  # killed while training epoch 2: the 1-epoch result is superseded, gone
        m.setattr(qat, "set_qat_mode", killed_training)
        with pytest.raises(KeyboardInterrupt):
            qat_finetune(run, out, epochs=2, calib_images=CALIB, compile=False, progress=False)
    unfinished()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001"]
    with monkeypatch.context() as m:  # killed while measuring the saved INT8 model: no qat.pt2 without metrics
        m.setattr(qat, "load_qat", killed)
        with pytest.raises(KeyboardInterrupt):
            qat_finetune(run, out, epochs=2, calib_images=CALIB, compile=False, progress=False)
    unfinished()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    result = qat_finetune(run, out, epochs=2, calib_images=CALIB, compile=False, progress=False)
    assert result["trained_epochs"] == [] and (out / "qat.pt2").is_file() and result["epochs"] == 2

    # and the killed run's result is the one a run never killed gets: graph, observers and RNG all resumed
    straight = tmp_path / "straight"
    shutil.copytree(qat_run, straight)
    expected = qat_finetune(run, straight, epochs=2, calib_images=CALIB, compile=False, progress=False)
    graphs = [torch.load(folder / "checkpoints" / "epoch-0002" / "state.pt", weights_only=True)["module"]["graph"]
              for folder in (out, straight)]
    assert graphs[0].keys() == graphs[1].keys()
    assert all(torch.equal(graphs[0][k], graphs[1][k]) for k in graphs[0])
    assert result["history"] == [{**h, "epoch_time": r["epoch_time"]}
                                 for h, r in zip(expected["history"], result["history"], strict=True)]
    assert result["qat"]["top1"] == expected["qat"]["top1"]


def test_quantized_or_exported_inputs_are_refused(qat_run, run, tmp_path):
    out = tmp_path / "never"
    onnx = tmp_path / "model.int8.onnx"
    onnx.write_bytes(b"\x08\x07" + b"QuantizeLinear" * 4)
    int8 = tmp_path / "int8.safetensors"
    save_file({"features.block1_conv1.weight": torch.zeros(4, 3, 3, 3, dtype=torch.int8)}, str(int8))
    for source, what in ((qat_run / "qat.pt2", "INT8 model"), (qat_run, "QAT output folder"),
                         (onnx, "quantized\\) ONNX"), (int8, "quantized state dict")):
        with pytest.raises(QuantizedModelError, match=f"{what}.*cannot be trained.*run folder or .safetensors"):
            qat_finetune(source, out, epochs=1)
    with pytest.raises(ValueError, match="made from .*best.safetensors"):
        qat_finetune(qat_run / "qat.pt2", out, epochs=1)
    with pytest.raises(ValueError, match="epochs must be"):
        qat_finetune(run, out, epochs=0)
    with pytest.raises(ValueError, match="lr must be"):
        qat_finetune(run, out, epochs=1, lr=0.0)
    with pytest.raises(ValueError, match="other kind of run"):  # a training run's folder is not a QAT folder
        qat_finetune(run, _training_copy(run, tmp_path), epochs=1, calib_images=CALIB)
    assert not out.exists()


def _training_copy(run, tmp_path):
    copy = tmp_path / "train-copy"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    return copy


def test_a_head_that_does_not_export_is_a_clear_error(run, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(torch.export, "export", refuse)
    out = tmp_path / "qat"
    with pytest.raises(ValueError, match="'gap' head cannot be captured by torch.export"):
        qat_finetune(run, out, epochs=1, calib_images=CALIB)
    assert not out.exists()


def test_saved_result_loads_and_predicts_without_calibration_data(qat_run, data):
    model, _, val_x = data
    saved = load_qat(qat_run)
    prep = saved.prep
    assert (prep.image_size, prep.mean, prep.classes) == (32, (0.5, 0.5, 0.5), tuple(str(i) for i in range(10)))
    assert saved.meta["quantization"]["method"] == "qat" and saved.meta["format"] == "vggnet-export"
    with torch.no_grad():
        want = model.eval()(val_x[:40])
    got = saved(val_x[:40])
    assert got.shape == (40, 10) and top1_agreement(got, want) >= 0.95
    image = ((val_x[0] * 0.5 + 0.5) * 255).round().to(torch.uint8)  # back to the pixels it was made from
    assert saved.predictor().predict([image], topk=1)[0][0][0] == prep.label(int(got[0].argmax()))
    with pytest.raises(ValueError, match="expected a batch of shape"):
        saved(val_x[:2, :, :16, :16])

    # and with torch alone in a fresh process: no torchao, no vggnet, no calibration images
    code = ("import json, sys, torch, torch.ao.quantization.fx._decomposed\n"
            "extra = {'vggnet.json': ''}\n"
            "program = torch.export.load(sys.argv[1], extra_files=extra)\n"
            "x = torch.load(sys.argv[2])\n"
            "print(json.dumps({'classes': json.loads(extra['vggnet.json'])['preprocessing']['classes'], "
            "'pred': program.module()(x).argmax(1).tolist(), 'torchao': 'torchao' in sys.modules}))")
    x_file = qat_run.parent / "x.pt"
    torch.save(val_x[:5].clone(), x_file)
    proc = subprocess.run([sys.executable, "-c", code, str(qat_run / "qat.pt2"), str(x_file)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["pred"] == got[:5].argmax(1).tolist() and report["classes"][0] == "0" and not report["torchao"]


def test_cli_help_and_table(qat_run, run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "qat", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "vggnet compress qat --ckpt runs/demo --out runs/demo-qat --epochs 2" in text and "qat.pt2" in text
    out = tmp_path / "qat"
    shutil.copytree(qat_run, out)  # finished: the command reports without training
    assert main(["compress", "qat", "--ckpt", str(run), "--out", str(out), "--epochs", "1", "--calib", str(CALIB),
                 "--no-compile"]) == 0
    table = capsys.readouterr().out
    for row in ("fp32 (source)", "PTQ INT8", "QAT INT8 (1 ep)", "agrees with fp32"):
        assert row in table
    assert main(["compress", "qat", "--ckpt", str(out / "qat.pt2"), "--out", str(tmp_path / "x")]) == 2
    assert "cannot be trained" in capsys.readouterr().err


def test_predict_and_load_exported_take_the_qat_file(qat_run, data, tmp_path, capsys):
    """`qat.pt2` is a torch.export program, not an AOTInductor package: the export reader tells them apart."""
    from PIL import Image

    from vggnet.export import load_exported

    _, _, val_x = data
    loaded = load_exported(qat_run / "qat.pt2")
    assert loaded.format == "pt2-int8" and loaded.meta["quantization"]["method"] == "qat"
    saved = load_qat(qat_run)
    assert torch.equal(loaded(val_x[:8]).argmax(1), saved(val_x[:8]).argmax(1))
    image = ((val_x[0] * 0.5 + 0.5) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(image).save(tmp_path / "digit.png")
    assert main(["predict", "--ckpt", str(qat_run / "qat.pt2"), str(tmp_path / "digit.png"), "--topk", "1",
                 "--json"]) == 0
    out = capsys.readouterr().out
    assert saved.predictor().predict([Image.open(tmp_path / "digit.png")], topk=1)[0][0][0] in out
