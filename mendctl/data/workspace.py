"""Where a recipe's inputs are: its task data, its partition, and the output of earlier stages.

Looking a path up makes nothing: what a recipe asks to be made first (BIG-bench converted, stage-1
passages) prepare.py makes, once, when a command starts."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..core.config import Recipe
from ..core.partitions import Partition, check_task_name, load_partition
from .metaicl import DataError, split_path, task_file


def _tasks(recipe: Recipe):
    if recipe.tasks is None:
        raise ValueError("the recipe has no `tasks` section (data_dir or bigbench, and a partition)")
    return recipe.tasks


def partition_for(recipe: Recipe) -> Partition:
    return load_partition(_tasks(recipe).partition)


def converted_dir(recipe: Recipe) -> Path:
    """Where prepare converts tasks.bigbench into the MetaICL layout: a folder per tasks.bigbench_options, as
    the two conversions write different files under the same names."""
    per_example = _tasks(recipe).bigbench_options == "per_example"
    return recipe.output_dir / ("data-per-example-options" if per_example else "data")


# finetune.train_tasks: all trains on every task the conversion finds, so all of BIG-bench is
# converted; this marker says it was (the files alone cannot tell which tasks exist).
ALL_TASKS_MARKER = ".all-tasks-converted"


def converts_every_task(recipe: Recipe) -> bool:
    return recipe.finetune is not None and recipe.finetune.train_tasks == "all"


def missing_task_files(recipe: Recipe) -> list[Path]:
    """What of the BIG-bench conversion a command may read is not there yet: a recipe asking for
    another k or more seeds than the first conversion wrote misses files and is converted again."""
    tasks, out, partition = _tasks(recipe), converted_dir(recipe), partition_for(recipe)
    needed = [split_path(out, t, tasks.k, seed, split) for t in partition.test for seed in tasks.seeds
              for split in ("train", "test")]
    sets = max([s.eval_sets for s in (recipe.pretrain, recipe.finetune) if s is not None], default=1)
    needed += [split_path(out, t, tasks.k, seed, split) for t in tasks.validation for seed in tasks.seeds[:sets]
               for split in ("train", "test")]
    if recipe.finetune is not None:
        needed += [task_file(out, t, recipe.finetune.train_file) for t in partition.train]
    if converts_every_task(recipe):
        needed.append(out / ALL_TASKS_MARKER)
    return [p for p in needed if not p.is_file()]


def data_dir(recipe: Recipe) -> Path:
    """The MetaICL-layout task folder: tasks.data_dir, else output_dir/data, where prepare converts BIG-bench."""
    tasks = _tasks(recipe)
    if tasks.data_dir is not None:
        return Path(tasks.data_dir)
    if missing := missing_task_files(recipe):
        raise DataError(f"{missing[0]}: BIG-bench is not converted for this recipe yet ({len(missing)} file(s) "
                        "missing); mendctl.data.prepare.prepare(recipe, command) converts it, and every command calls "
                        "it when it starts")
    return converted_dir(recipe)


def passages_file(recipe: Recipe) -> Path:
    """BIG-bench passages for stage 1: output_dir/data/passages-N-<tasks left out>.jsonl, which prepare extracts.

    The test tasks and the validation tasks, and the other tasks of their families, give none: the
    curves and the final table score the distiller on tasks whose text it never read."""
    path = passages_path(recipe)
    if not path.is_file():
        raise DataError(f"{path}: the stage-1 passages are not extracted yet; mendctl.data.prepare.prepare(recipe, "
                        "command) extracts them, and pretrain and teacher call it when they start")
    return path


def passages_left_out(recipe: Recipe) -> set[str]:
    return set(partition_for(recipe).test) | set(_tasks(recipe).validation)


# Bumped when what iter_passages leaves out changes, so that a file extracted by the older rule is
# not reused (2: the held-out tasks' families too, not the tasks alone).
PASSAGES_RULE = 2


def passages_path(recipe: Recipe) -> Path:
    left_out = {"rule": PASSAGES_RULE, "tasks": sorted(passages_left_out(recipe))}
    tag = hashlib.sha256(json.dumps(left_out).encode()).hexdigest()[:8]
    return converted_dir(recipe) / f"passages-{recipe.pretrain.bigbench_passages}-{tag}.jsonl"


WEIGHTS = "distiller.safetensors"  # a stage's distiller, in its output folder


def find_distiller(path: Path) -> Path:
    path = Path(path)
    return path / WEIGHTS if path.is_dir() else path


def _first_weights(explicit, recipe: Recipe, stages: list[str]) -> Path | None:
    if explicit is not None:
        path = Path(explicit)
        if not find_distiller(path).is_file():
            raise FileNotFoundError(f"no distiller weights at {path}")
        return path
    for name in stages:
        if (recipe.stage_dir(name) / WEIGHTS).is_file():
            return recipe.stage_dir(name)
    return None


def finetune_start(recipe: Recipe) -> Path | None:
    """The distiller stage 2 starts from: finetune.init_from, else stage 1's output when there is one."""
    return _first_weights(recipe.finetune.init_from, recipe, ["pretrain"])


def trained_distiller(recipe: Recipe) -> Path | None:
    """The distiller distill and eval use: distill.checkpoint, else the latest stage's output."""
    return _first_weights(recipe.distill.checkpoint, recipe, ["finetune", "pretrain"])


def vectors_path(recipe: Recipe, task: str, seed: int, folder: str = "vectors") -> Path:
    check_task_name(task)  # vectors are written only inside output_dir/<folder>
    return recipe.output_dir / folder / task / f"{seed}.safetensors"
