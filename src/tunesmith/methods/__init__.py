"""Methods decide what trains. Each module exposes apply / save / load / merge behind the same small interface."""

from tunesmith.methods.base import get_method  # noqa: F401
