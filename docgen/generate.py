"""Write the generated reference pages (docs/reference/config.md, cli.md, methods.md) from the code.

    .venv/bin/python docgen/generate.py           # (make docs-gen) rewrite the pages that changed
    .venv/bin/python docgen/generate.py --check   # exit 1 naming each page that is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# run as a script: docgen/ importable, and tunesmith from this tree's src/ (before an installed copy, which may be
# another checkout's)
for folder in (ROOT / "src", ROOT):
    if folder.is_dir() and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from docgen import cli_reference, config_reference, methods_table  # noqa: E402

PAGES = {
    "docs/reference/config.md": config_reference.render,
    "docs/reference/cli.md": cli_reference.render,
    "docs/reference/methods.md": methods_table.render,
}


def stale_pages(root: Path = ROOT) -> dict[str, str]:
    """{page: its text as generated now} for each page whose committed text differs."""
    stale = {}
    for page, render in PAGES.items():
        text = render()
        path = root / page
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale[page] = text
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is out of date")
    args = parser.parse_args(argv)
    stale = stale_pages()
    if args.check:
        for page in stale:
            print(f"{page}: out of date; run `make docs-gen`", file=sys.stderr)
        return 1 if stale else 0
    for page, text in stale.items():
        (ROOT / page).write_text(text, encoding="utf-8")
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
