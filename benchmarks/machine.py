"""What every benchmark records about the machine it ran on (imported by the scripts beside it)."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo; ``platform`` names only the architecture on Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(path: Path, benchmark: str, args: argparse.Namespace, **fields: Any) -> None:
    """The results file every training benchmark writes: what, when, where, the command, then its numbers."""
    import torch  # only the scripts that train need it; keep this module importable without

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "benchmark": benchmark, "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: str(v) for k, v in vars(args).items() if k != "out"}, **fields}, indent=2) + "\n")
    print(f"wrote {path}")
