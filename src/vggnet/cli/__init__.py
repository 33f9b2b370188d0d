"""The single ``vggnet`` console entry point.

Each subcommand lives in its own module under ``vggnet.cli`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable
taking the parsed ``argparse.Namespace`` and returning an exit code. Subcommand
modules are imported lazily, only the one a call runs, so that ``vggnet --help``
or ``vggnet models`` never pays for importing training, data or serving code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Iterable, Sequence

from vggnet.errors import VggnetError

# Each subcommand's one-line help, in the order ``vggnet --help`` shows them. The same text is what the module's
# register() passes (tests/test_startup.py checks they agree): the top-level help prints it without importing any
# subcommand module, one of which (``data``) imports torch at its top.
SUBCOMMAND_HELP: dict[str, str] = {
    "train": "train a VGG from a recipe (a built-in one or a YAML file)",
    "eval": "test-time evaluation: single crop, dense, multi-crop, multi-scale, ensembles (the paper's Sec. 4)",
    "reproduce": "the paper's ablations: train A..E, evaluate every protocol, table beside the paper's",
    "features": "image descriptors for linear models: dense multi-scale features, flip-averaged, L2-normalised",
    "probe": "linear SVM / logistic regression on saved features, C by cross-validation (the paper's App. B)",
    "localize": "box regression (the paper's Appendix A): train, evaluate, draw boxes",
    "explain": "Grad-CAM heat maps for images, first-layer filters, feature maps by layer name",
    "compress": "prune filters, distil into a smaller student, quantization-aware training",
    "predict": "top-k labels for images (files, folders, globs) from a checkpoint or exported model",
    "export": "export a checkpoint to ONNX, .pt2 (AOTInductor), TorchScript, ExecuTorch (.pte) or LiteRT (.tflite), "
              "fp32 or INT8, checked against eager",
    "serve": "HTTP inference server: Open Inference Protocol (V2), dynamic batching, A/B versions, /metrics",
    "monitor": "live accuracy per model version from the prediction store, and A/B verdicts",
    "registry": "model registry (MLflow): register a run's checkpoint, list versions, promote with evidence, roll back",
    "retrain": "fine-tune a registered model on the reviewed samples of the prediction store, gate it, register it",
    "robustness": "accuracy under FGSM / PGD at several eps, and the adversarial guard's threshold and detection rate",
    "models": "list every VGG configuration with parameters and GMACs",
    "info": "show one model's layers with output shapes, parameters and MACs",
    "data": "prepare and inspect image datasets",
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``vggnet`` parser; with ``commands``, only those subcommands' modules are imported.

    The others become placeholders carrying their one-line help, enough for ``vggnet --help`` and for argparse's
    list of choices: a call pays for the one subcommand it runs, not for every module's imports.
    """
    wanted = set(SUBCOMMAND_HELP if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="vggnet",
        description="VGG networks from the paper to production: model zoo, training, evaluation, export, serving.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_line in SUBCOMMAND_HELP.items():
        if name not in wanted:
            if importlib.util.find_spec(f"vggnet.cli.{name}") is not None:  # else not shipped in this build
                sub.add_parser(name, help=help_line)
            continue
        try:
            module = importlib.import_module(f"vggnet.cli.{name}")
        except ModuleNotFoundError as exc:  # subcommand not shipped in this build
            if exc.name == f"vggnet.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def requested_command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (its first non-option word; the top level takes no values)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    command = requested_command(sys.argv[1:] if argv is None else argv)
    parser = build_parser([] if command is None else [command])
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head`
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (VggnetError, OSError) as exc:  # the user's mistake, or the OS refusing a path: one line, not a traceback
        print(f"vggnet {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    # anything else is a bug in vggnet or a library: it keeps its traceback


def one_line(exc: BaseException) -> str:
    """The message on one line (a log reader or `2>&1 | tail -1` sees all of it)."""
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
