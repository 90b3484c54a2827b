"""The README's equation index names code that exists and tests that exist, for every chapter written."""
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()

# which chapter derives each row of the index (the chapter map in README.md)
CHAPTER_OF = {"§2.1": "ch1_preference_models", "Definition 1": "ch5_theory", "Lemma 1": "ch5_theory",
              "Lemma 2": "ch5_theory", "Theorem 1": "ch5_theory", "Proposition 1": "ch5_theory",
              "§5.2 baselines": "ch5_theory"}
for n, ch in [(range(1, 6), "ch6_ppo"), (range(6, 17), "ch1_preference_models"), (range(17, 27), "ch2_reward_model"),
              (range(27, 38), "ch3_kl_optimum"), (range(38, 42), "ch4_dpo")]:
    CHAPTER_OF.update({f"({i})": ch for i in n})


def index_rows():
    section = README.split("## Equation index", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in CHAPTER_OF:
            yield cells


def test_index_has_a_row_for_every_equation_and_result():
    assert sorted(row[0] for row in index_rows()) == sorted(CHAPTER_OF)


@pytest.mark.parametrize("row", list(index_rows()), ids=lambda r: r[0])
def test_index_row_names_existing_code_and_test(row):
    eq, _, _, code, test = row
    if not (REPO / "chapters" / f"{CHAPTER_OF[eq]}.py").exists():
        pytest.skip(f"{CHAPTER_OF[eq]} is not written yet")
    names = re.findall(r"`([^`]+)`", code)
    assert names, f"row {eq}: no code named"
    for name in names:
        module, _, attr = name.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), f"row {eq}: {name} does not exist"
    tests = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", test)
    assert tests, f"row {eq}: no test named"
    for path, func in tests:
        assert re.search(rf"^\s*def {func}\(", (REPO / path).read_text(), re.M), f"row {eq}: {path}::{func} missing"
