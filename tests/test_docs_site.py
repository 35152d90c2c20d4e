"""The documentation site builds with `mkdocs build --strict` and prints no warning: a broken link or anchor, a page
missing from the nav or a nav entry without its page fails here (mkdocs.yml, docs/)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_site_builds_strict_without_warnings(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "WARNING" not in output, f"mkdocs build --strict failed:\n{output}"
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()
