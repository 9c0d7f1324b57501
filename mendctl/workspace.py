"""Where a recipe's inputs are: its task data, its partition, and the output of earlier stages."""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import WEIGHTS
from .config import Recipe
from .data.metaicl import split_path, task_file
from .partitions import Partition, check_task_name, load_partition


def _tasks(recipe: Recipe):
    if recipe.tasks is None:
        raise ValueError("the recipe has no `tasks` section (data_dir or bigbench, and a partition)")
    return recipe.tasks


def partition_for(recipe: Recipe) -> Partition:
    return load_partition(_tasks(recipe).partition)


def bigbench_source(recipe: Recipe) -> Path:
    src = _tasks(recipe).bigbench
    if src is None:
        raise ValueError("tasks.bigbench is not set: BIG-bench passages need a BIG-bench source")
    if src == "fetch":
        from .data.bigbench import fetch_bigbench
        from .model_sources import cache_dir

        return fetch_bigbench(cache_dir() / "bigbench")
    return Path(src)


def data_dir(recipe: Recipe) -> Path:
    """The MetaICL-layout task folder; BIG-bench is converted into output_dir/data on first use."""
    tasks = _tasks(recipe)
    if tasks.data_dir is not None:
        return Path(tasks.data_dir)
    out = recipe.output_dir / "data"
    partition = partition_for(recipe)
    wanted = list(partition.train) + list(partition.test)
    # Every file a command may read, so that a recipe asking for another k or more seeds than the
    # first conversion wrote converts again (deterministically: existing files come out the same).
    needed = [split_path(out, t, tasks.k, seed, split) for t in partition.test for seed in tasks.seeds
              for split in ("train", "test")]
    needed += [split_path(out, t, tasks.k, tasks.seeds[0], split) for t in tasks.validation for split in ("train", "test")]
    if recipe.finetune is not None:
        needed += [task_file(out, t, recipe.finetune.train_file) for t in partition.train]
    # finetune.train_tasks: all trains on every task the conversion finds, so all of BIG-bench is
    # converted; the marker says it was (the files alone cannot tell which tasks exist).
    everything = recipe.finetune is not None and recipe.finetune.train_tasks == "all"
    marker = out / ".all-tasks-converted"
    if not all(p.is_file() for p in needed) or (everything and not marker.is_file()):
        from .data.bigbench import convert_bigbench

        report = convert_bigbench(bigbench_source(recipe), out, tasks=None if everything else wanted, k=tasks.k,
                                  seeds=tuple(tasks.seeds), progress=True)
        print(report.summary())
        if everything:
            marker.touch()
    return out


def passages_file(recipe: Recipe) -> Path:
    """BIG-bench passages for stage 1, extracted once into output_dir/data/passages-N-<tasks left out>.jsonl.

    The test tasks and the validation tasks give none: the curves and the final table score the
    distiller on tasks whose text it never read."""
    import hashlib

    limit = recipe.pretrain.bigbench_passages
    exclude = set(partition_for(recipe).test) | set(_tasks(recipe).validation)
    tag = hashlib.sha256(json.dumps(sorted(exclude)).encode()).hexdigest()[:8]
    path = recipe.output_dir / "data" / f"passages-{limit}-{tag}.jsonl"
    if path.is_file():
        return path
    from rich.console import Console

    from .data.bigbench import iter_passages
    from .fileio import atomic_path

    src = bigbench_source(recipe)
    console = Console(stderr=True)
    console.print(f"extracting up to {limit} stage-1 passages from {src} into {path} (once)")
    with console.status("extracting passages") as status, \
            atomic_path(path) as tmp, tmp.open("w") as f:
        for n, text in enumerate(iter_passages(src, exclude, limit=limit), 1):
            f.write(json.dumps({"text": text}) + "\n")
            if n % 1000 == 0:
                status.update(f"extracting passages: {n}")
    return path


def stage_input(recipe: Recipe, stage: str) -> Path | None:
    """The distiller a stage starts from: the recipe's explicit choice, else the latest earlier stage."""
    if stage == "finetune":
        explicit, fallbacks = recipe.finetune.init_from, ["pretrain"]
    else:
        explicit, fallbacks = recipe.distill.checkpoint, ["finetune", "pretrain"]
    if explicit is not None:
        path = Path(explicit)
        if not (path / WEIGHTS if path.is_dir() else path).is_file():
            raise FileNotFoundError(f"no distiller weights at {path}")
        return path
    for name in fallbacks:
        if (recipe.stage_dir(name) / WEIGHTS).is_file():
            return recipe.stage_dir(name)
    return None


def vectors_path(recipe: Recipe, task: str, seed: int) -> Path:
    check_task_name(task)  # vectors are written only inside output_dir/vectors
    return recipe.output_dir / "vectors" / task / f"{seed}.safetensors"
