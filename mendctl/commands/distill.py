"""`mendctl distill`: each test task's k demonstrations (per seed) distilled once into a vectors file,
for the distill section and for each of distill.variants (variants.py), each in its own folder."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from ..core.config import Recipe
from ..core.provenance import weights_fingerprint
from ..core.registry import get_backend
from ..core.vectors import (WEIGHTS_KEY, BadVectors, VectorsMismatch, as_metadata, check_tensor, load_vectors,
                            save_vectors, weights_match)
from ..data.workspace import vectors_path
from ..evaluation.scoring import demo_sets
from ..training.refine import refinement, refinement_of, set_vectors, vectors_metadata
from ..training.trained import load_trained
from ..training.variants import METHOD, made_by, needing_distiller, variants


def _up_to_date(path: Path, meta: dict, recipe: Recipe) -> bool:
    if not path.is_file():
        return False
    try:
        vf = load_vectors(path)  # its tensor checked too: nan, another K or shape is not up to date
        check_tensor(vf.vectors, vf.metadata, str(path), recipe.num_vectors)
        have = vf.metadata
        # A refinement key at its default is not recorded, so compare the refinements read back whole.
        same_refinement = refinement_of(have, str(path)) == refinement(recipe.distill)
    except (VectorsMismatch, BadVectors):  # damaged (say, by a copy cut short): distill it again
        return False
    # The method follows from the refinement compared above: files written before it was recorded stay valid.
    # The weights are compared apart: a file written before they were recorded is held to the config alone.
    want = as_metadata(meta)
    return (same_refinement and weights_match(have, want[WEIGHTS_KEY])
            and all(have.get(k) == v for k, v in want.items() if k not in (METHOD, WEIGHTS_KEY)))


def run_distill(recipe: Recipe, force: bool = False, console: Console | None = None) -> list[Path]:
    console = console or Console()
    models, distiller_hash = load_trained(needing_distiller(recipe))
    template = get_backend(recipe.backend).template(recipe)
    sets = demo_sets(recipe, template, models.llm_tokenizer)
    weights = weights_fingerprint(models.llm.model)
    paths = []
    for variant in variants(recipe):
        vrecipe = variant.recipe
        metas = [vectors_metadata(vrecipe, models, made_by(vrecipe.distill, distiller_hash), template, ds, weights)
                 for ds in sets]
        vpaths = [vectors_path(recipe, ds.task, ds.seed, variant.folder) for ds in sets]
        todo = [i for i, m in enumerate(metas) if force or not _up_to_date(vpaths[i], m, vrecipe)]
        if len(todo) < len(sets):
            console.print(f"{len(sets) - len(todo)} vectors file(s) already up to date in {variant.folder} "
                          "(use --force to redo them)", markup=False)
        with Progress(console=console) as progress:
            bar = progress.add_task(f"distilling {variant.folder}", total=len(todo))
            vectors = set_vectors(vrecipe, models, template, [sets[i] for i in todo], recipe.distill.batch_size)
            for n, (i, v) in enumerate(zip(todo, vectors), 1):
                save_vectors(vpaths[i], v, metas[i])
                progress.advance(bar)  # per set: refining one takes longer than distilling a batch
                if not console.is_terminal:
                    console.print(f"distilled {n}/{len(todo)} ({variant.folder})")
        console.print(f"[green]{len(vpaths)} vectors file(s)[/] ({metas[0][METHOD]}) in "
                      f"{escape(str(recipe.output_dir / variant.folder))}")
        paths += vpaths
    return paths
