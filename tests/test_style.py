"""The ruff configuration in pyproject.toml holds for the whole tree: lint clean and formatted."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: `pip install -e .[test]` brings the pinned version")
    return found


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(command):
    result = subprocess.run([_ruff(), *command], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_design_references_point_to_a_section_of_docs_design_md():
    """Comments and docs cite the design knowledge in docs/design.md by section anchor; every anchor
    cited exists, and nothing points to a DESIGN.md outside the repository."""
    import re

    headings = re.findall(r"^#+ (.+)$", (ROOT / "docs" / "design.md").read_text(), flags=re.MULTILINE)
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
    cited, dangling = set(), []
    for path in [*ROOT.glob("harness/**/*.py"), *ROOT.glob("models/**/*.py"), *ROOT.glob("docs/*.md")]:
        text = path.read_text()
        cited |= set(re.findall(r"design\.md#([a-z0-9-]+)", text))
        dangling += [f"{path.relative_to(ROOT)}: DESIGN.md" for _ in re.findall(r"DESIGN\.md", text)]
    assert cited and cited <= anchors, sorted(cited - anchors)
    assert dangling == []
