"""The installed package must hold every subpackage and the bundled models and data, not only an editable checkout."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"qgraph": ROOT / "qgraph", "qgraph.passes": ROOT / "passes", "qgraph.models": ROOT / "models"}


def _configuration() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed():
    listed = set(_configuration()["packages"])
    found = set()
    for package, folder in MAPPED.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder)
            found.add(".".join([package, *relative.parts]))
    assert found - listed == set(), "packages missing from pyproject.toml"


def test_bundled_models_and_data_are_package_data():
    patterns = _configuration()["package-data"]["qgraph.models"]
    models = ROOT / "models"
    bundled = [*models.glob("trained/*.onnx"), *models.glob("data/*.npz")]
    assert bundled
    for path in bundled:
        relative = path.relative_to(models).as_posix()
        assert any(Path(relative).match(pattern) for pattern in patterns), relative
