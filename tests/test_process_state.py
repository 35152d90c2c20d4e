"""A library user's process is left as it was: importing tunesmith, bounding oneDNN's caches and loading the embedder
change no environment variable; the allocator setting is a train.* option; the dependency bounds hold."""

import os
import subprocess
import sys
import tomllib
from importlib.metadata import version

import pytest
from conftest import REPO, tiny_llama
from packaging.requirements import Requirement

from tunesmith.context import RunContext
from tunesmith.config import TrainSettings
from tunesmith.kernels import apply, onednn_linear


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
def test_the_allocator_setting_is_a_train_option(monkeypatch, keep):
    calls = []
    monkeypatch.setattr(apply, "keep_freed_memory", lambda: calls.append(1) or True)
    apply.apply_speed_options(tiny_llama(vocab_size=300), TrainSettings(keep_freed_memory=keep), RunContext())
    assert calls == ([1] if keep else [])


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
