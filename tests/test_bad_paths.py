"""Paths of the wrong kind, as classes: every path argument of every command (read from the parser: each declares
`type=PathArg(...)`) and every path field of the configs (read from the schema: `Annotated[..., Expect]`) is given
each kind of wrong path. Each must end in one sentence naming the argument or field and what it expects, exit code 2,
no traceback, and nothing written.

The classes: the wrong kind (a file where a folder is expected, a folder where a file is, an existing file or folder
where an output of the other kind goes); a dangling symbolic link; unreadable (the tests run as root, whom chmod 000
does not stop, so os.access is patched to deny that one path, as the kernel does for other users; for an output, the
folder it would be written in is the one denied); and a FIFO where a file or folder is expected (reading one would
hang)."""

import argparse
import os
import re
from pathlib import Path

import pytest
import yaml

import tunesmith.paths
from tunesmith.cli import build_parser, main
from tunesmith.cli.paths import PathArg, name_of
from tunesmith.config import RunConfig
from tunesmith.diffusion.config import DreamBoothConfig
from tunesmith.paths import Expect, path_fields

OUTPUTS = (Expect.OUT_FILE, Expect.OUT_FOLDER)
CLASSES = ("wrong kind", "dangling symlink", "unreadable", "fifo")


def _leaves(parser, prefix=()):
    """(command words, parser) of every command that has no sub-commands of its own."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs and prefix:
        yield prefix, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaves(sub, (*prefix, name))


PATH_ARGUMENTS = [(command, action.dest) for command, parser in _leaves(build_parser())
                  for action in parser._actions if isinstance(action.type, PathArg)]


def _good(tmp: Path, expect: Expect) -> str:
    """A path of the kind expected (inputs exist, outputs are new)."""
    if expect in (Expect.FOLDER, Expect.MODEL):
        (tmp / "good-folder").mkdir(exist_ok=True)
        return str(tmp / "good-folder")
    if expect in OUTPUTS:
        return str(tmp / ("new.out" if expect is Expect.OUT_FILE else "new-folder"))
    (tmp / "good.jsonl").write_text('{"text": "a"}\n')
    return str(tmp / "good.jsonl")


def _bad(tmp: Path, expect: Expect, kind: str, monkeypatch) -> tuple[str, str]:
    """(the bad path, what the message must say about it)."""
    if kind == "dangling symlink":
        (tmp / "link").symlink_to(tmp / "gone")
        return str(tmp / "link"), f"a symbolic link to {tmp / 'gone'}, which does not exist"
    if kind == "fifo":
        os.mkfifo(tmp / "fifo")
        return str(tmp / "fifo"), "is neither a regular file nor a folder"
    if kind == "unreadable":
        if expect in OUTPUTS:
            (tmp / "locked").mkdir()
            denied, bad = tmp / "locked", tmp / "locked" / "new"
        elif expect in (Expect.FOLDER, Expect.MODEL):
            denied = bad = tmp / "denied"
            bad.mkdir()
        else:
            denied = bad = tmp / "denied.jsonl"
            bad.write_text('{"text": "a"}\n')
        access = os.access
        monkeypatch.setattr(tunesmith.paths.os, "access",
                            lambda path, mode, **kw: Path(path) != denied and access(path, mode, **kw))
        return str(bad), "permission denied"
    wants_folder = expect in (Expect.FOLDER, Expect.MODEL, Expect.OUT_FOLDER)
    if wants_folder or expect is Expect.ENTRY:  # a file where a folder goes; an entry may be either: a FIFO
        if expect is Expect.ENTRY:
            return _bad(tmp, expect, "fifo", monkeypatch)
        (tmp / "a-file.txt").write_text("x")
        return str(tmp / "a-file.txt"), "is a file"
    (tmp / "a-folder").mkdir()
    return str(tmp / "a-folder"), "is a folder"


def _argv(parser, bad_dest: str, bad: str, tmp: Path) -> list[str]:
    """The command's required arguments with good values, and the one bad path."""
    options, positionals = [], []
    for action in parser._actions:
        path_type = action.type if isinstance(action.type, PathArg) else None
        required = action.required if action.option_strings else action.nargs not in ("?", "*")
        if action.dest != bad_dest and not required or action.dest == "help":
            continue
        value = bad if action.dest == bad_dest else _good(tmp, path_type.expect) if path_type and \
            isinstance(path_type.expect, Expect) else str(tmp / "new.out") if path_type else "x"
        if action.option_strings:
            options += [action.option_strings[-1], value]
        else:
            positionals.append(value)
    return options + positionals


