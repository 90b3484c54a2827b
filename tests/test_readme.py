"""The README's equation index names code that exists and tests that exist, in the chapter that derives each row."""
import importlib
import re
from pathlib import Path

import pytest

from chapters import CHAPTERS

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()

# The rows the index must have, and the chapter that derives each (the chapter map in README.md). A row whose first
# cell is not here (a later chapter's own result) is checked against the chapter of its first named function; to
# make such a row required as well, add it here: CHAPTER_OF["Lemma 3"] = "ch10_dpo_family".
CHAPTER_OF = {"§2.1": "ch1_preference_models", "Definition 1": "ch5_theory", "Lemma 1": "ch5_theory",
              "Lemma 2": "ch5_theory", "Theorem 1": "ch5_theory", "Proposition 1": "ch5_theory",
              "§5.2 baselines": "ch5_theory"}
for n, ch in [(range(1, 6), "ch6_ppo"), (range(6, 17), "ch1_preference_models"), (range(17, 27), "ch2_reward_model"),
              (range(27, 38), "ch3_kl_optimum"), (range(38, 42), "ch4_dpo")]:
    CHAPTER_OF.update({f"({i})": ch for i in n})


def index_rows():
    """Every body row of the table under "## Equation index": [eq., report, what, code, test]."""
    section = README.split("## Equation index", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and len(cells) == 5 and cells[0] != "eq." and set(cells[0]) != {"-"}:
            yield cells


def test_index_has_one_row_for_every_equation_and_result():
    firsts = [row[0] for row in index_rows()]
    assert sorted(set(CHAPTER_OF) - set(firsts)) == [], "rows missing from the equation index"
    assert sorted({f for f in firsts if firsts.count(f) > 1}) == [], "rows listed twice"


def chapter_of(row) -> str:
    eq, code = row[0], row[3]
    if eq in CHAPTER_OF:
        return CHAPTER_OF[eq]
    first = re.search(r"`chapters\.(\w+)\.", code)
    assert first, f"row {eq}: its first named function should be in the chapter that derives it"
    return first.group(1)


@pytest.mark.parametrize("row", list(index_rows()), ids=lambda r: r[0])
def test_index_row_names_existing_code_in_its_chapter_and_existing_tests(row):
    eq, _, _, code, test = row
    chapter = chapter_of(row)
    assert chapter in CHAPTERS, f"row {eq}: {chapter} is not in chapters.CHAPTERS"
    names = re.findall(r"`([^`]+)`", code)
    assert names, f"row {eq}: no code named"
    for name in names:
        module, _, attr = name.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), f"row {eq}: {name} does not exist"
    assert any(name.startswith(f"chapters.{chapter}.") for name in names), f"row {eq}: nothing named in {chapter}"
    tests = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", test)
    assert tests, f"row {eq}: no test named"
    for path, func in tests:
        assert re.search(rf"^\s*def {func}\(", (REPO / path).read_text(), re.M), f"row {eq}: {path}::{func} missing"
