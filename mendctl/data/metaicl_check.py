"""Whether a folder made by MetaICL's own preprocessing scripts holds what a partition reads: each
meta-train task's training file, and each meta-test task's k demonstrations and test queries for
every seed (`mendctl data metaicl DIR [--partition NAME]`; docs/paper-setups.md)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .metaicl import DEFAULT_K, DEFAULT_SEEDS, META_TRAIN_FILE, split_name, task_file

# What mendctl reads of a meta-test task for each seed; MetaICL also writes a dev split, which nothing reads.
TEST_SPLITS = ("train", "test")


@dataclass
class PartitionCheck:
    name: str
    data_dir: Path
    train_tasks: int
    test_tasks: int
    absent: dict[str, list[str]] = field(default_factory=dict)  # side -> tasks with no folder
    gaps: list[str] = field(default_factory=list)  # "task (side): what is missing" for tasks with a folder

    @property
    def complete(self) -> bool:
        return not self.gaps and not any(self.absent.values())

    def lines(self) -> list[str]:
        state = "complete" if self.complete else "incomplete"
        out = [f"{self.name}: {state} in {self.data_dir} ({self.train_tasks} meta-train, {self.test_tasks} "
               f"meta-test tasks)"]
        for side, tasks in self.absent.items():
            if tasks:
                out.append(f"  {side} tasks missing ({len(tasks)}): {', '.join(tasks)}")
        out += [f"  {gap}" for gap in self.gaps]
        return out


def _problem(path: Path) -> str | None:
    """Why a file cannot be a task file, judged from its first line: missing, empty, or not an example."""
    if not path.is_file():
        return "missing"
    with path.open("rb") as f:
        first = f.readline()
    if not first.strip():
        return "empty"
    try:
        row = json.loads(first)
    except (UnicodeDecodeError, json.JSONDecodeError):
        row = None
    if not isinstance(row, dict) or not {"input", "output"} <= row.keys():
        return "not MetaICL examples (its first line has no input and output)"
    return None


def _seeds(seeds: list[int]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def _test_task_gap(data_dir: Path, task: str, k: int, seeds: tuple[int, ...]) -> str | None:
    whole, partial, bad = [], [], []
    for seed in seeds:
        problems = {split: _problem(data_dir / task / split_name(task, k, seed, split)) for split in TEST_SPLITS}
        missing = [s for s, p in problems.items() if p == "missing"]
        if len(missing) == len(TEST_SPLITS):
            whole.append(seed)
            continue
        if missing:
            partial.append(f"seed {seed}: no {' or '.join(missing)} split")
        bad += [f"{split_name(task, k, seed, s)} is {p}" for s, p in problems.items() if p not in (None, "missing")]
    parts = ([f"{_seeds(whole)} missing"] if whole else []) + partial + bad
    return f"{task} (meta-test): {'; '.join(parts)}" if parts else None


def check_partition(data_dir: Path, partition, k: int = DEFAULT_K, seeds: tuple[int, ...] = DEFAULT_SEEDS,
                    train_file: str = META_TRAIN_FILE) -> PartitionCheck:
    """What of `partition` (a partitions.Partition) `data_dir` lacks, by task, seed and split."""
    data_dir = Path(data_dir)
    check = PartitionCheck(partition.name, data_dir, len(partition.train), len(partition.test),
                           absent={"meta-train": [], "meta-test": []})
    for task in partition.train:
        if not (data_dir / task).is_dir():
            check.absent["meta-train"].append(task)
            continue
        path = task_file(data_dir, task, train_file)
        if problem := _problem(path):
            check.gaps.append(f"{task} (meta-train): {path.name} is {problem}")
    for task in partition.test:
        if not (data_dir / task).is_dir():
            check.absent["meta-test"].append(task)
        elif gap := _test_task_gap(data_dir, task, k, tuple(seeds)):
            check.gaps.append(gap)
    return check
