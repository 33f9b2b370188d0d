"""README claims that are numbers produced by the code are read back from the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

from vggnet.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
ZOO_ROW = re.compile(r"^\| `(?P<name>vgg\w+)` \| (?P<config>[^|]+?) \| (?P<layers>\d+) \| (?P<params>[\d,]+) \| "
                     r"(?P<gmacs>[\d.]+) \|$")


def zoo_rows() -> dict[str, dict[str, str]]:
    section = README.read_text().split("## The model zoo", 1)[1].split("\n## ", 1)[0]
    return {m["name"]: m.groupdict() for m in map(ZOO_ROW.match, section.splitlines()) if m}


def test_zoo_table_matches_vggnet_models_json(capsys) -> None:
    assert main(["models", "--json"]) == 0
    tool = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    rows = zoo_rows()
    assert set(rows) == {"vgg11", "vgg11_lrn", "vgg13", "vgg16_c", "vgg16", "vgg19"}
    for name, row in rows.items():
        assert row["config"].split()[0] == tool[name]["config"], name
        assert int(row["params"].replace(",", "")) == tool[name]["params"], name
        assert float(row["gmacs"]) == tool[name]["gmacs"], name
