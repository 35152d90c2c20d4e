"""docs/reference/config.md from the pydantic schema: the run config, DreamBooth's and text-to-image's, every
section and key with its type, default and description, each at the anchor config errors cite
(tunesmith/config/reference.py walks the schema for both)."""

from __future__ import annotations

import inspect

from docgen.markdown import GENERATED, cell, sentence, table
from docgen.schema_text import default_text, field_type
from tunesmith.config.reference import Section, anchor, keys, sections
from tunesmith.config.run import RunConfig
from tunesmith.diffusion.config import DreamBoothConfig, TextToImageConfig

# (title, anchor prefix, root model, what reads it)
PARTS = (
    ("The run config", "", RunConfig,
     "`tunesmith train CONFIG` and `tunesmith plan CONFIG` read it (examples: `examples/*.yaml`)."),
    ("The DreamBooth config", "dreambooth", DreamBoothConfig,
     "`tunesmith dreambooth CONFIG` reads it (`tunesmith dreambooth --demo` runs a built-in one)."),
    ("The text-to-image config", "text-to-image", TextToImageConfig,
     "`tunesmith text-to-image CONFIG` reads it (`tunesmith text-to-image --demo style` runs a built-in one)."),
)

INTRO = """\
Every key of the YAML configs, generated from the schema (`src/tunesmith/config/`,
`src/tunesmith/diffusion/config.py`). A key is written as its dotted path (`train.lr` is `lr:` inside `train:`);
any key can also be set on the command line with `--set train.lr=1e-4`. A config error names the key and its
anchor on this page (`docs/reference/config.md#train-lr`); an unknown key names its section's.
"""


def missing_descriptions() -> list[str]:
    """Every field of the three configs without a description, as 'part: dotted.key' (sections included)."""
    missing = []
    for title, prefix, root, _ in PARTS:
        for section in sections(root):
            member = section.tag and section.model is not None  # described by its union's field
            if section.field is not None and not member and not section.field.description:
                missing.append(f"{prefix or 'run'}: {dotted(section)}")
            which = f" ({section.path[-2]}.{section.tag}: {section.path[-1]})" if member else ""
            missing += [f"{prefix or 'run'}: {dotted(section, name)}{which}" for name, field in keys(section)
                        if not field.description]
    return sorted(set(missing))


def dotted(section: Section, key: str | None = None) -> str:
    """The key as a config writes it: `data.tasks[].name`; a union member's keys without the tag (`method.r`)."""
    parts = []
    for i, part in enumerate(section.path):
        if section.tag and section.model is not None and i == len(section.path) - 1:
            continue  # the member's tag
        parts.append(part)
    text = ".".join(parts) + ("[]" if section.in_list else "")
    return f"{text}.{key}" if text and key else key or text


def _key_rows(prefix: str, section: Section) -> list[list[str]]:
    rows = []
    if section.model is None:  # a tagged union's own section: its one key, the tag
        default = type(section.field.default_factory()).model_fields[section.tag].default
        links = ", ".join(f"[`{m}`](#{anchor(prefix, (*section.path, m))})" for m in section.members)
        rows.append([_key_cell(prefix, (*section.path, section.tag), dotted(section, section.tag)),
                     "one of: " + ", ".join(f"`{m}`" for m in section.members), f"`{default}`",
                     f"which {section.path[-1]}; each takes the options of its section: {links}"])
    for name, field in keys(section):
        rows.append([_key_cell(prefix, (*section.path, name), dotted(section, name)), cell(field_type(field)),
                     default_text(field), cell(field.description or "")])
    return rows


def _key_cell(prefix: str, path, written: str) -> str:
    return f'<span id="{anchor(prefix, path)}"></span>`{written}`'


def _heading(prefix: str, section: Section) -> str:
    level = "####" if section.tag and section.model is not None else "###"
    title = f"`{dotted(section)}`"
    if section.tag and section.model is not None:
        title = f"`{dotted(section)}` with `{section.tag}: {section.path[-1]}`"
    return f"{level} {title} {{#{anchor(prefix, section.path)}}}"


def _section_text(section: Section) -> str:
    if section.tag and section.model is not None:
        doc = inspect.getdoc(section.model) if section.model.__doc__ else ""
        link = f"[methods table](methods.md#{section.path[-1]})" if section.path[0] == "method" else ""
        own = f"The options of `{section.path[-2]}.{section.tag}: {section.path[-1]}`"
        return " ".join(p for p in (doc, own + (f" (see the {link})." if link else "."))if p)
    return sentence(cell(section.field.description or ""))


def render() -> str:
    out = [GENERATED, "# Config", "", INTRO]
    out += ["On this page: " + " · ".join(f"[{title}](#{anchor(prefix, ())})" for title, prefix, _, _ in PARTS), ""]
    for title, prefix, root, reader in PARTS:
        out += [f"## {title} {{#{anchor(prefix, ())}}}", "", reader, ""]
        for section in sections(root):
            if section.path:
                out += [_heading(prefix, section), ""]
                text = _section_text(section)
                if text:
                    out += [text, ""]
            rows = _key_rows(prefix, section)
            if rows:
                out += table(["Key", "Type", "Default", "Description"], rows) + [""]
    return "\n".join(out).rstrip() + "\n"

