"""What a recipe asks to be made before a command reads it: BIG-bench fetched and converted into the
MetaICL layout (tasks.bigbench), and its stage-1 passages extracted (pretrain.bigbench_passages).

Every command calls `prepare` once when it starts, and it says what it makes; the lookups of
workspace.py make nothing and name what is missing. Made once: a later command finds it and prints
nothing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console

from ..core.config import Recipe
from .metaicl import DataError
from .workspace import (ALL_TASKS_MARKER, converted_dir, converts_every_task, missing_task_files, partition_for,
                        passages_left_out, passages_path)

COMMANDS = ("pretrain", "finetune", "teacher", "distill", "eval", "export")


def reads(recipe: Recipe, command: str, stage: str | None = None) -> set[str]:
    """What of prepare's making `command` reads: "tasks" (the converted task folder), "passages", and
    "datasets" (the package that streams pretrain.hf_dataset).

    `stage` is the teacher's (pretrain or finetune); the training commands are their own stage."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    stage = command if command in ("pretrain", "finetune") else stage
    out = set()
    if stage == "pretrain" and recipe.pretrain is not None:
        if recipe.pretrain.bigbench_passages:
            out.add("passages")
        if recipe.pretrain.hf_dataset:
            out.add("datasets")  # nothing to make: the package that streams it, checked before any model loads
        # The learning curves score the validation tasks; the teacher filler draws no curves.
        if recipe.pretrain.eval_every and command == "pretrain":
            out.add("tasks")
    if stage == "finetune" or command in ("distill", "eval"):
        out.add("tasks")
    return out


def prepare(recipe: Recipe, command: str, stage: str | None = None, console: Console | None = None) -> None:
    """Makes what `command` reads and is not there yet; export reads nothing of it."""
    console = console or Console(stderr=True)
    wanted = reads(recipe, command, stage)
    if "datasets" in wanted:
        from .text import require_datasets

        require_datasets()  # first: no conversion is waited for before it fails
    # Task files given as tasks.data_dir are the user's: nothing to make.
    if "tasks" in wanted and recipe.tasks is not None and recipe.tasks.bigbench is not None:
        _convert(recipe, console)
    if "passages" in wanted:
        _extract_passages(recipe, console)


def bigbench_source(recipe: Recipe, console: Console) -> Path:
    src = recipe.tasks.bigbench if recipe.tasks is not None else None
    if src is None:
        raise ValueError("tasks.bigbench is not set: BIG-bench passages need a BIG-bench source")
    if src != "fetch":
        return Path(src)
    from ..models.model_sources import cache_dir
    from .bigbench import LOCAL_ENV, SDIST_NAME, BIGBENCH_VERSION, fetch_bigbench

    folder = cache_dir() / "bigbench"
    if not (folder / SDIST_NAME).is_file() and not os.environ.get(LOCAL_ENV):
        console.print(f"fetching BIG-bench: pip download --no-deps bigbench=={BIGBENCH_VERSION} into {folder} (once)",
                      markup=False)
    return fetch_bigbench(folder)


def _convert(recipe: Recipe, console: Console) -> None:
    missing = missing_task_files(recipe)
    if not missing:
        return
    from .bigbench import convert_bigbench

    tasks, out, partition = recipe.tasks, converted_dir(recipe), partition_for(recipe)
    everything = converts_every_task(recipe)
    src = bigbench_source(recipe, console)
    console.print(f"converting BIG-bench from {src} into {out} "
                  f"({'every task' if everything else 'the partition tasks'}; {len(missing)} file(s) missing, "
                  f"first {missing[0].name})", markup=False)
    # Every partition task, not only those missing a file: conversion is deterministic, so files
    # already there come out the same.
    report = convert_bigbench(src, out, tasks=None if everything else [*partition.train, *partition.test],
                              k=tasks.k, seeds=tuple(tasks.seeds), progress=True,
                              per_example_options=tasks.bigbench_options == "per_example")
    console.print(report.summary(), markup=False, highlight=False)
    if everything:
        (out / ALL_TASKS_MARKER).touch()
    if still := missing_task_files(recipe):
        skipped = "; ".join(f"{t}: {why}" for t, why in report.skipped_tasks.items()) or "none skipped"
        raise DataError(f"{still[0]}: the BIG-bench conversion wrote no such file ({len(still)} missing; "
                        f"tasks it skipped: {skipped})")


def _extract_passages(recipe: Recipe, console: Console) -> None:
    path = passages_path(recipe)
    if path.is_file():
        return
    from ..core.fileio import atomic_path
    from .bigbench import iter_passages

    limit = recipe.pretrain.bigbench_passages
    src = bigbench_source(recipe, console)
    console.print(f"extracting up to {limit} stage-1 passages from {src} into {path} (once)", markup=False)
    with console.status("extracting passages") as status, atomic_path(path) as tmp, tmp.open("w") as f:
        for n, text in enumerate(iter_passages(src, passages_left_out(recipe), limit=limit), 1):
            f.write(json.dumps({"text": text}) + "\n")
            if n % 1000 == 0:
                status.update(f"extracting passages: {n}")
