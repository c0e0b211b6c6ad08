"""pyproject.toml and environment.yml must list the same packages with the same lower bounds."""

import re

import pytest
import yaml
from conftest import REPO_ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")

CONDA_TO_PIP = {"pytorch": "torch"}
NOT_PACKAGES = {"python", "pip"}


def lower_bounds(specs: list[str]) -> dict[str, str | None]:
    """{canonical name: the version after ">=" (or None)} for requirement strings."""
    bounds = {}
    for spec in specs:
        requirement = Requirement(spec)
        name = canonicalize_name(CONDA_TO_PIP.get(requirement.name, requirement.name))
        assert name not in bounds, f"{name} is listed twice"
        bounds[name] = next((s.version for s in requirement.specifier if s.operator == ">="), None)
    return bounds


def pyproject_requirements() -> list[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return project["dependencies"] + [spec for group in extras.values() for spec in group]


def environment_requirements() -> list[str]:
    environment = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    specs = []
    for entry in environment["dependencies"]:
        if isinstance(entry, dict):
            specs += [spec for spec in entry["pip"] if not spec.startswith("-e")]
        elif re.match(r"[\w.-]+", entry).group() not in NOT_PACKAGES:  # "python=3.11" is conda's
            specs.append(entry)
    return specs


def test_lower_bounds_parse():
    assert lower_bounds(["pytorch>=2.4", "tqdm", "numpy >=1.26,<3"]) == {
        "torch": "2.4", "tqdm": None, "numpy": "1.26"}


def test_pyproject_and_environment_agree():
    if not (REPO_ROOT / "environment.yml").exists():
        pytest.skip("no environment.yml")
    pip, conda = lower_bounds(pyproject_requirements()), lower_bounds(environment_requirements())
    assert "torch" in pip and "safetensors" in pip
    assert sorted(set(pip) - set(conda)) == [], "in pyproject.toml only"
    assert sorted(set(conda) - set(pip)) == [], "in environment.yml only"
    assert {name: (pip[name], conda[name]) for name in pip if pip[name] != conda[name]} == {}
