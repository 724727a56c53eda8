"""The house rules, checked on the source: imports flow one way, modules and classes stay
small enough to read, and every package is a real package the wheel ships."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from harness import manual

PACKAGE = Path(__file__).parent.parent / "pickupd"
# The foundation at the top of the package: anything may import these, they import only
# each other.
BASE = {"errors", "outcome", "ids", "units", "log"}
# Sub-packages, lowest first: each may import the base, itself and the ones before it.
LAYERS = [
    "spool", "message", "auth", "config", "limits", "smtp", "graph", "record", "workers", "intake",
    "hosting",
]  # fmt: skip
# What stands above them: the steps that tie the others together, then the command line.
TOP, CLI = len(LAYERS), len(LAYERS) + 1


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): path
        for path in PACKAGE.rglob("*.py")
    }


def _rank(module: str) -> int:
    """-1 for the base; a layer's index; TOP for top-level modules; CLI for cli/."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in ("__init__", "__main__"):
        return CLI
    if parts[0] in BASE:
        return -1
    if parts[0] in LAYERS:
        return LAYERS.index(parts[0])
    return CLI if parts[0] == "cli" else TOP


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pickupd":
                found.update(f"pickupd.{alias.name}" for alias in node.names)
            elif node.module.startswith("pickupd."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pickupd."))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; write pickupd.<package>.<module>")
    return found


def test_imports_flow_one_way() -> None:
    """No sub-package imports one above it (or a top-level step), the base imports nothing
    but the base, and nothing below the command line imports cli/."""
    wrong = []
    for module, path in _modules().items():
        rank = _rank(module)
        for imported in _imports(path):
            target = _rank(imported)
            same_package = imported.split(".")[:2] == module.split(".")[:2]
            if rank == -1 and target != -1:
                wrong.append(f"{module} (base) imports {imported}")
            elif rank < TOP and target > rank and not same_package:
                wrong.append(f"{module} imports {imported}, which stands above it")
            elif rank == TOP and target == CLI:
                wrong.append(f"{module} imports the command line ({imported})")
    assert not wrong, "\n".join(wrong)


def test_modules_classes_and_functions_stay_readable() -> None:
    """No module over 450 lines, no class over 250, no function over 60: a newcomer reads
    one in a sitting. (A class that grows past it has a second job: give it a room.)"""
    big = []
    for module, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > 450:
            big.append(f"{module}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                most = 250 if isinstance(node, ast.ClassDef) else 60
                if length > most:
                    big.append(f"{module}.{node.name}: {length} lines (at most {most})")
    assert not big, "\n".join(big)


def test_every_folder_is_a_package_with_a_docstring() -> None:
    """Each sub-package has an __init__.py that says what lives there (setuptools finds
    packages by it, and a reader starts there)."""
    for folder in PACKAGE.iterdir():
        if folder.is_dir() and folder.name != "__pycache__":
            init = folder / "__init__.py"
            assert init.exists(), f"{folder} has no __init__.py: the wheel would miss it"
            assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"
    assert {f.name for f in PACKAGE.iterdir() if f.is_dir()} - {"__pycache__"} == {
        *LAYERS,
        "cli",
    }


def test_constants_quoted_in_the_readme_come_from_the_code() -> None:
    """The drain, the session age and a worker's longest restart wait, as the README quotes
    them, are the code's values."""
    from pickupd.config.routing import MAX_SESSION_AGE
    from pickupd.service import GRACE
    from pickupd.workers.supervisor import RESTART_MAX

    readme = manual()
    assert f"for up to {GRACE:g} seconds (a second signal" in readme
    assert f"drains for up to {GRACE:g} seconds" in readme
    assert f"messages or {MAX_SESSION_AGE:g} seconds" in readme
    assert f"to {RESTART_MAX:g} s if it keeps dying" in readme


def test_the_readme_tree_names_every_module() -> None:
    """The README's layout tree names each module, in its folder, and names none that
    is gone."""
    readme = manual()
    tree = readme[readme.index("```\npickupd/\n") :]
    tree = tree[: tree.index("\n```", 4)]
    named: set[str] = set()
    folder = ""
    for line in tree.splitlines()[1:]:
        words = line.split()
        if not words:
            continue
        if words[0].endswith("/"):
            folder = words[0]
            continue
        inner = line.startswith("    ")
        for word in words:
            if not word.endswith(".py"):
                break
            named.add(f"{folder if inner else ''}{word}")
    actual = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" or path.parent.name == "cli"
    } - {"__main__.py"}
    assert named == actual, (sorted(actual - named), sorted(named - actual))


def test_every_test_module_has_its_place_in_the_pipeline_table() -> None:
    """The development page's table of where each step is proven names every test module,
    and only modules that exist."""
    page = (Path(__file__).parent.parent / "docs" / "development.md").read_text()
    table = page.split("## Tests: where each step is proven", 1)[1]
    named = set(re.findall(r"`(test_\w+\.py)`", table))
    present = {path.name for path in Path(__file__).parent.glob("test_*.py")}
    assert named == present, {"not in the table": present - named, "gone": named - present}
