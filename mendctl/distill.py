"""`mendctl distill`: each test task's k demonstrations (per seed) distilled once into a vectors file."""
from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from .backend import Models
from .checkpoint import load_distiller
from .config import Recipe, TemplateSpec
from .anchors import set_anchors
from .partitions import check_task_name
from .registry import get_backend
from .provenance import text_hash
from .scoring import DemoSet, demo_set
from .distiller import distil
from .vectors import VectorsMismatch, as_metadata, read_metadata, save_vectors
from .workspace import data_dir, partition_for, stage_input


UNTRAINED = "untrained"  # the distiller hash load_trained reports when no trained weights exist


def demo_sets(recipe: Recipe, template: TemplateSpec, tokenizer) -> list[DemoSet]:
    """One demonstration set per (test task, seed): the `_train` split of that seed."""
    root, tasks = data_dir(recipe), recipe.tasks
    return [demo_set(root, task, tasks.k, seed, template, tokenizer)
            for task in partition_for(recipe).test for seed in tasks.seeds]


def load_trained(recipe: Recipe, require: bool = True) -> tuple[Models, str]:
    """The recipe's models, on the GPU when there is one, with the latest trained distiller loaded.

    Returns them and the distiller weights' hash ("untrained" when `require` is off and none exists).
    """
    models = get_backend(recipe.backend).build(recipe)
    source = stage_input(recipe, "distill")
    if source is None and require:
        raise FileNotFoundError(f"no trained distiller under {recipe.output_dir}: run `mendctl pretrain` and/or "
                                "`mendctl finetune` first, or set distill.checkpoint")
    distiller_hash = load_distiller(models.distiller, source) if source is not None else UNTRAINED
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models.llm.to(device)
    models.distiller.to(device)
    return models, distiller_hash


def vectors_path(recipe: Recipe, task: str, seed: int) -> Path:
    check_task_name(task)  # vectors are written only inside output_dir/vectors
    return recipe.output_dir / "vectors" / task / f"{seed}.safetensors"


def vectors_metadata(recipe: Recipe, models: Models, distiller_hash: str, template: TemplateSpec, ds: DemoSet) -> dict:
    return {"backend": recipe.backend, "llm_id": models.llm_id, "llm_config_hash": models.llm_config_hash,
            "distiller_hash": distiller_hash, "task": ds.task, "seed": ds.seed, "num_demos": len(ds.demos),
            "demos_hash": text_hash(ds.context), "template": template.model_dump()}


def _up_to_date(path: Path, meta: dict) -> bool:
    if not path.is_file():
        return False
    try:
        have = read_metadata(path)
    except VectorsMismatch:  # damaged (say, by a copy cut short): distil it again
        return False
    return all(have.get(k) == v for k, v in as_metadata(meta).items())


def run_distill(recipe: Recipe, force: bool = False, console: Console | None = None) -> list[Path]:
    console = console or Console()
    models, distiller_hash = load_trained(recipe)
    template = get_backend(recipe.backend).template(recipe)
    sets = demo_sets(recipe, template, models.llm_tokenizer)
    metas = [vectors_metadata(recipe, models, distiller_hash, template, ds) for ds in sets]
    todo = [i for i, m in enumerate(metas) if force or not _up_to_date(vectors_path(recipe, sets[i].task, sets[i].seed), m)]
    if len(todo) < len(sets):
        console.print(f"{len(sets) - len(todo)} vectors file(s) already up to date (use --force to redo them)")
    batch = recipe.distill.batch_size
    with Progress(console=console) as progress:
        bar = progress.add_task("distilling", total=len(todo))
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            anchors = set_anchors(recipe, template, [sets[i] for i in chunk], models.llm_tokenizer)
            vectors = distil(models, [sets[i].context for i in chunk], recipe.distiller.max_length, batch, anchors)
            for i, v in zip(chunk, vectors):
                save_vectors(vectors_path(recipe, sets[i].task, sets[i].seed), v, metas[i])
            progress.advance(bar, len(chunk))
            if not console.is_terminal:
                console.print(f"distilled {start + len(chunk)}/{len(todo)}")
    paths = [vectors_path(recipe, ds.task, ds.seed) for ds in sets]
    console.print(f"[green]{len(paths)} vectors file(s)[/] in {recipe.output_dir / 'vectors'}")
    return paths
