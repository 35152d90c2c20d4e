"""What the CLI lets the libraries do (cli/libraries.py): their start-up output stays off the terminal, and
bitsandbytes, which diffusers' models and peft import unused, runs only where something uses it."""

import os
import subprocess
import sys

from tunesmith.cli import libraries

# What a command does at start-up, then the two paths' loads and imports: a causal LM through tunesmith (train,
# generate, chat, serve: transformers' bar), diffusers' model classes (DreamBooth: they import peft and bitsandbytes).
CHILD = """
import sys
from tunesmith.cli import libraries
libraries.setup()
from tunesmith.models import load_model
load_model(sys.argv[1])
from diffusers import UNet2DConditionModel
print("bitsandbytes imported:", "bitsandbytes" in sys.modules, "ran:", "bitsandbytes.nn" in sys.modules)
import warnings
warnings.warn("an API will change", FutureWarning)  # a library to its caller: not shown
warnings.warn("3 preference pairs are identical", UserWarning)  # as tunesmith's own (data/pair_batches.py): shown
"""


def test_after_a_command_start_stderr_holds_only_tunesmiths_own_and_bitsandbytes_is_unrun(tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if k != libraries.VERBOSE_ENV}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tiny_model_dir)], capture_output=True, text=True,
                         check=True, env=env)
    # without setup, before the warning: bitsandbytes' "Failed to load CPU gemm_4bit_forward ..." and transformers'
    # "Loading weights: 100%|...|" bar
    assert out.stderr == "<string>:11: UserWarning: 3 preference pairs are identical\n"
    assert out.stdout == "bitsandbytes imported: True ran: False\n"  # imported by peft and diffusers, never run


def test_a_deferred_module_runs_at_its_first_use_only(tmp_path, monkeypatch):
    import importlib.util

    package = tmp_path / "deferred_probe"
    package.mkdir()
    (package / "__init__.py").write_text("RUNS = globals().get('RUNS', 0) + 1\n")
    (package / "part.py").write_text("from deferred_probe import RUNS as SEEN\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.setattr(libraries, "DEFERRED", ("deferred_probe",))
    libraries._install_finder(quiet=True)
    try:
        import deferred_probe
        import deferred_probe as again  # importing again (reads __spec__) and finding it do not run it
        assert importlib.util.find_spec("deferred_probe") is deferred_probe.__spec__
        assert "RUNS" not in vars(deferred_probe) and again is deferred_probe
        assert deferred_probe.RUNS == 1  # its first attribute runs it, once
        assert deferred_probe.RUNS == 1
        del sys.modules["deferred_probe"]
        import deferred_probe.part  # a submodule first: the package runs before it
        assert deferred_probe.part.SEEN == 1
    finally:
        for name in ("deferred_probe", "deferred_probe.part"):
            sys.modules.pop(name, None)


def test_verbose_is_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv(libraries.VERBOSE_ENV, raising=False)
    assert libraries.verbose_requested(True) and not libraries.verbose_requested(False)
    monkeypatch.setenv(libraries.VERBOSE_ENV, "1")
    assert libraries.verbose_requested(False)
    monkeypatch.setenv(libraries.VERBOSE_ENV, "0")
    assert not libraries.verbose_requested(False)
