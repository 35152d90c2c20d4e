"""The doc-test harness's checks of config and data blocks (docs/architecture/writing-docs.md): a titled YAML block is a
whole config, checked by the schema `tunesmith` itself loads it with; an untitled one is a fragment merged over the
shipped example of its kind; json / jsonl blocks must parse. Each check returns nothing or raises ConfigError /
ValueError with the schema's own message."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

# The example each kind of fragment is merged over (repository-relative).
FRAGMENT_BASES = {"run": "examples/demo_lora_sft.yaml", "dreambooth": "examples/dreambooth_demo.yaml",
                  "text-to-image": "examples/text_to_image_style.yaml"}
DIFFUSION_ONLY = {"dreambooth": {"instance", "prior"}, "text-to-image": {"sample"}}


def load(kind: str, path: Path | None, base: dict | None = None):
    """The config at `path` (or `base`) loaded as `tunesmith train` / `dreambooth` / `text-to-image` load theirs."""
    from tunesmith.config import load_config
    from tunesmith.diffusion.config import load_dreambooth_config, load_text_to_image_config

    loader = {"run": load_config, "dreambooth": load_dreambooth_config,
              "text-to-image": load_text_to_image_config}[kind]
    return loader(path, [], base=base)


def file_kind(path: Path) -> str:
    """As `tunesmith plan` tells them apart: an `instance` section is DreamBooth, `data.images` text-to-image."""
    from tunesmith.cli.plan import diffusion_kind

    return diffusion_kind(path) or "run"


def check_whole_config(path: Path) -> None:
    load(file_kind(path), path)


def same_as_shipped(text: str, shipped: Path) -> bool:
    """A block that shows a file the repository ships (examples/X.yaml) must say what the file says."""
    return yaml.safe_load(text) == yaml.safe_load(shipped.read_text(encoding="utf-8"))


def fragment_kind(fragment: dict) -> str:
    """run, unless the fragment has a diffusion-only key: instance or prior (DreamBooth), data.images or sample
    without instance (text-to-image)."""
    keys = set(fragment)
    if keys & DIFFUSION_ONLY["dreambooth"]:
        return "dreambooth"
    data = fragment.get("data")
    if keys & DIFFUSION_ONLY["text-to-image"] or (isinstance(data, dict) and "images" in data):
        return "text-to-image"
    return "run"


def merge(base: dict, fragment: dict) -> dict:
    """`fragment` deep-merged over `base`, where a section that names another method replaces the base's method
    (its options would not fit), data.tasks replaces data.train/eval, and an objective's own section alone selects
    that objective."""
    from tunesmith.config.objectives import OBJECTIVE_SECTIONS

    out = dict(base)
    for key, value in fragment.items():
        old = out.get(key)
        if key == "method" and isinstance(value, dict) and isinstance(old, dict) and \
                value.get("name", old.get("name")) != old.get("name"):
            out[key] = value
        elif isinstance(value, dict) and isinstance(old, dict):
            if key == "data" and "tasks" in value:
                old = {k: v for k, v in old.items() if k not in ("train", "eval")}
            out[key] = merge(old, value)
        else:
            out[key] = value
    sections = [k for k in fragment if k in OBJECTIVE_SECTIONS]
    if "objective" not in fragment and len(sections) == 1 and "objective" in base:
        out["objective"] = sections[0]
    return out


def check_fragment(text: str, repo: Path) -> None:
    fragment = yaml.safe_load(text)
    if not isinstance(fragment, dict):
        raise ValueError(f"a YAML fragment must be a mapping of sections, got {type(fragment).__name__}")
    kind = fragment_kind(fragment)
    base = yaml.safe_load((repo / FRAGMENT_BASES[kind]).read_text(encoding="utf-8"))
    load(kind, None, merge(base, fragment))


def check_json(text: str, lines: bool) -> None:
    """One JSON value (json), or one per non-empty line (jsonl); the error names the line within the block."""
    chunks = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()] if lines else [(1, text)]
    for i, chunk in chunks:
        try:
            json.loads(chunk)
        except json.JSONDecodeError as e:
            raise ValueError(f"block line {i if lines else e.lineno}: not valid JSON: {e.msg}") from None
