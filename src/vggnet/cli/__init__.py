"""The single ``vggnet`` console entry point.

Each subcommand lives in its own module under ``vggnet.cli`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable
taking the parsed ``argparse.Namespace`` and returning an exit code. Subcommand
modules are imported lazily so that ``vggnet models`` never pays for importing
training or serving code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order here is the order shown in ``vggnet --help``.
_SUBCOMMANDS = ["train", "eval", "reproduce", "features", "probe", "localize", "explain", "compress", "predict",
                "export", "serve", "models", "info", "data"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vggnet",
        description="VGG networks from the paper to production: model zoo, training, evaluation, export, serving.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"vggnet.cli.{name}")
        except ModuleNotFoundError as exc:  # subcommand not shipped in this build
            if exc.name == f"vggnet.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
    except (OSError, ValueError) as exc:  # bad paths, files and values: a message, not a traceback
        print(f"vggnet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
