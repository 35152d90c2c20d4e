"""The Benchmarks pages are generated from bench/results (bench/report_docs.py), and the planner concept page's 7 B
table from the planner: the committed ones are current, and every run there is on the journal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import report_docs  # noqa: E402


def test_committed_pages_equal_the_generated_ones():
    pages = report_docs.generate()
    assert set(pages) == {REPO / "docs/benchmarks" / n for n in ("index.md", "journal.md", "more.md",
                                                                   "planner-accuracy.md")} | {
        REPO / "docs/concepts/planner.md"}
    for path, text in pages.items():
        assert path.is_file() and path.read_text() == text, f"{path.name} is stale: run make docs-gen"
    charts = [report_docs.chart_name(r) for r in report_docs.headline_runs(report_docs.load_runs())]
    assert len(charts) >= 5
    for name in charts + ["plan-accuracy.svg", "plan-7b-per-method.svg"]:
        assert f"../images/{name}" in "".join(pages.values())
        assert (REPO / "docs/images" / name).is_file(), f"{name} missing: run make docs-gen"


def test_every_run_header_is_on_the_journal():
    journal = (REPO / "docs/benchmarks/journal.md").read_text()
    headers = [json.loads(line) for path in sorted((REPO / "bench/results").glob("*.jsonl"))
               for line in path.read_text().splitlines() if '"kind": "header"' in line]
    assert len(headers) >= 50
    for h in headers:
        assert f"{{#run-{h['run'].lower()}}}" in journal, h["run"]
        assert " ".join(h["command"]) in journal, h["run"]
