"""Every registered method and objective satisfies its protocol member by member (methods/protocol.py,
objectives/protocol.py) and declares itself (config/declarations.py); the registries and the config's names agree."""

from __future__ import annotations

import collections.abc
import types
import typing

import pytest
from pydantic import BaseModel

from tunesmith.config.declarations import MethodDeclaration, ObjectiveDeclaration
from tunesmith.config.methods import METHOD_NAMES
from tunesmith.config.objectives import OBJECTIVE_NAMES, objective_declaration
from tunesmith.config.run import FORMATS
from tunesmith.methods import METHODS, declaration, get_method
from tunesmith.methods.protocol import Method
from tunesmith.objectives import OBJECTIVES, implementation
from tunesmith.objectives.protocol import Objective, PolicyObjective
from tunesmith.plan.parameters import LAYOUTS


def protocol_gaps(entry, protocol) -> list[str]:
    """Each member of `protocol` that `entry` (a module, a class or an object) lacks or has of the wrong kind: its
    functions must be callable; its annotated attributes hold what the annotation says (None only where allowed)."""
    functions = {name for cls in protocol.__mro__ if typing.Protocol in cls.__bases__ or cls is protocol
                 for name, value in vars(cls).items() if callable(value) and not name.startswith("_")}
    attributes = typing.get_type_hints(protocol)
    gaps = []
    for name in sorted(functions | set(attributes)):
        if not hasattr(entry, name):
            gaps.append(f"{name}: missing")
            continue
        value = getattr(entry, name)
        if name in functions:
            if not callable(value):
                gaps.append(f"{name}: not callable (got {value!r})")
            continue
        allowed = typing.get_args(attributes[name]) or (attributes[name],)
        if value is None and type(None) in allowed:
            continue
        if any(typing.get_origin(a) is collections.abc.Callable for a in allowed):
            if not callable(value):
                gaps.append(f"{name}: not callable (got {value!r})")
        elif not isinstance(value, tuple(a for a in allowed if isinstance(a, type))):
            gaps.append(f"{name}: expected {attributes[name]}, got {value!r}")
    return gaps


def assert_conforms(name: str, entry, protocol) -> None:
    gaps = protocol_gaps(entry, protocol)
    assert not gaps, f"{name} does not satisfy {protocol.__name__}: " + "; ".join(gaps)


def test_registries_and_config_name_the_same_methods_and_objectives():
    assert list(METHODS) == list(METHOD_NAMES)
    assert list(OBJECTIVES) == list(OBJECTIVE_NAMES)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_conforms(name):
    module = get_method(name)
    assert_conforms(name, module, Method)
    declared = declaration(name)
    assert isinstance(declared, MethodDeclaration), f"{name}: its settings class declares {declared!r}"
    assert (module.merge is None) == (module.unload is None) == bool(declared.not_mergeable), \
        f"{name}: merge/unload are None exactly where the declaration says why it cannot merge"
    assert (module.disabled is None) == declared.trains_base, \
        f"{name}: only a method whose base trains has no disabled() (the reference is then a snapshot)"
    assert (module.virtual_tokens is None) == (not declared.memory.virtual), \
        f"{name}: virtual_tokens exactly where the declaration's memory terms have virtual tokens"
    assert declared.artifact in ("adapter", "model")
    assert declared.parameters in LAYOUTS, f"{name}: plan/parameters.py counts no layout {declared.parameters!r}"
    assert declared.four_bit_variant in (None, *METHODS), f"{name}: four_bit_variant names no registered method"
    if declared.peft_type:  # the PEFT format the methods table (docs/reference/methods.md) says it saves
        assert any(get_method(n).claims({"peft_type": declared.peft_type, "use_dora": name == "dora"}) for n in METHODS)
    elif declared.artifact == "adapter":
        assert module.PEFT_TYPE.startswith("TUNESMITH_"), f"{name}: an adapter PEFT cannot load has its own type"


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objective_conforms(name):
    entry = implementation(name)
    declared = objective_declaration(name)
    assert isinstance(declared, ObjectiveDeclaration) and declared.name == name
    assert_conforms(name, entry, Objective if entry.own_loop is None else PolicyObjective)
    assert isinstance(entry, type) == (declared.section is not None), \
        f"{name}: a class in the registry is built from its config section's settings, a module has none"
    assert declared.section is None or issubclass(declared.section, BaseModel)
    known = set(typing.get_args(FORMATS)) - {"auto"}
    assert (declared.formats or declared.fixed_format) and set(declared.formats + declared.task_formats) <= known
    assert declared.default_overlong in ("drop", "truncate", "split")
    assert (declared.default_overlong == "split") <= (declared.split_refusal is None)


def test_a_missing_member_fails_naming_the_entry_and_the_member(monkeypatch):
    lora = get_method("lora")
    monkeypatch.delattr(lora, "disabled")
    with pytest.raises(AssertionError, match=r"lora does not satisfy Method: (.*; )?disabled: missing"):
        assert_conforms("lora", lora, Method)
    fake = types.SimpleNamespace(**{k: getattr(implementation("sft"), k) for k in dir(implementation("sft"))
                                    if not k.startswith("_") and k != "units"})
    with pytest.raises(AssertionError, match=r"sft does not satisfy Objective: (.*; )?units: missing"):
        assert_conforms("sft", fake, Objective)
    monkeypatch.setattr(implementation("dpo"), "own_loop", 3)
    with pytest.raises(AssertionError, match=r"own_loop: expected"):
        assert_conforms("dpo", implementation("dpo"), Objective)
