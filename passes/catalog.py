"""Imports every pass module of this package so that each registers itself with the registry.

Discovery is by module listing, so adding a pass is adding its file: no central list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil

import qgraph.passes as _package

_SKIPPED = {"base", "catalog"}

for _module in pkgutil.iter_modules(_package.__path__):
    if _module.name not in _SKIPPED and not _module.name.startswith("_"):
        importlib.import_module(f"{_package.__name__}.{_module.name}")
