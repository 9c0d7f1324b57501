"""`mendctl distill`: each test task's k demonstrations (per seed) distilled once into a vectors file."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from .config import Recipe
from .refine import refinement, refinement_of, set_vectors, vectors_metadata
from .registry import get_backend
from .scoring import demo_sets
from .trained import load_trained
from .vectors import VectorsMismatch, as_metadata, read_metadata, save_vectors
from .workspace import vectors_path


def _up_to_date(path: Path, meta: dict, recipe: Recipe) -> bool:
    if not path.is_file():
        return False
    try:
        have = read_metadata(path)
        # A refinement key at its default is not recorded, so compare the refinements read back whole.
        same_refinement = refinement_of(have, str(path)) == refinement(recipe.distill)
    except VectorsMismatch:  # damaged (say, by a copy cut short): distill it again
        return False
    return same_refinement and all(have.get(k) == v for k, v in as_metadata(meta).items())


def run_distill(recipe: Recipe, force: bool = False, console: Console | None = None) -> list[Path]:
    console = console or Console()
    models, distiller_hash = load_trained(recipe)
    template = get_backend(recipe.backend).template(recipe)
    sets = demo_sets(recipe, template, models.llm_tokenizer)
    metas = [vectors_metadata(recipe, models, distiller_hash, template, ds) for ds in sets]
    paths = [vectors_path(recipe, ds.task, ds.seed) for ds in sets]
    todo = [i for i, m in enumerate(metas) if force or not _up_to_date(paths[i], m, recipe)]
    if len(todo) < len(sets):
        console.print(f"{len(sets) - len(todo)} vectors file(s) already up to date (use --force to redo them)")
    with Progress(console=console) as progress:
        bar = progress.add_task("distilling", total=len(todo))
        vectors = set_vectors(recipe, models, template, [sets[i] for i in todo], recipe.distill.batch_size)
        for n, (i, v) in enumerate(zip(todo, vectors), 1):
            save_vectors(paths[i], v, metas[i])
            progress.advance(bar)  # per set: refining one takes longer than distilling a batch
            if not console.is_terminal:
                console.print(f"distilled {n}/{len(todo)}")
    console.print(f"[green]{len(paths)} vectors file(s)[/] in {recipe.output_dir / 'vectors'}")
    return paths
