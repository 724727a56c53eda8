"""The documents: the manual builds with mkdocs in strict mode (a broken link, a missing
anchor or a page left out of the nav fails), the generated references and man pages are what
the code says now, the README stays a page a newcomer reads (its links all lead somewhere),
and the man pages render without a warning."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import manual

CHECKOUT = Path(__file__).resolve().parent.parent


def test_the_manual_builds_in_strict_mode(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "operations" / "index.html").is_file()


def test_the_generated_references_are_current() -> None:
    """docs/reference/*.md and man/* are what tools/reference.py makes of the code now."""
    done = subprocess.run(
        [sys.executable, str(CHECKOUT / "tools/reference.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readme_is_a_page_and_its_links_lead_somewhere() -> None:
    readme = (CHECKOUT / "README.md").read_text()
    assert 100 <= readme.count("\n") <= 250
    links = re.findall(r"\]\(([^)]+)\)", readme)
    assert links
    for link in links:
        path, _, anchor = link.partition("#")
        assert not path.startswith("http"), link  # the README names no site it cannot check
        target = CHECKOUT / path
        assert target.is_file(), link
        if anchor:
            headings = re.findall(r"^#+ (.*)$", target.read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.replace("`", "")).lower().strip().replace(" ", "-")
                     for h in headings}  # fmt: skip
            assert anchor in slugs, link


@pytest.mark.parametrize("page", ["pickupd.8", "pickupd-sendmail.8", "pickupd.toml.5"])
def test_the_man_pages_render_without_a_warning(page: str) -> None:
    groff = shutil.which("groff")
    assert groff, "groff is needed (Debian's groff-base, installed with man-db)"
    done = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", "-z", str(CHECKOUT / "man" / page)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_the_tests_the_manual_cites_exist() -> None:
    """Where the manual names a test as the proof of a promise (`test_x.py::test_y`, or a
    whole `test_x.py`), that test is there: a renamed or moved test cannot leave a promise
    citing nothing."""
    tests = Path(__file__).parent
    cited = re.findall(r"`(test_\w+\.py)(?:::(test_\w+))?`", manual())
    assert cited
    missing = [
        f"{module}::{name}" if name else module
        for module, name in cited
        if not (tests / module).exists()
        or (name and not re.search(rf"^def {name}\(", (tests / module).read_text(), re.M))
    ]
    assert not missing, missing
