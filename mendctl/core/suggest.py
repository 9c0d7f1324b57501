"""The one spelling of "did you mean": every unknown name (backend, partition, task, recipe) is
answered with its closest known names."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, known: Iterable[str], n: int = 1) -> str:
    """" Did you mean 'a' or 'b'?" for the close matches of `name` among `known`, or ""."""
    close = difflib.get_close_matches(name, sorted(set(known)), n=n)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
