"""Reading a configuration: a YAML file (errors name file:line), `key.sub=value` overrides, then a pydantic model
validated with every error naming its field and, for the configs the reference documents, the field's anchor on
docs/reference/config.md (config/reference.py). Shared by the run config (config/run.py) and the diffusion configs
(diffusion/config.py)."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from tunesmith.config.reference import cited_anchor
from tunesmith.config.reference import PAGE as REFERENCE_PAGE
from tunesmith.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)


def read_yaml_mapping(path: str | Path, sections: str) -> dict:
    """The file's top-level mapping ({} for an empty file); `sections` names what it should hold, for the error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping of sections ({sections}), got {type(loaded).__name__}")
    return loaded


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-4")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value))
    return pairs


def set_dotted(tree: dict, dotted: str, raw: str) -> None:
    """`--set a.b=raw`: the YAML value of `raw` at tree["a"]["b"], sections made as needed."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}={raw}: '{k}' is a value, not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {dotted}={raw}: the value is not valid YAML ({getattr(e, 'problem', e)}); quote "
                          f"it, e.g. --set \"{dotted}='{raw}'\"") from None


LEADING_KEY = re.compile(r"[a-z_]+(\.[a-z0-9_]+)*")  # the dotted key a validator's message starts with


def format_validation_error(err: ValidationError, source: str, unions: dict[str, Collection[str]] | None = None,
                            documented: tuple[type[BaseModel], str] | None = None) -> str:
    """One line per error naming its field. `unions`: sections that are unions tagged by their `name` key
    ({"method": the method names}); the tag pydantic puts in the field's path is left out. `documented`: (the
    config's root model, its anchor prefix on the reference page), so each line cites the field's anchor there."""
    unions = unions or {}
    lines = [f"{source}: the configuration is not valid:"]
    for e in err.errors():
        loc = list(e["loc"])
        if len(loc) > 1 and loc[0] in unions and loc[1] in unions[loc[0]]:
            del loc[1]
        field = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "union_tag_invalid":
            got = (e.get("ctx") or {}).get("tag")
            names = ", ".join(unions.get(field, ()))
            line = f"  - {field}.name: unknown {field} {got!r}; expected one of: {names}"
            cited = (*e["loc"], "name")
        elif e["type"] == "extra_forbidden":
            if documented:
                section = cited_anchor(*documented, e["loc"], unknown_key=True)
                where = field.rpartition(".")[0] or "the top level"
                lines.append(f"  - {field}: unknown key (check the spelling; the keys of {where}: "
                             f"{REFERENCE_PAGE}#{section})")
                continue
            line, cited = f"  - {field}: unknown key (check the spelling; see `tunesmith train --help`)", ()
        elif e["type"] == "missing":
            line, cited = f"  - {field}: required but missing", e["loc"]
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            line, cited = f"  - {field}: {msg}{got_s}", _named_in(msg, e["loc"])
        if documented:
            line += f"; see {REFERENCE_PAGE}#{cited_anchor(*documented, cited)}"
        lines.append(line)
    return "\n".join(lines)


def _named_in(msg: str, loc: tuple) -> tuple:
    """The field a validator's error is about: the dotted key its message starts with where that lies within
    `loc` (a check of a whole section names the key it is about), else `loc` itself."""
    found = LEADING_KEY.match(msg)
    if not found:
        return loc
    named = tuple(found.group(0).split("."))
    within = [str(p) for p in loc if not isinstance(p, int)]
    return named if list(named[:len(within)]) == within else loc


def load_yaml_model(model_class: type[Model], path: str | Path | None, overrides: list[str] | None = None,
                    base: dict | None = None, *, sections: str,
                    adjust: Callable[[dict, list[tuple[str, str]]], None] | None = None,
                    unions: dict[str, Collection[str]] | None = None, anchors: str | None = None) -> Model:
    """Read YAML at `path` over `base` (or `base` alone), let `adjust(tree, overrides)` change the file's tree, apply
    the `key.sub=value` overrides, validate as `model_class`. Every error is a ConfigError naming file:line or the
    field; with `anchors` (the config's anchor prefix on the reference page, "" for the run config) also the field's
    anchor there."""
    tree: dict = dict(base or {})
    source = "config"
    if path is not None:
        tree.update(read_yaml_mapping(path, sections))
        source = str(Path(path))
    pairs = parse_overrides(overrides or [])
    if adjust is not None:
        adjust(tree, pairs)
    for key, value in pairs:
        set_dotted(tree, key, value)
    try:
        return model_class.model_validate(tree)
    except ValidationError as e:
        documented = None if anchors is None else (model_class, anchors)
        raise ConfigError(format_validation_error(e, source, unions, documented)) from None
