"""The import contract (.importlinter): diffss's stage layers, no orchestrator in the library, no
import circles. import-linter's own command checks the tree, and fails on a copy with each kind of
violation planted."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / ".importlinter"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_the_import_contract():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "broken" in result.stdout and "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("diffss/data/samples.py", "import diffss.models.base", "diffss stages import only the stages before them"),
    ("diffss/generation/drift.py", "from diffss.export import graphs", "diffss stages import only the stages before them"),
    # the MLOps glue sits below every stage, the core below everything
    ("diffss/mlops/versioning.py", "import diffss.data", "diffss stages import only the stages before them"),
    ("diffss/core/loop.py", "from diffss.mlops import tracking", "diffss stages import only the stages before them"),
    ("diffss/evaluation/metrics.py", "import dagster", "the library never imports its orchestrator"),
    ("diffss/core/atomic.py", "import orchestration", "the library never imports its orchestrator"),
    ("diffss/models/weights.py", "from diffss.models import official", "no import circles"),
])
def test_a_planted_violation_breaks_the_contract(tmp_path, module, line, contract):
    ignore = shutil.ignore_patterns("__pycache__", "*.safetensors", "pretrained", "splits", "tables")
    for package in ("diffss", "orchestration"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=ignore)
    shutil.copyfile(REPO / ".importlinter", tmp_path / ".importlinter")
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{line}  # planted\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if row.rstrip().endswith("BROKEN")]
    assert len(broken) == 1 and broken[0].startswith(contract), result.stdout[-3000:]
