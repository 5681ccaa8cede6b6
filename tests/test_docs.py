"""The README and docs/ point only at things that exist: relative links, make targets and `lccc-sft` commands."""

import re
from pathlib import Path

import pytest

from sft.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *ROOT.glob("README.*.md"), *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")


def make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target) or target.startswith(("#", "mailto:")):
            continue
        path = target.split("#", 1)[0]
        assert (page.parent / path).exists(), f"{page.name} links to {target}, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_make_targets_and_commands_exist(page):
    text = page.read_text(encoding="utf-8")
    targets = make_targets()
    for named in re.findall(r"(?:`|^|\$ )make ([a-z][\w-]*)", text, re.M):
        assert named in targets, f"{page.name} names `make {named}`, which the Makefile does not have"
    for named in re.findall(r"\blccc-sft ([a-z][\w-]*)(?!\.)", text):
        assert named in COMMANDS, f"{page.name} names `lccc-sft {named}`, which is not a command"


@pytest.mark.parametrize("readme", sorted(ROOT.glob("README*.md")), ids=lambda p: p.name)
def test_named_files_exist(readme):
    """Every repository path a README names in backticks (`recipes/x.yaml`, `sft/run.py`) is there."""
    tops = "|".join(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("."))
    for path in re.findall(rf"`((?:{tops})/[\w./-]*\w)`", readme.read_text(encoding="utf-8")):
        if path.startswith(("output/", "build/")):  # made by the commands
            continue
        assert (ROOT / path).exists(), f"{readme.name} names {path}, which does not exist"


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
