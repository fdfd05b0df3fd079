"""The documentation's links hold: every relative link in README.md, BENCHMARKS.md and docs/*.md
names a file that exists and, where it names a heading (`#anchor`), a heading that exists, so
moving or renaming a section cannot leave the front door pointing nowhere."""

import re

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def prose(text: str) -> str:
    """The text outside fenced code blocks, where a `](` is code, not a link."""
    return FENCE.sub("", text)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page) -> set[str]:
    lines = prose(page.read_text()).splitlines()
    return {anchor(line.lstrip("#")) for line in lines if line.startswith("#")}


def test_anchor_follows_githubs_rule():
    assert anchor(" The value optimisation (ROME's v*, MEMIT's z)") == (
        "the-value-optimisation-romes-v-memits-z"
    )
    assert anchor(" CounterFact (Table 4 layout)") == "counterfact-table-4-layout"
    assert anchor(" How the cost grows (`make bench-scaling`)") == (
        "how-the-cost-grows-make-bench-scaling"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_names_an_existing_file_and_heading(page):
    broken = []
    for link in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif fragment and target.suffix == ".md" and fragment not in anchors(target):
            broken.append(f"{link}: no heading #{fragment} in {target.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
