"""What the third-party libraries may do in a `tunesmith` command: `setup`, called once by the CLI's entry before
any command runs. Only the command line does this; importing tunesmith as a library changes nothing.

- Imports a run does not use are deferred. diffusers' model classes and peft (which sentence-transformers and
  diffusers import) import bitsandbytes eagerly, though only QLoRA uses it, and its import takes seconds and logs
  about CPU kernels. A module in DEFERRED is created empty and runs at the first access to an attribute it lacks,
  so a library that imports it without using it costs nothing; whoever uses it gets it whole.
- Libraries' start-up output stays off the terminal: their progress bars for loading and saving weights
  (tunesmith shows its own), the loggers in QUIET_LOGGERS below ERROR, and FutureWarning (a library telling its
  caller, tunesmith's code, that an API will change). Their warnings and errors about the run itself still show,
  as do tunesmith's own. `--verbose` or TUNESMITH_VERBOSE=1 leaves the libraries as they are.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import sys
import types
import warnings

VERBOSE_ENV = "TUNESMITH_VERBOSE"
DEFERRED = ("bitsandbytes",)
QUIET_LOGGERS = ("bitsandbytes",)  # notes about optional kernels, at WARNING on every CPU import


def verbose_requested(flag: bool) -> bool:
    return flag or os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def setup(verbose: bool = False) -> None:
    """Defer DEFERRED's imports; unless `verbose`, keep the libraries' start-up output off the terminal.
    Idempotent."""
    _install_finder(quiet=not verbose)
    if verbose:
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for module_name in _AFTER_IMPORT:
        if module_name in sys.modules:
            _AFTER_IMPORT[module_name](sys.modules[module_name])


def _install_finder(quiet: bool) -> None:
    finder = next((f for f in sys.meta_path if isinstance(f, _LibraryFinder)), None)
    if finder is None:
        finder = _LibraryFinder()
        sys.meta_path.insert(0, finder)
    finder.quiet = quiet


def _no_bar(factory, args, kwargs):
    return factory(*args, **{**kwargs, "disable": True})


# The libraries' progress-bar switches, applied as soon as their logging module is imported (never imported here).
_AFTER_IMPORT = {
    "transformers.utils.logging": lambda module: module.set_tqdm_hook(_no_bar),  # leaves hub downloads' bars on
    "diffusers.utils.logging": lambda module: module.disable_progress_bar(),
}


class _LibraryFinder(importlib.abc.MetaPathFinder):
    """Finds DEFERRED and (when quiet) _AFTER_IMPORT modules as the other finders do, and wraps their loaders."""

    quiet = True

    def find_spec(self, name, path=None, target=None):
        if name not in DEFERRED and not (self.quiet and name in _AFTER_IMPORT):
            return None
        spec = _real_spec(self, name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Deferring(spec.loader) if name in DEFERRED else _ThenConfigure(spec.loader, _AFTER_IMPORT[name])
        return spec


def _real_spec(skip, name, path, target):
    for finder in sys.meta_path:
        if finder is not skip and hasattr(finder, "find_spec"):
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
    return None


class _Deferring(importlib.abc.Loader):
    """Leaves the module empty (a _DeferredModule); its code runs at the first attribute it lacks. Unlike
    importlib's LazyLoader, importing it again (which reads its __spec__) does not run it."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader
        module.__dict__.pop("__path__", None)  # a submodule import reads it: the package runs first
        module.__class__ = _DeferredModule


class _DeferredModule(types.ModuleType):
    def __getattr__(self, attr):
        spec = self.__spec__
        self.__class__ = types.ModuleType
        if spec.submodule_search_locations is not None:
            self.__path__ = spec.submodule_search_locations
        try:
            spec.loader.exec_module(self)
        except BaseException:
            sys.modules.pop(spec.name, None)  # as a failed import leaves it
            raise
        return getattr(self, attr)


class _ThenConfigure(importlib.abc.Loader):
    """`loader`, then `configure(module)` once the module has run."""

    def __init__(self, loader, configure):
        self.loader, self.configure = loader, configure

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        self.configure(module)
