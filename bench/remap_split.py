"""A stage-2 run's training KL and CE split by label remapping: steps whose episodes all kept their labels
against steps whose episodes all had them remapped, in blocks of steps. Each step's episodes are drawn
again by the trainer's own `TaskExamples.draw` (task, query, demonstrations, remap coin) from the recipe
and seed, so it reads no model. One process, as the run was.

    .venv/bin/python bench/remap_split.py RECIPE --set key=value ... --metrics RUN/finetune/metrics.jsonl
"""
import json
import statistics
from pathlib import Path

from recipe_args import parser

from mendctl.core.config import load_recipe
from mendctl.core.registry import get_backend
from mendctl.data.workspace import data_dir, partition_for
from mendctl.training.examples import TaskExamples, meta_train_tasks


def main() -> None:
    ap = parser(__doc__, "remap_split.json")
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--block", type=int, default=300, help="steps a row")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    spec, root = recipe.finetune, data_dir(recipe)
    names = meta_train_tasks(spec, root, partition_for(recipe), recipe.tasks)
    # no tokenizer: draw() renders nothing
    examples = TaskExamples(spec, recipe.tasks, root, names, get_backend(recipe.backend).template(recipe), None,
                            recipe.seed)
    per_step = spec.batch_size * spec.grad_accum
    steps = [r for r in map(json.loads, args.metrics.read_text().splitlines()) if "loss" in r]
    blocks: dict[tuple[int, str], list[dict]] = {}
    for r in steps:
        first = (r["step"] - 1) * per_step
        episodes = {p // spec.queries_per_episode for p in range(first, first + per_step)}
        flips = sum(examples.draw(e)[-1] for e in episodes)
        kind = "plain" if flips == 0 else "remapped" if flips == len(episodes) else "mixed"
        blocks.setdefault(((r["step"] - 1) // args.block, kind), []).append(r)
    rows = []
    for b in sorted({b for b, _ in blocks}):
        row = {"steps": [b * args.block + 1, (b + 1) * args.block]}
        for kind in ("plain", "remapped"):
            got = blocks.get((b, kind), [])
            row[kind] = {"n": len(got), **{m: statistics.fmean(x[m] for x in got) for m in ("kl", "ce", "teacher_ce")
                                           if got}}
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tasks": sorted(names), "blocks": rows}, indent=2) + "\n")
    print("| steps | plain: steps, KL, CE (ICL's CE) | remapped: steps, KL, CE (ICL's CE) |\n|---|---|---|")
    for row in rows:
        cells = [f"{row[k]['n']}, {row[k]['kl']:.3f}, {row[k]['ce']:.2f} ({row[k]['teacher_ce']:.2f})"
                 if row[k]["n"] else "-" for k in ("plain", "remapped")]
        print(f"| {row['steps'][0]}-{row['steps'][1]} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
