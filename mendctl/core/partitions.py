"""Meta-train / meta-test task partitions (MetaICL protocol).

Shipped partitions live as JSON files in ``mendctl/partitions/``; each has the schema::

    {"train": [task, ...], "test": [task, ...],
     "task_types": {task: "classification" | "multi-choice"}}

The seven MetaICL partitions (hr_to_lr, class_to_class, non_class_to_class, qa_to_qa,
non_qa_to_qa, non_nli_to_nli, non_paraphrase_to_paraphrase) carry the task lists of
facebookresearch/MetaICL ``config/*.json``. The task type decides the metric: macro-F1 for
classification, accuracy otherwise. ``bb_class_to_class`` is an offline partition built from
BIG-bench tasks, named as :func:`mendctl.data.bigbench.task_name_from_path` names them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from .suggest import did_you_mean

CLASSIFICATION = "classification"
MULTI_CHOICE = "multi-choice"
TASK_TYPES = (CLASSIFICATION, MULTI_CHOICE)

# MetaICL's seven partitions, as the paper names them; the others shipped are mendctl's own.
METAICL_PARTITIONS = ("hr_to_lr", "class_to_class", "non_class_to_class", "qa_to_qa", "non_qa_to_qa", "non_nli_to_nli",
                      "non_paraphrase_to_paraphrase")

_DATA_DIR = "partitions"
# A task name becomes a folder and file name (data_dir/{task}/..., output_dir/vectors/{task}/...):
# one path component, not hidden, no separators or control characters, so that a partition file
# cannot point reads outside data_dir or writes outside output_dir.
_TASK_NAME = re.compile(r"[^/\\\x00-\x1f.][^/\\\x00-\x1f]*")


def check_task_name(task: object, source: str = "task name") -> str:
    """`task` if it is a safe single path component; else a ValueError naming `source`."""
    if not isinstance(task, str) or not _TASK_NAME.fullmatch(task):
        raise ValueError(f"{source}: {task!r} is not a valid task name (one folder name: no '/', '\\', "
                         "leading '.', or control characters)")
    return task


@dataclass(frozen=True)
class Partition:
    """A set of meta-train tasks and disjoint meta-test tasks."""

    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    task_types: dict[str, str]

    def is_classification(self, task: str) -> bool:
        """True when ``task`` is scored with macro-F1 rather than accuracy."""
        if task not in self.task_types:
            raise KeyError(f"task {task!r} is not part of partition {self.name!r}")
        return self.task_types[task] == CLASSIFICATION


def family(task: str) -> str:
    """A task's family, the name before its first '-': multiemo-products_sentence_de and
    multiemo-hotels_text_en are one task in other languages and domains, as BIG-bench subtasks are."""
    return task.split("-", 1)[0]


def on_test_side(partition: Partition, held_out: tuple[str, ...] | list[str] = ()) -> Callable[[str], bool]:
    """Whether a task is one that meta-training on `partition`'s side must not see: a test task of it
    or of any shipped partition, one of `held_out`, or another task of such a task's family that the
    partition does not train on (a test task in another language, color-hex beside color-rgb, is no new task)."""
    unseen = set(partition.test).union(held_out, *(load_partition(n).test for n in list_partitions()))
    families = {family(t) for t in unseen}
    return lambda name: name in unseen or (family(name) in families and name not in partition.train)


def _shipped_dir() -> Any:
    return resources.files("mendctl").joinpath(_DATA_DIR)


def list_partitions() -> list[str]:
    """Names of the partitions shipped with the package, sorted."""
    return sorted(
        entry.name[: -len(".json")]
        for entry in _shipped_dir().iterdir()
        if entry.name.endswith(".json")
    )


def load_partition(name_or_path: str | Path) -> Partition:
    """Load a shipped partition by name, or a user's partition JSON file by path.

    An argument that is a ``Path``, ends in ``.json`` or contains a path separator is read
    as a file; anything else is a shipped name. A user file has the shipped schema; its
    ``task_types`` mapping is optional, and any task it does not list is typed
    ``"multi-choice"`` (scored by accuracy): macro-F1 is only used for tasks explicitly
    declared ``"classification"``.

    Raises ``ValueError`` for an unknown name (with a did-you-mean suggestion) and for a
    malformed file (naming the file and the problem), including a task present in both
    ``train`` and ``test``.
    """
    text = str(name_or_path)
    if _looks_like_path(name_or_path):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"partition file {path} does not exist")
        return _parse(path.stem, _read_json(path, path.read_text(encoding="utf-8")), str(path))

    names = list_partitions()
    if text not in names:
        raise ValueError(_unknown_name_message(text, names))
    source = f"shipped partition {text!r}"
    raw = _shipped_dir().joinpath(f"{text}.json").read_text(encoding="utf-8")
    return _parse(text, _read_json(source, raw), source)


def _looks_like_path(name_or_path: str | Path) -> bool:
    # Decided by spelling, not by what exists in the working directory, so that a stray
    # directory named like a partition cannot shadow the shipped one.
    text = str(name_or_path)
    return isinstance(name_or_path, Path) or text.endswith(".json") or "/" in text or "\\" in text


def _unknown_name_message(name: str, names: list[str]) -> str:
    return (
        f"unknown partition {name!r}.{did_you_mean(name, names)} Shipped partitions: {', '.join(names)}. "
        "A path to a partition JSON file is also accepted."
    )


def _read_json(source: object, raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc})") from exc


def _task_list(data: dict[str, Any], key: str, source: str) -> tuple[str, ...]:
    if key not in data:
        raise ValueError(f"{source}: missing required key {key!r}")
    tasks = data[key]
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"{source}: {key!r} must be a list of non-empty task names")
    if not tasks:
        raise ValueError(f"{source}: {key!r} is empty")
    for t in tasks:
        check_task_name(t, f"{source}: {key!r}")
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise ValueError(f"{source}: {key!r} lists tasks more than once: {duplicates}")
    return tuple(tasks)


def _task_types(data: dict[str, Any], tasks: set[str], source: str) -> dict[str, str]:
    declared = data.get("task_types", {})
    if not isinstance(declared, dict):
        raise ValueError(f"{source}: 'task_types' must be a mapping of task -> type")
    bad = {t: v for t, v in declared.items() if v not in TASK_TYPES}
    if bad:
        raise ValueError(f"{source}: task types must be one of {TASK_TYPES}, got {bad}")
    unknown = sorted(set(declared) - tasks)
    if unknown:
        # Most likely a typo in a task name, which would silently change a metric.
        raise ValueError(f"{source}: 'task_types' names tasks not in train/test: {unknown}")
    return {t: declared.get(t, MULTI_CHOICE) for t in sorted(tasks)}


def _parse(name: str, data: Any, source: str) -> Partition:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object with 'train' and 'test'")
    train = _task_list(data, "train", source)
    test = _task_list(data, "test", source)
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise ValueError(f"{source}: tasks in both 'train' and 'test': {overlap}")
    types = _task_types(data, set(train) | set(test), source)
    return Partition(name=name, train=train, test=test, task_types=types)
