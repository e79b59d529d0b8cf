"""The architecture holds: layers point one way, no modules import each other in a circle, and the
package code has no copied blocks.

The layering is import-linter's (contracts in pyproject.toml): `core` imports nothing of ours, then
`connectors`, `pipeline` and `jobs`, each importing only the layers below it; inside `pipeline` and `jobs`
the same holds between their parts.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("core", "connectors", "pipeline", "jobs")
WINDOW = 6  # lines: a block this long found twice is a copy worth replacing by one piece of code


@pytest.mark.slow
def test_the_import_contracts_hold():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that carry code: no blank lines, comments or imports."""
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if text and not text.startswith(("#", "import ", "from ")):
            lines.append((number, text))
    return lines


def copied_blocks(root: Path, files: list[Path]) -> list[list[str]]:
    """Every run of WINDOW code lines that stands in more than one place, as 'path:line' places."""
    places = defaultdict(list)
    for path in files:
        lines = code_lines(path)
        for i in range(len(lines) - WINDOW + 1):
            block = "\n".join(text for _, text in lines[i : i + WINDOW])
            places[hashlib.blake2b(block.encode(), digest_size=16).digest()].append(
                f"{path.relative_to(root)}:{lines[i][0]}")
    return [where for where in places.values() if len(where) > 1]


def test_the_package_code_has_no_copied_blocks():
    files = sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))
    assert len(files) > 20
    assert copied_blocks(REPO, files) == []


def test_the_copy_check_finds_a_copy(tmp_path):
    """The check above can fail: a function pasted into a second module is found."""
    body = "".join(f"    value_{i} = compute({i})\n" for i in range(WINDOW)) + "    return value_0\n"
    (tmp_path / "a.py").write_text("def first():\n" + body)
    (tmp_path / "b.py").write_text("import os\n\n\ndef second():\n" + body)
    found = copied_blocks(tmp_path, sorted(tmp_path.glob("*.py")))
    assert found and {place.split(":")[0] for place in found[0]} == {"a.py", "b.py"}
