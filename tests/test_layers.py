"""The house rules, read from the source with `ast`: imports run in the book's order.

gpt ← chapters.common ← chapters.training ← ch1 ← ch2 ← … ← ch12 ← chapters.__main__. A module
imports from its own folder or from what stands before it, never from a later chapter; no import
loop inside a folder; every project import at the top of its module; matplotlib only where figures
are drawn.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = sorted(
    p for folder in ("gpt", "chapters") for p in (REPO / folder).rglob("*.py") if p.is_file()
)

# The two imports that must stay inside a function, and why: `python -m gpt.download` and `python -m
# gpt.generation` must find their module not yet loaded by `import gpt`.
LAZY = {("gpt/__init__.py", "gpt.generation"), ("gpt/checkpoint.py", "gpt.download")}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank(name: str) -> tuple:
    """(position in the book, folder): gpt 0, chapters' list and common 1, training 2, chapter N N +
    2, `python -m chapters` last."""
    if name == "gpt" or name.startswith("gpt."):
        return 0, "gpt"
    parts = name.split(".")
    if name == "chapters":
        return 1, "chapters"
    if parts[1] == "__main__":
        return 99, "chapters.__main__"
    if parts[1] == "common":
        return 1, "chapters.common"
    if parts[1] == "training":
        return 2, "chapters.training"
    m = re.fullmatch(r"ch(\d+)_\w+", parts[1])
    assert m, f"{name}: not in the book's order; put it in a chapter folder, common/ or training/"
    return int(m.group(1)) + 2, f"chapters.{parts[1]}"


def project_imports(path: Path):
    """(imported module, line, inside a function?) for every import of gpt or chapters in `path`."""
    tree = ast.parse(path.read_text())
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from chapters.x import y`: y may be a module of chapters.x
            names = [node.module]
            for a in node.names:
                if (REPO / node.module.replace(".", "/") / f"{a.name}.py").exists():
                    names.append(f"{node.module}.{a.name}")
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("gpt", "chapters"):
                yield name, node.lineno, id(node) in nested


def order_violations(paths) -> list:
    """Every import against the book's order, every project import inside a function, every loop in
    a folder."""
    bad, graph = [], {}
    for path in paths:
        here = module_name(path)
        where, folder = rank(here)
        rel = path.relative_to(REPO).as_posix()
        for name, line, in_function in project_imports(path):
            there, other = rank(name)
            if in_function and (rel, name) not in LAZY:
                bad.append(f"{rel}:{line}: imports {name} inside a function; import it at the top")
            if there > where or (there == where and other != folder):
                bad.append(f"{rel}:{line}: {here} imports {name}, which stands later in the book")
            if other == folder and name != here and name != folder:
                graph.setdefault(here, set()).add(name)
    for start in graph:  # a loop inside a folder: a path from a module back to itself
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name == start:
                bad.append(f"import loop through {start}")
                break
            if name not in seen:
                seen.add(name)
                todo.extend(graph.get(name, ()))
    return bad


def test_every_import_follows_the_books_order_with_no_loop_and_none_inside_a_function():
    assert order_violations(MODULES) == []


def test_a_planted_back_import_and_a_loop_are_caught(tmp_path, monkeypatch):
    """The checker itself: a chapter-3 module importing chapter 4, and two modules importing each
    other."""
    folder = tmp_path / "chapters" / "ch3_kl_optimum"
    folder.mkdir(parents=True)
    (folder / "a.py").write_text(
        "from chapters.ch4_dpo import dpo_loss\nimport chapters.ch3_kl_optimum.b\n"
    )
    (folder / "b.py").write_text("import chapters.ch3_kl_optimum.a\n\n\ndef f():\n    import gpt\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = "\n".join(order_violations(sorted(folder.glob("*.py"))))
    assert "imports chapters.ch4_dpo, which stands later in the book" in found
    assert "import loop through chapters.ch3_kl_optimum.a" in found
    assert "imports gpt inside a function" in found


def test_only_the_figures_module_imports_matplotlib():
    importers = [
        p.relative_to(REPO).as_posix()
        for p in MODULES
        if re.search(r"^\s*(import|from) matplotlib", p.read_text(), re.M)
    ]
    assert importers == ["chapters/common/figures.py"]


@pytest.mark.parametrize(
    "package, absent",
    [
        ("chapters.training", ("matplotlib",)),
        ("chapters.ch4_dpo", ("matplotlib", "chapters.training.loop")),
    ],
)
def test_importing_a_package_leaves_out_what_it_does_not_need(package, absent):
    """`import chapters.ch4_dpo` is the maths alone; tqdm is not checked, since `import torch` loads
    it."""
    code = f"import sys, {package}; print([m for m in {absent!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
