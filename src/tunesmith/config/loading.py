"""Reading a configuration: a YAML file (errors name file:line), `key.sub=value` overrides, then a pydantic model
validated with every error naming its field. Shared by the run config (config/run.py) and DreamBooth's
(diffusion/config.py)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

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


def format_validation_error(err: ValidationError, source: str, unions: dict[str, Collection[str]] | None = None
                            ) -> str:
    """One line per error naming its field. `unions`: sections that are unions tagged by their `name` key
    ({"method": the method names}); the tag pydantic puts in the field's path is left out."""
    unions = unions or {}
    lines = [f"{source}: the configuration is not valid:"]
    for e in err.errors():
        loc = list(e["loc"])
        if len(loc) > 1 and loc[0] in unions and loc[1] in unions[loc[0]]:
            del loc[1]
        field = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "union_tag_invalid":
            got = (e.get("ctx") or {}).get("tag")
            names = ", ".join(unions.get(field, ()))
            lines.append(f"  - {field}.name: unknown {field} {got!r}; expected one of: {names}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  - {field}: unknown key (check the spelling; see `tunesmith train --help`)")
        elif e["type"] == "missing":
            lines.append(f"  - {field}: required but missing")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  - {field}: {msg}{got_s}")
    return "\n".join(lines)


def load_yaml_model(model_class: type[Model], path: str | Path | None, overrides: list[str] | None = None,
                    base: dict | None = None, *, sections: str,
                    adjust: Callable[[dict, list[tuple[str, str]]], None] | None = None,
                    unions: dict[str, Collection[str]] | None = None) -> Model:
    """Read YAML at `path` over `base` (or `base` alone), let `adjust(tree, overrides)` change the file's tree, apply
    the `key.sub=value` overrides, validate as `model_class`. Every error is a ConfigError naming file:line or the
    field."""
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
        raise ConfigError(format_validation_error(e, source, unions)) from None
