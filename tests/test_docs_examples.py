"""Every block of README.md and of every page under docs/ runs (docs/architecture/writing-docs.md): one test a page,
its blocks in page order in one scratch folder, `tunesmith` commands on tiny settings (docs_tiny.py). The blocks a
marker skips are listed, with their reasons, at the end of the module's run."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO
from docs_harness import BlockFailed, extract
from docs_run import PageRun
from docs_tiny import Tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)

README_LINES = 250  # the README the docs conventions apply to is the short one (issue 41); the long one is retired


def pages() -> list[str]:
    found = sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md"))
    readme = REPO / "README.md"
    if len(readme.read_text(encoding="utf-8").splitlines()) <= README_LINES:
        found.insert(0, "README.md")
    return found


@pytest.fixture(scope="module")
def skipped(request):
    """Every skipped block (page:line (language): reason), written out when the module ends."""
    rows: list[str] = []
    yield rows
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None and rows:
        with capture.global_and_fixture_disabled():
            reporter.write_sep("-", f"doc blocks skipped by their markers ({len(rows)})")
            for row in rows:
                reporter.write_line(row)


def run_page(path: Path, page: str, scratch: Path, tiny: Tiny, skipped: list[str]) -> None:
    """The page's blocks run in `scratch`; a block that fails fails the test with its page:line, command and
    output."""
    failure = None
    try:
        blocks = extract(path, page)
        if all(b.lang == "text" for b in blocks):
            pytest.skip("no runnable blocks")
        with PageRun(REPO, scratch, tiny) as run:
            try:
                run.run(blocks)
            finally:
                skipped.extend(run.skipped)
    except BlockFailed as e:
        failure = str(e)
    if failure:
        pytest.fail(failure, pytrace=False)


@pytest.mark.parametrize("page", pages())
def test_every_block_of_the_page_runs(page, tmp_path, docs_tiny, skipped):
    run_page(REPO / page, page, tmp_path, docs_tiny, skipped)
