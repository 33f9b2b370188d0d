"""The paper's Tables 3-6 as data: the figures the issue quotes, and the paper's conclusions in its own numbers."""

from vggnet.evaluate.paper import paper_results, paper_row


def test_tables_quoted_in_the_issue():
    assert (paper_row("table3", "D", train_scale=256)["top1"], paper_row("table3", "D", train_scale=256)["top5"]) \
        == (27.0, 8.8)
    d_multi = paper_row("table4", "D", train_scale=[256, 512])
    assert (d_multi["top1"], d_multi["top5"]) == (24.8, 7.5)
    both = paper_row("table5", "D", "dense+multicrop")
    assert (both["top1"], both["top5"]) == (24.4, 7.2)
    ens = paper_row("table6", "D+E", "dense+multicrop")
    assert (ens["top1"], ens["top5"]) == (23.7, 6.8)


def test_every_config_and_table_present_and_well_formed():
    tables = paper_results()
    assert sorted(tables) == ["table3", "table4", "table5", "table6"]
    assert {r["config"] for r in tables["table3"]} == {"A", "A-LRN", "B", "C", "D", "E"}
    for rows in tables.values():
        for r in rows:
            assert 0 < r["top5"] < r["top1"] < 100 and r["test_scales"]


def test_the_papers_conclusions_hold_in_its_own_numbers():
    t3 = {r["config"]: r["top1"] for r in paper_results()["table3"] if r["train_scale"] == 256}
    assert t3["A"] > t3["B"] > t3["C"] > t3["D"]  # depth helps from A to D
    assert t3["A-LRN"] >= t3["A"]  # LRN does not help
    assert t3["C"] > t3["D"]  # 1x1 convs are worse than 3x3
    jitter = paper_row("table3", "D", train_scale=[256, 512])["top1"]
    assert jitter < paper_row("table3", "D", train_scale=384)["top1"]  # scale jitter helps
    assert paper_row("table4", "D", train_scale=[256, 512])["top1"] < jitter  # multi-scale testing helps
    assert paper_row("table5", "D", "dense+multicrop")["top1"] < paper_row("table5", "D", "multicrop")["top1"]
    assert paper_row("table6", "D+E", "dense+multicrop")["top1"] < paper_row("table5", "D", "dense+multicrop")["top1"]
