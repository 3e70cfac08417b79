"""Test-wide setup.

The speed choice (:mod:`qgraph.speed_choice`, on by default in :class:`qgraph.ptq.QuantizeOptions`) times the
candidate integer models on this machine and writes the fastest, so what a default run writes depends on the load
of the machine: a test of the quantizer's structure would see a lone stem convolution or a tiny MatMul kept FP32 on
one run and not on the next. Tests therefore get the target's plain lowering, as with ``--no-speed-choice``, unless
they are marked ``speed_choice`` (the tests of the speed choice as qgraph runs it).
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _plain_lowering_unless_marked(request, monkeypatch):
    if request.node.get_closest_marker("speed_choice") is not None:
        return
    from qgraph import pipeline, ptq

    def never(options, target) -> bool:
        return False

    monkeypatch.setattr(ptq, "speed_choice_applies", never)
    monkeypatch.setattr(pipeline, "speed_choice_applies", never)
