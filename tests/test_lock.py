"""requirements.txt is pyproject.toml's install with every extra users get (`.[all]`), pinned: the two cannot drift
apart silently."""

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;#]+)(?:\s*;[^#]*)?(?:\s*#\s*via (.*))?$")


def declared() -> dict[str, Requirement]:
    """`dependencies` and the `all` extra, its references to the project's own extras expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras, wanted, out = project["optional-dependencies"], ["all"], {}
    requirements = [*map(Requirement, project["dependencies"])]
    while wanted:
        for requirement in map(Requirement, extras[wanted.pop()]):
            if canonicalize_name(requirement.name) == canonicalize_name(project["name"]):
                wanted += sorted(requirement.extras)
            else:
                requirements.append(requirement)
    for requirement in requirements:
        out[canonicalize_name(requirement.name)] = requirement
    return out


def locked() -> dict[str, tuple[Version, str]]:
    """name -> (pinned version, what pulls it in) for every package line of the lock."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"requirements.txt line is not an exact pin: {line!r}"
        name, version, via = match.groups()
        pins[canonicalize_name(name)] = (Version(version), via or "")
    return pins


def test_the_lock_says_how_to_regenerate_it():
    assert "make lock" in (ROOT / "requirements.txt").read_text(encoding="utf-8").split("\n\n")[0]


def test_every_declared_dependency_is_pinned_within_its_range():
    pins = locked()
    for name, requirement in declared().items():
        assert name in pins, f"{name} is in pyproject.toml but not in requirements.txt: run `make lock`"
        assert requirement.specifier.contains(pins[name][0], prereleases=True), (
            f"requirements.txt pins {name} {pins[name][0]}, outside pyproject.toml's {requirement.specifier}"
        )


def test_every_direct_pin_is_still_declared():
    names = declared()
    for name, (_, via) in locked().items():
        if "lccc-sft (pyproject.toml)" in via:
            assert name in names, f"requirements.txt pins {name} for the project, which pyproject.toml dropped"
