"""Backends are plugins: any installed distribution can add one through the entry-point group
`mendctl.backends` (name = "module:Class"), so a third party needs no change to mendctl.

Other names for a backend are entry points of `mendctl.backend_aliases` pointing at the same
"module:Class". Names resolve from the installed metadata alone: no backend module (and so neither
torch nor transformers) is imported until a backend is used, which keeps `validate` and `ls` fast.
"""
from __future__ import annotations

import sys
from functools import lru_cache
from importlib.metadata import entry_points

from .suggest import did_you_mean

GROUP = "mendctl.backends"
ALIAS_GROUP = "mendctl.backend_aliases"
BASE_MODULE = "mendctl.models.backend"  # its Backend is the class every backend subclasses


class UnknownBackend(ValueError):
    pass


def registered() -> dict[str, str]:
    """Registered name -> "module:Class", from the metadata (imports nothing)."""
    return {ep.name: ep.value for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name)}


def aliases() -> dict[str, str]:
    """Alias -> registered name. An alias whose target no backend registers is ignored."""
    by_target = {value: name for name, value in registered().items()}
    return {ep.name: by_target[ep.value] for ep in entry_points(group=ALIAS_GROUP) if ep.value in by_target}


def resolve_name(name: str) -> str:
    table = registered()
    if name in table:
        return name
    other = aliases()
    if name in other:
        return other[name]
    raise UnknownBackend(f"unknown backend {name!r}.{did_you_mean(name, [*table, *other], n=3)} "
                         f"Registered: {', '.join(table) or 'none'}")


def load(name: str) -> type:
    """The class registered as `name` (imported now), checked to be a `mendctl.models.backend.Backend`."""
    return _load(name, registered()[name])


@lru_cache(maxsize=None)
def _load(name: str, value: str) -> type:
    cls = next(ep for ep in entry_points(group=GROUP) if ep.name == name and ep.value == value).load()
    # A subclass's module has imported the base class; if it is not loaded, nothing loaded subclasses it.
    base = getattr(sys.modules.get(BASE_MODULE), "Backend", None)
    if not (isinstance(cls, type) and base is not None and issubclass(cls, base)):
        raise TypeError(f"entry point {name} = {value!r} of group {GROUP} is not a subclass of {BASE_MODULE}.Backend")
    return cls


def get_backend(name: str):
    """An instance of the backend registered as `name` (or one of its aliases)."""
    return load(resolve_name(name))()
