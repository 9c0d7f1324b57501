"""Tasks in the MetaICL layout: {data_dir}/{task}/{task}_{k}_{seed}_{split}.jsonl, one object a line
with "input", "output" and "options". Every problem is reported with its file and line."""
from __future__ import annotations

import json
from pathlib import Path

# MetaICL's settings and file names live in core (the recipe schema's defaults): the readers and the
# converter find them here too.
from ..core.task_files import DEFAULT_K, DEFAULT_SEEDS, META_TRAIN_FILE, META_TRAIN_SEED, META_TRAIN_SIZE, split_name


class DataError(ValueError):
    pass


def read_jsonl(path: Path, require: tuple[str, ...] = ()) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{n}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object")
            missing = [k for k in require if k not in row]
            if missing:
                raise DataError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
            row["_where"] = f"{path}:{n}"
            rows.append(row)
    return rows


def read_examples(path: Path) -> list[dict]:
    """Examples with a gold output among their options (options may be empty for generation tasks)."""
    rows = read_jsonl(path, require=("input", "output"))
    for row in rows:
        for key in ("input", "output"):
            if not isinstance(row[key], str):
                raise DataError(f"{row['_where']}: {key} must be a string, not {type(row[key]).__name__}")
        options = row.setdefault("options", [])
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise DataError(f"{row['_where']}: options must be a list of strings")
        if options and row["output"] not in options:
            raise DataError(f"{row['_where']}: the output {row['output']!r} is not among the options (no gold answer)")
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def split_path(data_dir: Path, task: str, k: int, seed: int, split: str) -> Path:
    from ..core.partitions import check_task_name

    # Partitions check their names already; this keeps every caller inside data_dir too.
    check_task_name(task)
    return Path(data_dir) / task / split_name(task, k, seed, split)


def task_file(data_dir: Path, task: str, pattern: str) -> Path:
    """A task's file named by a pattern such as finetune.train_file ("{task}" is the task's name).

    No name check: the callers pass partition tasks, already checked, or folders found in data_dir."""
    return Path(data_dir) / task / pattern.replace("{task}", task)


def load_split(data_dir: Path, task: str, k: int, seed: int, split: str) -> list[dict]:
    return read_examples(split_path(data_dir, task, k, seed, split))
