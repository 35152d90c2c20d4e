"""Paths of the wrong kind, caught before anything runs: a file where a folder is expected and the reverse, a
dangling symbolic link, something that cannot be read (or written), a FIFO or device where a file is expected.
One check for every command-line path argument (cli/paths.py) and every config field marked with what it expects
(`Annotated[str, Expect.FOLDER]`). A path that does not exist at all is left to the reader, whose message says what
was looked for. No pydantic or torch import at the top: the CLI's parser reads Expect and `--help` stays fast."""

from __future__ import annotations

import os
import typing
from enum import Enum
from pathlib import Path

from tunesmith.errors import ConfigError

DATASETS_MARKERS = ("dataset_info.json", "dataset_dict.json")  # what `datasets.save_to_disk` writes in its folder


class Expect(Enum):
    FILE = "a file"
    FOLDER = "a folder"
    DATA = "a data file (.jsonl, .json, .csv, .parquet) or a `datasets` folder"
    ENTRY = "a file or a folder"
    MODEL = "builtin:NAME, a model folder or a hub id"
    OUT_FILE = "a file to write"
    OUT_FOLDER = "a folder to write in"


def _kind(p: Path) -> str:
    if p.is_symlink() and not p.exists():
        return "a dangling symbolic link"
    if p.is_dir():
        return "a folder"
    if p.is_file():
        return "a file"
    return "neither a regular file nor a folder (a FIFO, socket or device)"


def _problem(p: Path, expect: Expect) -> str | None:
    """What is wrong with the existing entry `p` for `expect`, or None."""
    if p.is_symlink() and not p.exists():
        return f"a symbolic link to {os.readlink(p)}, which does not exist"
    if expect in (Expect.OUT_FILE, Expect.OUT_FOLDER):
        if not (p.is_file() if expect is Expect.OUT_FILE else p.is_dir()):
            return f"is {_kind(p)}"
        return _unwritable(p if p.is_dir() else p.parent)
    wanted = {Expect.FILE: p.is_file(), Expect.FOLDER: p.is_dir(), Expect.MODEL: p.is_dir(),
              Expect.DATA: p.is_file() or p.is_dir(), Expect.ENTRY: p.is_file() or p.is_dir()}[expect]
    if not wanted:
        return f"is {_kind(p)}"
    if expect is Expect.DATA and p.is_dir() and not any((p / m).is_file() for m in DATASETS_MARKERS):
        return "is a folder, but not one written by `datasets.save_to_disk` (no dataset_info.json)"
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        return "cannot be read (permission denied)"
    return None


def _unwritable(folder: Path) -> str | None:
    return None if os.access(folder, os.W_OK | os.X_OK) else f"{folder} is not writable (permission denied)"


def _uncreatable(p: Path) -> str | None:
    """Why the missing output `p` could not be created: the nearest entry above it that exists is not a writable
    folder."""
    above = p.absolute().parent
    while not os.path.lexists(above) and above != above.parent:
        above = above.parent
    if not above.is_dir():
        return f"cannot be created: {above} is {_kind(above)}"
    return _unwritable(above) and f"cannot be created: {_unwritable(above)}"


def check_path(value: str, expect: Expect, name: str) -> None:
    """Raise ConfigError naming `name` (an argument or a config field) when `value` is the wrong kind of path."""
    if expect is Expect.MODEL and value.startswith("builtin:"):
        return
    p = Path(value).expanduser()
    if os.path.lexists(p):
        problem = _problem(p, expect)
    elif expect in (Expect.OUT_FILE, Expect.OUT_FOLDER):
        problem = _uncreatable(p)
    else:
        return  # not there: a hub id, or missing (the reader says so)
    if problem:
        raise ConfigError(f"{name} {value}: {problem}; expected {expect.value}")


def path_fields(model, prefix: tuple = ()) -> list[tuple[tuple, Expect]]:
    """Every field of `model` and the models inside it marked with an Expect, as a location (a list's items: "*")."""
    out = []
    for name, info in model.model_fields.items():
        marks = [m for m in info.metadata if isinstance(m, Expect)]
        if marks:
            out.append(((*prefix, name), marks[0]))
            continue
        for inner, in_list in models_in(info.annotation):
            out += path_fields(inner, (*prefix, name, *(("*",) if in_list else ())))
    return out


def models_in(annotation, in_list: bool = False) -> list[tuple[type, bool]]:
    """The pydantic models inside a field's annotation (its sections), each with whether it sits in a list."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, in_list)]
    found = []
    for arg in typing.get_args(annotation):
        found += models_in(arg, in_list or typing.get_origin(annotation) is list)
    return found


def _values(node, location: tuple, where: tuple = ()):
    """(dotted name, path) for each value at `location` in a validated config."""
    if node is None:
        return
    if not location:
        for i, value in enumerate(node if isinstance(node, list) else [node]):
            yield ".".join(map(str, where)) + (f".{i}" if isinstance(node, list) else ""), value
        return
    head, rest = location[0], location[1:]
    if head == "*":
        for i, item in enumerate(node):
            yield from _values(item, rest, (*where, i))
    elif head in type(node).model_fields:  # a union of sections (the method) may lack it
        yield from _values(getattr(node, head), rest, (*where, head))


def check_config_paths(cfg) -> None:
    """check_path for every marked field of a validated config (a run's, DreamBooth's)."""
    for location, expect in path_fields(type(cfg)):
        for name, value in _values(cfg, location):
            check_path(value, expect, name)
