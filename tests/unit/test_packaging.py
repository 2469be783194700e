"""The wheel installs one top-level name, ``stepline``, with the four folders inside it."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "worker", "scheduler", "producer")


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The file names in a wheel built from the checkout by hatchling itself (in-process, quick)."""
    from hatchling.builders.wheel import WheelBuilder

    out = tmp_path_factory.mktemp("wheel")
    [built] = WheelBuilder(str(ROOT)).build(directory=str(out), versions=["standard"])
    with zipfile.ZipFile(built) as wheel:
        return wheel.namelist()


def test_wheel_has_only_stepline_at_the_top(wheel_files: list[str]) -> None:
    tops = {name.split("/")[0] for name in wheel_files if not name.startswith("stepline-")}
    assert tops == {"stepline"}


def test_wheel_maps_each_package_into_stepline(wheel_files: list[str]) -> None:
    for package in PACKAGES:
        assert f"stepline/{package}/__init__.py" in wheel_files, package
        assert f"stepline/{package}/py.typed" in wheel_files, package
    assert "stepline/__init__.py" in wheel_files
    assert "stepline/py.typed" in wheel_files


def test_wheel_holds_the_migrations_and_no_caches(wheel_files: list[str]) -> None:
    assert "stepline/shared/db/migrations/env.py" in wheel_files
    assert "stepline/shared/db/migrations/script.py.mako" in wheel_files
    versions = [name for name in wheel_files if name.startswith("stepline/shared/db/migrations/versions/")]
    shipped = sorted(p.name for p in (ROOT / "shared" / "db" / "migrations" / "versions").glob("*.py"))
    assert sorted(Path(name).name for name in versions) == shipped
    assert not [name for name in wheel_files if "__pycache__" in name or name.endswith(".pyc")]


def test_wheel_ships_every_file_of_the_folders(wheel_files: list[str]) -> None:
    # What each folder holds (bar bytecode) is what the wheel has under stepline/<folder>.
    on_disk = [
        f"stepline/{path.relative_to(ROOT).as_posix()}"
        for package in PACKAGES
        for path in (ROOT / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    shipped = [name for name in wheel_files if name.startswith(tuple(f"stepline/{p}/" for p in PACKAGES))]
    assert sorted(shipped) == sorted(on_disk)


def test_a_wheel_built_from_the_sdist_is_the_same(wheel_files: list[str], tmp_path: Path) -> None:
    # pip and ``python -m build`` build the wheel from the sdist: the links must not be in it
    # (hatchling would follow them and take each folder once, under either name).
    from hatchling.builders.sdist import SdistBuilder
    from hatchling.builders.wheel import WheelBuilder

    [sdist] = SdistBuilder(str(ROOT)).build(directory=str(tmp_path), versions=["standard"])
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        archive.extractall(tmp_path / "unpacked", filter="data")
    top = Path(sdist).name.removesuffix(".tar.gz")
    assert f"{top}/worker/__init__.py" in names
    assert not [name for name in names if name.startswith(tuple(f"{top}/stepline/{p}" for p in PACKAGES))]
    [unpacked] = (tmp_path / "unpacked").iterdir()
    [wheel] = WheelBuilder(str(unpacked)).build(directory=str(tmp_path / "wheel"), versions=["standard"])
    with zipfile.ZipFile(wheel) as built:
        assert sorted(built.namelist()) == sorted(wheel_files)


def test_wheel_ships_the_dashboard_s_templates_and_assets(wheel_files: list[str]) -> None:
    # The dashboard needs no network: its style sheet, script and icon come from the package.
    for name in (
        "templates/base.html",
        "templates/instance.html",
        "static/dashboard.css",
        "static/dashboard.js",
    ):
        assert f"stepline/producer/dashboard/{name}" in wheel_files, name
