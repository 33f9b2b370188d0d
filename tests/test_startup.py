"""Start-up cost: `import vggnet`, `vggnet --help` and the light subcommands import no torch (issue #28, item 6).

Each check runs in a fresh interpreter, since this test process has long imported torch (conftest.py does).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vggnet.cli import SUBCOMMAND_HELP, build_parser, main, requested_command

# the libraries whose import costs seconds; none of them is needed to print help
HEAVY = ("torch", "torchvision", "numpy", "PIL", "safetensors", "fastapi", "onnx", "onnxruntime", "mlflow",
         "matplotlib", "sklearn")


def heavy_imports(code: str) -> list[str]:
    """The heavy top-level packages a fresh interpreter has imported after running ``code``."""
    probe = (f"import contextlib, io, json, sys\n"
             f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
             f"    {code}\n"
             f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_import_vggnet_and_the_errors_import_no_torch():
    assert heavy_imports("import vggnet, vggnet.errors, vggnet.models.configs, vggnet.cli") == []


@pytest.mark.parametrize("argv", [["--help"], [], ["models", "--help"], ["info", "--help"]])
def test_help_imports_no_torch(argv):
    assert heavy_imports(f"from vggnet.cli import main; main({argv!r})") == []


# every other subcommand's --help too: a module that imports torch at its top costs seconds on each call
@pytest.mark.parametrize("command", [name for name in SUBCOMMAND_HELP if name not in ("models", "info")])
def test_subcommand_help_imports_no_torch(command):
    assert heavy_imports(f"from vggnet.cli import main; main([{command!r}, '--help'])") == []


def test_the_python_m_entry_point_imports_no_torch_for_help():
    """`python -X importtime -m vggnet --help` lists every module imported: torch is not one of them."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "vggnet", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "usage: vggnet" in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "vggnet.cli" in imported and "torch" not in imported


def test_the_models_command_still_counts(capsys):
    """Its torch import moved into run: the numbers are the same (VGG-16: 138,357,544 parameters, 15.47 GMACs)."""
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["vgg16"]["params"] == 138_357_544 and rows["vgg16"]["gmacs"] == 15.47


def test_top_level_help_is_the_one_every_module_registers():
    """The placeholders' one-line help (`vggnet --help` imports no subcommand) is each module's own, in order."""
    assert build_parser([]).format_help() == build_parser().format_help()
    sub = build_parser()._subparsers._group_actions[0]
    assert list(sub.choices) == list(SUBCOMMAND_HELP)
    assert {action.dest: action.help for action in sub._choices_actions} == SUBCOMMAND_HELP


def test_only_the_requested_subcommand_is_built():
    assert requested_command(["--help"]) is None and requested_command([]) is None
    assert requested_command(["info", "vgg16", "--width", "0.5"]) == "info"
    sub = build_parser(["info"])._subparsers._group_actions[0]
    assert sub.choices["info"].get_default("func") is not None  # the real parser
    assert sub.choices["train"].get_default("func") is None  # a placeholder


def test_unknown_command_is_still_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err


def test_lazy_names_are_the_model_zoo():
    """`vggnet.create_model` and friends still work without an explicit `import vggnet.models`."""
    import vggnet.models

    for name in set(vggnet.__all__) - {"__version__", "UsageError", "VggnetError"}:
        assert getattr(vggnet, name) is getattr(vggnet.models, name), name
    assert set(vggnet.__all__) <= set(dir(vggnet))
    assert set(vggnet.models.__all__) <= set(dir(vggnet.models))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vggnet.nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vggnet.models.nope  # noqa: B018
    assert heavy_imports("import vggnet; vggnet.models.list_models()") == []
    assert "torch" in heavy_imports("import vggnet; vggnet.VGG")  # the probe does see torch when it is imported
