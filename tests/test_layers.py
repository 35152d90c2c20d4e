"""The import contract in pyproject.toml ([tool.importlinter]) holds, and it is not vacuous: one upward import
breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path, src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_import_contract_is_kept():
    result = _lint(REPO, REPO / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(REPO / "src" / "tunesmith", tmp_path / "src" / "tunesmith",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    lora = tmp_path / "src" / "tunesmith" / "methods" / "lora.py"
    lora.write_text(lora.read_text() + "\nfrom tunesmith.train import loop  # noqa: E402,F401  (deliberate)\n")
    result = _lint(tmp_path, tmp_path / "src")
    assert result.returncode != 0
    assert "tunesmith.methods.lora -> tunesmith.train.loop" in result.stdout
    assert "BROKEN" in result.stdout
