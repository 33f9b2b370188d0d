"""The paper's published numbers (Tables 3-6) as data, for printing our small-scale tables beside them."""

from __future__ import annotations

import copy
import functools
from importlib import resources
from typing import Any

import yaml


@functools.cache
def _load() -> dict[str, list[dict[str, Any]]]:
    return yaml.safe_load(resources.files("vggnet.evaluate").joinpath("paper_results.yaml").read_text())


def paper_results() -> dict[str, list[dict[str, Any]]]:
    """Rows of the paper's Tables 3-6 keyed by ``table3`` ... ``table6`` (top-1/top-5 error, %).

    The YAML is parsed once; callers get their own copy, so editing a row never changes the next answer.
    """
    return copy.deepcopy(_load())


def paper_row(table: str, config: str, protocol: str = "dense", train_scale: Any = None) -> dict[str, Any]:
    """The one row of ``table`` for a config (and protocol / training scale when the table has several)."""
    rows = [r for r in paper_results()[table] if r["config"] == config and r["protocol"] == protocol
            and (train_scale is None or r["train_scale"] == train_scale)]
    if len(rows) != 1:
        raise KeyError(f"{len(rows)} rows in {table} for config={config} protocol={protocol} "
                       f"train_scale={train_scale}")
    return rows[0]
