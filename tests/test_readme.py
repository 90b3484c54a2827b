"""The READMEs: the top one is a front door whose equation index names code and tests that exist, in
the chapter that derives each row; every chapter folder has its README; every relative link points
to a file (and heading) that exists; chapters/README.md maps every module."""

import importlib
import re
from pathlib import Path

import pytest

from chapters import CHAPTERS

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
MAX_LINES = 150  # the top README, at most
INDEX_WITHIN = 60  # the equation index's heading, within the top README's first lines

# Every README a reader can land on.
READMES = sorted(
    {
        p
        for pattern in ("README.md", "*/README.md", "chapters/*/README.md")
        for p in REPO.glob(pattern)
        if not any(part.startswith(".") for part in p.relative_to(REPO).parts)
    }
)

# The rows the index must have, and the chapter that derives each (the chapter map in README.md). A
# row whose first cell is not here (a later chapter's own result) is checked against the chapter of
# its first named function; to make such a row required as well, add it here: CHAPTER_OF["Lemma 3"]
# = "ch10_dpo_family".
CHAPTER_OF = {
    "§2.1": "ch1_preference_models",
    "Definition 1": "ch5_theory",
    "Lemma 1": "ch5_theory",
    "Lemma 2": "ch5_theory",
    "Theorem 1": "ch5_theory",
    "Proposition 1": "ch5_theory",
    "§5.2 baselines": "ch5_theory",
}
for n, ch in [
    (range(1, 6), "ch6_ppo"),
    (range(6, 17), "ch1_preference_models"),
    (range(17, 27), "ch2_reward_model"),
    (range(27, 38), "ch3_kl_optimum"),
    (range(38, 42), "ch4_dpo"),
]:
    CHAPTER_OF.update({f"({i})": ch for i in n})


def index_rows():
    """Every body row of the table under "## Equation index": [eq., report, what, code, test]."""
    section = README.split("## Equation index", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if (
            line.lstrip().startswith("|")
            and len(cells) == 5
            and cells[0] != "eq."
            and set(cells[0]) != {"-"}
        ):
            yield cells


def resolve(name: str):
    """(module name, object) for a dotted name: the longest prefix that imports as a module, then
    getattr along the rest. An import error inside an existing module is raised, not skipped."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.startswith(e.name):
                continue  # this prefix is not a module: try a shorter one
            raise
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError: the name does not exist
        return module_name, obj
    raise ModuleNotFoundError(name)


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
        assert name.count(".") >= 3, (
            f"row {eq}: {name} should name its module, chapters.chN_x.module.name"
        )
        try:
            module, obj = resolve(name)
        except (ModuleNotFoundError, AttributeError) as e:
            pytest.fail(f"row {eq}: {name} does not exist ({e})")
        defined_in = getattr(obj, "__module__", module)
        assert defined_in == name.rpartition(".")[0], (
            f"row {eq}: {name} is defined in {defined_in}; name the module that defines it"
        )
    assert any(name.startswith(f"chapters.{chapter}.") for name in names), (
        f"row {eq}: nothing named in {chapter}"
    )
    tests = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", test)
    assert tests, f"row {eq}: no test named"
    for path, func in tests:
        assert re.search(rf"^\s*def {func}\(", (REPO / path).read_text(), re.M), (
            f"row {eq}: {path}::{func} missing"
        )


def test_top_readme_is_a_front_door_with_the_index_near_the_top():
    lines = README.splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines, at most {MAX_LINES}"
    heading = lines.index("## Equation index") + 1
    assert heading <= INDEX_WITHIN, (
        f"'## Equation index' is on line {heading}, not in the first {INDEX_WITHIN}"
    )


def test_every_chapter_folder_has_a_readme():
    folders = sorted(p for p in (REPO / "chapters").glob("ch*") if p.is_dir())
    assert folders, "no chapter folders found"
    missing = [p.name for p in folders if not (p / "README.md").is_file()]
    assert missing == [], f"chapter folders without README.md: {missing}"


def test_top_readme_links_the_other_readmes_and_every_chapter():
    wanted = ["gpt/README.md", "bench/README.md", "chapters/README.md"]
    wanted += [f"chapters/{ch}/README.md" for ch in CHAPTERS]
    missing = [w for w in wanted if f"]({w})" not in README and f"]({w}#" not in README]
    assert missing == [], f"README.md does not link {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"`|\*", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", path.read_text(), re.M)}


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_a_file_that_exists(readme):
    text = readme.read_text()
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (readme.parent / path).resolve() if path else readme
        if not file.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            bad.append(f"{target} (no such heading)")
    assert bad == [], f"{readme.relative_to(REPO)}: broken links {bad}"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_test_a_readme_names_exists(readme):
    missing = [
        f"{path}::{func}"
        for path, func in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", readme.read_text())
        if not (REPO / path).is_file()
        or not re.search(rf"^\s*def {func}\(", (REPO / path).read_text(), re.M)
    ]
    assert missing == [], f"{readme.relative_to(REPO)} names tests that do not exist: {missing}"


def tree_paths(text: str) -> set:
    """The files of the folder tree in chapters/README.md: the first code block after '## The tree',
    one entry a line, two spaces of indent per level, folders ending in '/'."""
    block = text.split("## The tree", 1)[1].split("```", 2)[1]
    stack, paths = [], set()
    for line in block.splitlines():
        m = re.match(r"( *)(\S+)", line)
        if not m or not (m.group(2).endswith("/") or m.group(2).endswith(".py")):
            continue  # a blank line or a description's continuation
        depth = len(m.group(1)) // 2
        del stack[depth:]
        if m.group(2).endswith("/"):
            stack.append(m.group(2).rstrip("/"))
        else:
            paths.add("/".join(stack + [m.group(2)]))
    return paths


def test_chapters_readme_maps_every_module():
    listed = tree_paths((REPO / "chapters" / "README.md").read_text())
    actual = {
        str(p.relative_to(REPO))
        for p in (REPO / "chapters").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert sorted(actual - listed) == [], "modules missing from chapters/README.md's tree"
    assert sorted(listed - actual) == [], (
        "chapters/README.md's tree lists modules that do not exist"
    )
