"""The phases of the compiler, in the only order a pipeline may visit them.

load ─▶ CANONICALIZE ─▶ ANNOTATE ─▶ (calibrate) ─▶ QUANTIZE ─▶ (QAT) ─▶ LOWER ─▶ save. A pass declares its phase; the
pass manager refuses a pipeline in which a pass comes after a pass of a later phase, rather than guessing an order.
"""

from __future__ import annotations

import enum


class Phase(enum.IntEnum):
    CANONICALIZE = 10
    ANNOTATE = 20
    QUANTIZE = 30
    LOWER = 40

    @property
    def label(self) -> str:
        return self.name.lower()
