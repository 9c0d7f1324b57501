"""A user's own demonstrations and queries: JSONL files or lists of dicts, checked row by row.

A demonstration is {"input", "output"} with "options" optional; a query is {"input"} with
"options" optional (scored) or without (generated). Every problem names its file and line (or the
list index), and the rows keep their other fields, so outputs can be joined back to them.
"""
from __future__ import annotations

from pathlib import Path

from .metaicl import DataError, read_jsonl

WHERE = "_where"  # the key read_jsonl stamps each row's file:line under; never written out


def _where(row: dict, what: str, i: int) -> str:
    return row.get(WHERE) or f"{what}[{i}]"


def _check_options(row: dict, where: str) -> None:
    if "options" not in row or row["options"] is None:
        return
    options = row["options"]
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise DataError(f"{where}: options must be a non-empty list of strings")


def _check(rows, what: str, noun: str, fields: tuple[str, ...]) -> list[dict]:
    """`rows` as a non-empty list of dicts whose `fields` are strings and whose options, if any, are a list."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise DataError(f"{what}: no {noun}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{what}[{i}]: expected a dict with {' and '.join(fields)}")
        where = _where(row, what, i)
        for key in fields:
            if key not in row:
                raise DataError(f"{where}: missing field {key}")
            if not isinstance(row[key], str):
                raise DataError(f"{where}: {key} must be a string, not {type(row[key]).__name__}")
        _check_options(row, where)
    return list(rows)


def check_demos(demos, what: str = "demos") -> list[dict]:
    demos = _check(demos, what, "demonstrations", ("input", "output"))
    for i, row in enumerate(demos):
        if row.get("options") and row["output"] not in row["options"]:
            raise DataError(f"{_where(row, what, i)}: the output {row['output']!r} is not among the options")
    return demos


def check_queries(queries, what: str = "queries") -> list[dict]:
    return _check(queries, what, "queries", ("input",))


def _read(path: str | Path, what: str, check) -> list[dict]:
    path = Path(path)
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no {what} (an empty file)")
    return check(rows, str(path))


def read_demos(path: str | Path) -> list[dict]:
    return _read(path, "demonstrations", check_demos)


def read_queries(path: str | Path) -> list[dict]:
    return _read(path, "queries", check_queries)


def public(row: dict) -> dict:
    """The row as the user gave it (without the file:line stamp)."""
    return {k: v for k, v in row.items() if k != WHERE}
