"""`mendctl distill RECIPE --demos FILE.jsonl --out FILE.safetensors`: a user's own demonstrations
distilled into one vectors file, with no partition or task folder."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ..api.mend import Mend
from ..core.config import Recipe
from ..core.outputs import check_out
from ..core.partitions import check_task_name
from ..data.rows import read_demos


def distill_demos(recipe: Recipe, demos: Path, out: Path, name: str | None = None, untrained: bool = False,
                  force: bool = False, console: Console | None = None) -> Path:
    console = console or Console()
    check_out(out, force)
    name = check_task_name(name, "--name") if name else check_task_name(
        demos.stem, f"{demos}: its stem, the default task name (give --name)")
    rows = read_demos(demos)  # before the models load: a bad file fails in a moment
    mend = Mend.from_recipe(recipe)
    vectors = mend.distill(rows, name=name, untrained=untrained)
    check_out(out, force)
    vectors.save(out)
    console.print(f"[green]vectors[/]: {out} (task {vectors.name}, {len(rows)} demonstrations, "
                  f"distiller {vectors.metadata['distiller_hash']})", highlight=False)
    return out
