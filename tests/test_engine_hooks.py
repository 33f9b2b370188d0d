"""TrainHooks: a wrapped module is trained, checkpointed and resumed by the ordinary loop, hooks called in order."""

import json

import pytest
import torch
from torch import nn

from vggnet.engine import TrainHooks, load_recipe, train
from vggnet.errors import UsageError
from vggnet.models import load_checkpoint

FAST = ["model.width=0.125", "data.image_size=32", "optim.batch_size=64", "train.threads=1",
        "train.deterministic=true", "train.precision=fp32", "train.channels_last=false", "schedule.epochs=2"]


class Wrapper(nn.Module):
    """What a QAT step would return from wrap_model, reduced to a module around the VGG."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class Recorder:
    """Hooks that log every call; the wrapped module's state goes through them."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def hooks(self) -> TrainHooks:
        return TrainHooks(check_inputs=self.check_inputs, wrap_model=self.wrap_model, set_mode=self.set_mode,
                          state_dict=self.state_dict, load_state_dict=self.load_state_dict, finish=self.finish)

    def check_inputs(self, inputs):
        self.calls.append("check_inputs")

    def wrap_model(self, model, inputs):
        self.calls.append("wrap_model")
        return Wrapper(model)

    def set_mode(self, module, training):
        assert isinstance(module, Wrapper)
        self.calls.append("train" if training else "eval")
        module.train(training)

    def state_dict(self, module):
        self.calls.append("state_dict")
        return module.state_dict()

    def load_state_dict(self, module, state):
        self.calls.append("load_state_dict")
        module.load_state_dict(state)

    def finish(self, module, out_dir, inputs):
        self.calls.append("finish")
        return {"finished_with": type(module).__name__}


def test_wrapped_module_hooks_in_order_and_resume_equals_a_straight_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    plain = train(load_recipe("demo", FAST), straight, progress=False)

    first = Recorder()
    train(load_recipe("demo", [*FAST, "train.stop_after_epoch=1"]), resumed, progress=False, hooks=first.hooks())
    assert first.calls == ["check_inputs", "wrap_model", "train", "eval", "state_dict"]  # stopped: no finish

    second = Recorder()
    result = train(load_recipe("demo", FAST), resumed, progress=False, hooks=second.hooks())
    assert second.calls == ["check_inputs", "wrap_model", "load_state_dict", "train", "eval", "state_dict", "finish"]
    assert result["finished_with"] == "Wrapper" and result["epoch"] == 2
    assert result["val_top1"] == pytest.approx(plain["val_top1"])
    assert "finished_with" not in json.loads((resumed / "final.json").read_text())  # returned, not recorded

    state = torch.load(resumed / "checkpoints/epoch-0002/state.pt", weights_only=True)
    assert any(key.startswith("inner.") for key in state["module"])  # the wrapped module's own checkpoint
    a = load_checkpoint(straight / "last.safetensors")[0].state_dict()
    b = load_checkpoint(resumed / "last.safetensors")[0].state_dict()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


@pytest.mark.parametrize("setting", ["train.ema=0.9", "train.lookahead=2", "train.channels_last=true",
                                     "train.compile=true", "optim.lr_mult={features: 0.1}"])
def test_a_wrapped_module_refuses_what_works_on_the_vgg_only(tmp_path, setting):
    hooks = TrainHooks(wrap_model=lambda model, inputs: Wrapper(model))
    with pytest.raises(UsageError, match=setting.split("=")[0]):
        train(load_recipe("demo", [*FAST, setting]), tmp_path / "run", hooks=hooks)
    assert not (tmp_path / "run").exists()


def test_loss_hook_replaces_the_cross_entropy(tmp_path):
    seen = []

    def loss(logits, targets, images):
        seen.append(images.shape[0])
        return torch.nn.functional.cross_entropy(logits, targets)

    train(load_recipe("demo", [*FAST, "schedule.epochs=1"]), tmp_path / "run", progress=False,
          hooks=TrainHooks(loss=loss))
    assert seen and set(seen) == {64}
