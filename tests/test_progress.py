"""The progress bar as the command line draws it on a pipe (qgraph's own drawing; tqdm is not a dependency)."""

from __future__ import annotations

import io
import logging
import sys
import types

import pytest

from qgraph import progress
from qgraph.progress import Progress


def fake_clock(monkeypatch) -> list[float]:
    """The bar's clock, set by the test: ``now[0]`` seconds."""
    now = [0.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    return now


@pytest.fixture()
def drawn(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` raises ImportError: qgraph's own bar
    progress.set_enabled(True)
    yield io.StringIO()
    progress.set_enabled(None)


def test_the_bar_closes_when_its_total_is_done_and_later_work_is_not_counted(drawn, caplog, monkeypatch):
    now = fake_clock(monkeypatch)
    with caplog.at_level(logging.INFO, logger="qgraph.progress"):
        bar = Progress(64, "calibrating", unit="samples", stream=drawn)
        now[0] = 1.0
        bar.update(16)  # the first line on a pipe, with the ETA of the rate so far (3 s for 48 more)
        now[0] = 2.0
        bar.update(48)  # done: the final line and the log
        now[0] = 9.0  # the search and the speed choice that follow calibration
        bar.update(16)  # work after the total (another pass over the data) only counts
        bar.close()
    lines = drawn.getvalue().splitlines()
    assert lines == ["calibrating:  25% |#####...............| 16/64 samples [0:01 < 0:03]",
                     "calibrating: 100% |####################| 64/64 samples [0:02 < 0:00]"]
    assert [record.getMessage() for record in caplog.records] == ["calibrating: 64 samples in 2.0 s"]
    assert bar.done == 80


def test_an_unknown_total_counts_until_closed(drawn, monkeypatch):
    now = fake_clock(monkeypatch)
    with Progress(None, "training", unit="steps", stream=drawn) as bar:
        now[0] = 0.5
        bar.update(3)
        now[0] = 30.0
    assert drawn.getvalue().splitlines() == ["training: 3 steps [0:00]", "training: 3 steps [0:30]"]


def test_quiet_draws_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    stream = io.StringIO()
    logging.getLogger("qgraph").setLevel(logging.ERROR)  # what `qgraph --quiet` leaves
    try:
        with Progress(4, "calibrating", stream=stream) as bar:
            bar.update(4)
    finally:
        logging.getLogger("qgraph").setLevel(logging.NOTSET)
    assert stream.getvalue() == ""


def test_a_bar_closed_before_any_work_draws_nothing(drawn):
    # `qgraph optimize m.onnx -o m.onnx --calib c.npz` is refused inside the bar's block: only the error shows
    with pytest.raises(ValueError):
        with Progress(64, "calibrating", unit="samples", stream=drawn):
            raise ValueError("the output path is the input model")
    assert drawn.getvalue() == ""