def _tree(root: Path) -> set:
    return {(str(p.relative_to(root)), p.is_symlink(), p.is_dir()) for p in root.rglob("*")}


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("command,dest", PATH_ARGUMENTS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else v)
def test_every_path_argument_refuses_each_wrong_kind_of_path(command, dest, kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default output (runs/...) would land here
    parser = dict(_leaves(build_parser()))[command]
    action = next(a for a in parser._actions if a.dest == dest)
    probe = build_parser().parse_args([*command, *_argv(parser, dest, str(tmp_path / "probe"), tmp_path)])
    expect = action.type.expected(probe)
    bad, says = _bad(tmp_path, expect, kind, monkeypatch)
    argv = [*command, *_argv(parser, dest, bad, tmp_path)]
    before = _tree(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {name_of(action)} {bad}: " in err and says in err and f"expected {expect.value}" in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert _tree(tmp_path) == before


def test_every_argument_that_names_a_path_declares_what_it_expects():
    """A new path argument without `type=PathArg(...)` fails here (by its help's words), so the sweep above covers
    it."""
    words = re.compile(r"\b(file|folder|dir|path|jsonl|png)\b", re.I)
    missing = [(" ".join(command), name_of(a)) for command, parser in _leaves(build_parser()) for a in parser._actions
               if a.nargs != 0 and not isinstance(a.type, PathArg) and a.dest != "help"
               and words.search(f"{a.help or ''} {a.metavar or ''}")]
    assert missing == []


# Fields whose description speaks of a file or folder without holding a path: function references, a count.
NOT_PATHS = {"ppo.reward_function", "grpo.reward_functions", "prior.num_images"}


def test_every_config_field_that_names_a_path_is_marked_with_what_it_expects():
    """A new path field without `Annotated[..., Expect]` fails here, so the config sweep below covers it."""
    from tunesmith.paths import models_in

    words = re.compile(r"\b(file|folder|dir|path)\b", re.I)
    unmarked = set()

    def walk(model, prefix=()):
        for name, info in model.model_fields.items():
            if not any(isinstance(m, Expect) for m in info.metadata):
                if words.search(f"{name} {info.description or ''}"):
                    unmarked.add(".".join((*prefix, name)))
                for inner, _ in models_in(info.annotation):
                    walk(inner, (*prefix, name))

    walk(RunConfig)
    walk(DreamBoothConfig)
    assert unmarked == NOT_PATHS


def _run_tree(tmp: Path, good_data: str) -> dict:
    return {"model": {"path": "builtin:smollm2-135m-instruct"}, "data": {"train": good_data},
            "output_dir": str(tmp / "run")}


def _with_field(tree: dict, location: tuple, value: str) -> dict:
    """`tree` with `value` at `location`, and what that field needs around it (its objective, a task list)."""
    if location[0] in ("ppo", "grpo", "distill"):
        tree["objective"] = location[0]
    if location[:2] == ("data", "tasks"):
        tree["data"] = {"tasks": [{"name": "t", "train": tree["data"]["train"]}]}
    node = tree
    for key in location[:-1]:
        key = 0 if key == "*" else key
        node = node[key] if isinstance(node, list) else node.setdefault(key, {})
    node[location[-1]] = value
    return tree


DREAMBOOTH = {"instance": {"prompt": "a photo of sks digit"}, "prior": {"weight": 0}}
CONFIG_FIELDS = [("train", loc, expect) for loc, expect in path_fields(RunConfig)] + [
    ("dreambooth", loc, expect) for loc, expect in path_fields(DreamBoothConfig)]


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("command,location,expect", CONFIG_FIELDS,
                         ids=lambda v: ".".join(v) if isinstance(v, tuple) else getattr(v, "name", v))
def test_every_config_path_field_refuses_each_wrong_kind_of_path(command, location, expect, kind, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good_data = _good(tmp_path, Expect.DATA)
    if command == "train":
        tree = _run_tree(tmp_path, good_data)
    else:
        tree = {**DREAMBOOTH, "instance": {**DREAMBOOTH["instance"], "images": _good(tmp_path, Expect.FOLDER)},
                "output_dir": str(tmp_path / "run")}
    bad, says = _bad(tmp_path, expect, kind, monkeypatch)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_with_field(tree, location, bad)))
    before = _tree(tmp_path)
    assert main([command, str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    field = ".".join("0" if part == "*" else part for part in location)
    assert f"error: {field} {bad}: " in err and says in err and f"expected {expect.value}" in err, err
    assert "Traceback" not in err
    assert _tree(tmp_path) == before
