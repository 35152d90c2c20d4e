"""A library user's process is left as it was: importing tunesmith, bounding oneDNN's caches and loading the embedder
change no environment variable; the allocator setting is a train.* option; the dependency bounds hold."""

import os
import subprocess
import sys
import tomllib
from importlib.metadata import version

import pytest
from conftest import REPO
from packaging.requirements import Requirement

from tunesmith.kernels import onednn_linear, process


def test_importing_tunesmith_leaves_the_environment_unchanged():
    script = ("import os, json; before = dict(os.environ); import tunesmith, tunesmith.cli, tunesmith.kernels.apply; "
              "print(json.dumps(sorted(set(os.environ.items()) ^ set(before.items()))))")
    env = {k: v for k, v in os.environ.items() if k not in onednn_linear.CACHE_CAPACITIES}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_bounding_onednns_caches_restores_the_environment(monkeypatch):
    for name in onednn_linear.CACHE_CAPACITIES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")  # a user's own value is kept, and wins
    before = dict(os.environ)
    seen = {}
    with onednn_linear._cache_capacities():
        seen.update({name: os.environ.get(name) for name in onednn_linear.CACHE_CAPACITIES})
    onednn_linear.bound_caches()
    assert dict(os.environ) == before
    assert seen == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "7"}


def test_loading_the_embedder_leaves_hf_hub_offline_as_it_was_and_reaches_for_no_network(monkeypatch):
    import socket

    import huggingface_hub.constants

    from tunesmith.infer.embedding import load_embedder

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # online, as a user's process may be

    def no_network(*args, **kwargs):
        raise AssertionError("the embedder tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    load_embedder.cache_clear()
    embedder = load_embedder()
    load_embedder.cache_clear()
    assert "HF_HUB_OFFLINE" not in os.environ
    assert embedder.encode(["a sentence"]).shape == (1, 384)


@pytest.mark.parametrize("keep", [True, False])
def test_the_allocator_setting_is_applied_once_and_only_when_asked(monkeypatch, keep):
    """init_process (kernels/process.py) switches malloc where a run asks (train.keep_freed_memory), once."""
    calls = []
    monkeypatch.setattr(process.allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(process, "_done", process.ProcessSettings())
    first = process.init_process(keep_freed_memory=keep)
    again = process.init_process(keep_freed_memory=keep)
    assert calls == ([1] if keep else [])
    assert first == again == process.ProcessSettings(True, keep, None)


def test_the_cli_sets_the_process_up_before_the_command_and_a_run_adds_its_own_settings(monkeypatch, tiny_config):
    from tunesmith import cli
    from tunesmith.config import load_config
    from tunesmith.train import run as run_module
    from tunesmith.train.loop import train

    order = []
    monkeypatch.setattr(process, "init_process", lambda *args: order.append(("init_process", args)))
    monkeypatch.setattr(cli.importlib.import_module("tunesmith.cli.plan"), "cmd_plan",
                        lambda args: order.append(("command", ())) or 0)
    assert cli.main(["plan"]) == 0
    assert order == [("init_process", ()), ("command", ())]

    monkeypatch.setattr(run_module, "init_process", lambda *args: order.append(("open_run", args)))
    tiny_config["train"].update(max_steps=1, threads=2, keep_freed_memory=False)
    train(load_config(None, [], base=tiny_config), quiet=True)
    assert order[2:] == [("open_run", (2, False))]


def test_installed_versions_satisfy_the_bounds_and_internals_heavy_dependencies_have_upper_bounds():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = {Requirement(d).name: Requirement(d) for d in deps}
    for name in ("torch", "transformers", "bitsandbytes"):
        assert any(s.operator in ("<", "<=", "~=", "==") for s in requirements[name].specifier), name
    for name, requirement in requirements.items():
        try:
            installed = version(name)
        except Exception:  # not installed in this environment
            continue
        assert requirement.specifier.contains(installed.split("+")[0], prereleases=True), (name, installed)
