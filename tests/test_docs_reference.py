"""The generated reference pages (docgen/generate.py: docs/reference/config.md, cli.md, methods.md) are what the code
generates now, and the anchors config errors cite (config/reference.py) are on the config page."""

import difflib
import importlib.util
import re
from pathlib import Path

import pytest

from tunesmith.config.reference import PAGE, anchors
from tunesmith.config.run import RunConfig
from tunesmith.diffusion.config import DreamBoothConfig, TextToImageConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [(RunConfig, ""), (DreamBoothConfig, "dreambooth"), (TextToImageConfig, "text-to-image")]


def _generator():
    """docgen/generate.py, which puts docgen/ (not part of the package) on the path itself."""
    spec = importlib.util.spec_from_file_location("docgen_generate", REPO / "docgen" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _generator()


def page_anchors(page: str) -> set[str]:
    text = (REPO / page).read_text(encoding="utf-8")
    return set(re.findall(r'id="([^"]+)"', text)) | set(re.findall(r"\{#([^}\s]+)\}", text))


def test_the_generated_pages_are_up_to_date():
    stale = generate.stale_pages()
    diffs = []
    for page, text in stale.items():
        old = (REPO / page).read_text(encoding="utf-8").splitlines() if (REPO / page).is_file() else []
        diffs += list(difflib.unified_diff(old, text.splitlines(), page, "generated now", lineterm="", n=1))[:40]
    assert not stale, f"{', '.join(stale)}: out of date; run make docs-gen\n" + "\n".join(diffs)


@pytest.mark.parametrize("root,prefix", CONFIGS)
def test_every_anchor_config_errors_cite_is_on_the_config_page(root, prefix):
    missing = anchors(root, prefix) - page_anchors(PAGE)
    assert not missing, f"{PAGE} lacks the anchors {sorted(missing)}; run make docs-gen"


def test_every_command_has_its_anchor_on_the_cli_page():
    from docgen.cli_reference import anchor, commands
    from tunesmith.cli import build_parser

    wanted = {anchor(words) for words, _, _ in commands(build_parser())}
    assert {"tunesmith-train", "tunesmith-rag-ask"} <= wanted
    assert not wanted - page_anchors("docs/reference/cli.md")


def test_every_config_field_has_a_description():
    from docgen.config_reference import missing_descriptions

    missing = missing_descriptions()
    assert not missing, ("config fields without a description (give each Field(description=...)):\n  "
                         + "\n  ".join(missing))


def test_every_cli_argument_has_help():
    from docgen.cli_reference import missing_help

    missing = missing_help()
    assert not missing, "command-line arguments without help= :\n  " + "\n  ".join(missing)


def test_a_config_error_names_the_field_and_its_anchor_on_the_config_page():
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, ["method.r=0", "train.lr=0", "train.lrr=1"], base={"data": {"train": "x.jsonl"}})
    assert str(e.value).splitlines()[1:] == [
        "  - method.r: Input should be greater than 0 (got 0); see docs/reference/config.md#method-lora-r",
        "  - train.lr: Input should be greater than 0 (got 0); see docs/reference/config.md#train-lr",
        "  - train.lrr: unknown key (check the spelling; the keys of train: docs/reference/config.md#train)"]
    cited = re.findall(r"docs/reference/config\.md#([\w-]+)", str(e.value))
    assert cited == ["method-lora-r", "train-lr", "train"]
    assert set(cited) <= page_anchors(PAGE)
