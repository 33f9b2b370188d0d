"""Draw the production loop (issue 31) as one picture: docs/img/loop.png.

Drawn by the project with matplotlib (no diagram service, nothing downloaded), so it changes with the commands:
each box is a place the model or its data passes through, each arrow the `vggnet` command that moves it on.

    .venv/bin/python scripts/loop_diagram.py [--out docs/img/loop.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from vggnet.plots import save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# name: (x, y, title, body, colour); the plane is 0..18 wide, -1..10 high
BOXES = {
    "registry": (9.0, 8.6, "Model registry (MLflow)", "versions, metrics, lineage\naliases: champion · challenger",
                 "#dbe9f6"),
    "serve": (15.5, 6.2, "Server", "champion answers;\nchallenger in shadow (or A/B);\nswaps without a restart",
              "#e2f0d9"),
    "store": (15.5, 1.6, "Prediction store", "every prediction a row\n(SQLite · PostgreSQL)\n+ kept input crops",
              "#fff2cc"),
    "review": (9.0, 1.0, "Human review", "random sample · low confidence ·\nreports · A/B disagreements;\n"
               "one key per class", "#fce4d6"),
    "retrain": (2.5, 1.6, "Retrain + gate", "champion fine-tuned on data\n+ reviewed images; paired tests:\n"
                "val ≥ −margin, reviewed wins", "#ead1f5"),
    "report": (9.0, 4.8, "Monitor report", "live accuracy per version on the\nreviewed random sample;\n"
               "McNemar: better / worse / not yet", "#d9f2f2"),
}
W, H = 4.0, 1.8

# (start point, end point, curvature, the command that moves things on, where its label goes)
ARROWS = [
    ((11.0, 8.6), (15.5, 7.1), -0.25, "vggnet serve --registry URI --model M\n(polls; loads beside, then swaps)",
     (14.7, 8.75)),
    ((15.5, 5.3), (15.5, 2.5), 0.0, "--store URL --keep-inputs DIR\n(batched; never blocks)", (15.5, 3.9)),
    ((13.5, 1.6), (11.0, 1.0), 0.0, "GET /review, POST /v2/review/label\n(API key; who and when kept)",
     (12.4, -0.45)),
    ((7.0, 1.0), (4.5, 1.6), 0.0, "vggnet retrain --from M@champion\n--store URL --data DIR --out RUN", (5.6, -0.45)),
    ((2.5, 2.5), (7.0, 8.6), -0.3, "gate passed: registered,\naliased challenger\n(failed: registered,\nno alias)",
     (2.4, 6.6)),
    ((14.2, 2.5), (11.0, 4.8), 0.0, "vggnet monitor report --store URL", (12.2, 3.3)),
    ((9.0, 5.7), (9.0, 7.7), 0.0, "vggnet registry promote M  (on 'better',\nor --force --reason) · rollback M",
     (9.0, 6.7)),
]


def draw(out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(14, 8.6), dpi=110)
    ax.set_xlim(0.2, 17.8)
    ax.set_ylim(-1.2, 10.2)
    ax.axis("off")
    for x, y, title, body, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x - W / 2, y - H / 2), W, H, boxstyle="round,pad=0.08,rounding_size=0.25",
                                    facecolor=colour, edgecolor="#444444", linewidth=1.2))
        ax.text(x, y + 0.55, title, ha="center", va="center", fontsize=12.5, fontweight="bold")
        ax.text(x, y - 0.25, body, ha="center", va="center", fontsize=9.5, linespacing=1.3)
    for a, b, bend, command, (mx, my) in ARROWS:
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=18, linewidth=1.6, color="#333333",
                                     connectionstyle=f"arc3,rad={bend}", shrinkA=4, shrinkB=4))
        ax.text(mx, my, command, ha="center", va="center", fontsize=8.6, family="monospace", linespacing=1.25,
                bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "#bbbbbb", "alpha": 0.95})
    ax.text(9.0, 9.95, "The production loop: what is served comes back, and only a better model goes out",
            ha="center", va="center", fontsize=14, fontweight="bold")
    ax.text(0.4, -1.05, "monthly: deploy/retrain-cronjob.yaml (Kubernetes) or deploy/systemd/vggnet-retrain.timer",
            ha="left", va="center", fontsize=8.8, color="#555555")
    return save_figure(fig, out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "loop.png")
    args = p.parse_args()
    print(f"wrote {draw(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
