"""Backends are plugins: any installed distribution can add one through the entry-point group
`mendctl.backends` (name = "module:Class"), so a third party needs no change to mendctl."""
from __future__ import annotations

import difflib
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points

GROUP = "mendctl.backends"


class UnknownBackend(ValueError):
    pass


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


@lru_cache(maxsize=None)
def _load(name: str, value: str) -> type:
    return _entry_points()[name].load()


def available() -> dict[str, type]:
    """Registered name -> backend class (imports each plugin)."""
    return {name: _load(name, ep.value) for name, ep in sorted(_entry_points().items())}


def _aliases() -> dict[str, str]:
    table = {}
    for name, cls in available().items():
        table[name] = name
        for alias in getattr(cls, "aliases", ()):
            table.setdefault(alias, name)
    return table


def resolve_name(name: str) -> str:
    table = _aliases()
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownBackend(f"unknown backend {name!r}.{hint} Registered: {', '.join(sorted(available())) or 'none'}")


def get_backend(name: str):
    """An instance of the backend registered as `name` (or one of its aliases)."""
    return available()[resolve_name(name)]()
