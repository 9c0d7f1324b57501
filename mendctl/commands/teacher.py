"""`mendctl teacher`: fill a stage's teacher cache ahead of (or beside) training.

It computes the teacher for exactly the example positions the stage's training reads,
[0, steps x batch_size x grad_accum x processes), in the same batches, so that training finds every
position cached. Positions already there are skipped; running it while training runs is safe.
"""
from __future__ import annotations

from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..core.registry import get_backend
from ..training.stage import build_stage
from ..training.teacher_cache import open_teacher


def fill_teacher(recipe, stage: str, processes: int = 1, console: Console | None = None) -> dict:
    """Returns {"positions", "computed", "folder"}; `processes` is that of the training launch."""
    built = build_stage(recipe, stage)  # refuses a recipe without the section
    spec = built.spec
    if not built.reads_teacher_cache:  # the trainer's own rule
        why = (f"{stage}.teacher_cache is false" if not spec.teacher_cache else
               f"{stage}.kl_on is options: training compares option scores, not cached next-token distributions")
        raise ValueError(f"{why}: training would not read the cache")
    console = console or Console()
    accelerator = Accelerator(mixed_precision=spec.mixed_precision)  # the device and autocast training uses
    backend = get_backend(recipe.backend)
    models = backend.build(recipe)
    models.llm.to(accelerator.device)
    template = backend.template(recipe)
    examples = built.examples(models, template)
    teacher = open_teacher(recipe, stage, models, template)
    total = spec.steps * spec.batch_size * spec.grad_accum * processes
    with Progress(TextColumn(f"[bold]teacher {stage}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console) as progress:
        bar = progress.add_task("fill", total=total)
        for base in range(0, total, spec.batch_size):
            positions = list(range(base, min(total, base + spec.batch_size)))
            with accelerator.autocast():
                teacher([examples.get(p) for p in positions], positions)
            progress.update(bar, completed=positions[-1] + 1)
    teacher.cache.flush()
    return {"positions": total, "computed": teacher.cache.misses, "folder": str(teacher.cache.folder)}
