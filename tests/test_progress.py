"""vggnet.progress: off a terminal, long work still reports progress as whole lines with a time-left estimate."""

from __future__ import annotations

import io

import vggnet.progress as progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_lines_every_interval_with_estimate(monkeypatch) -> None:
    out = io.StringIO()  # not a terminal
    clock = FakeClock()
    monkeypatch.setattr("tqdm.std.time", clock, raising=False)
    bar = progress.progress_bar(total=100, desc="eval single", unit="img", out=out, progress=True)
    bar._time = clock
    bar.start_t = bar.last_print_t = 0.0
    for _ in range(100):
        clock.now += 1.0  # one image a second: 100 s of work
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("eval single: 0/100 img (0%)")
    # a line at the start, one every 30 s and one at the end; never one per image
    assert 4 <= len(lines) <= 6, lines
    assert "30/100 img (30%)" in lines[1] and "01:10 left" in lines[1], lines[1]
    assert lines[-1].startswith("eval single: 100/100 img (100%)")


def test_disabled_writes_nothing() -> None:
    out = io.StringIO()
    bar = progress.progress_bar(total=10, desc="x", out=out, progress=False)
    bar.update(10)
    bar.close()
    assert out.getvalue() == ""


def test_unasked_progress_waits_one_interval(monkeypatch) -> None:
    out = io.StringIO()
    clock = FakeClock()
    monkeypatch.setattr("tqdm.std.time", clock, raising=False)
    bar = progress.progress_bar(total=100, desc="decoding", unit="img", out=out)  # progress=None: not asked
    bar._time = clock
    bar.start_t = bar.last_print_t = 0.0
    for _ in range(20):  # 20 s of work: shorter than the interval, so nothing but the closing line
        clock.now += 1.0
        bar.update(1)
    assert out.getvalue() == ""
    for _ in range(40):
        clock.now += 1.0
        bar.update(1)
    assert out.getvalue().splitlines()[0].startswith("decoding: 30/100 img (30%)")
