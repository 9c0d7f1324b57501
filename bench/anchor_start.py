"""Untrained (step-0) anchored vectors on the validation tasks: which anchor starts MEND best.

    .venv/bin/python bench/anchor_start.py recipes/llama/smollm2-bench.yaml [key=value ...] [--out JSON]

Scores ICL and zero-shot once, then the untrained distiller for each `distiller.anchor` but none
on the recipe's `tasks.validation` (macro-F1, agreement with ICL, KL(ICL || MEND)), as the
trainer's learning curves score them (`finetune.eval_queries` queries on each of `finetune.eval_sets`
demonstration sets a task). Writes bench/results/anchor_start.json, or --out.
"""
import argparse
import json
import time
from pathlib import Path

from mendctl.models.anchors import set_anchors
from mendctl.core.config import ANCHORS, load_recipe
from mendctl.training.curves import Validation
from mendctl.models.distiller import distill
from mendctl.data.prepare import prepare
from mendctl.core.provenance import stamp
from mendctl.core.registry import get_backend


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="key=value")
    ap.add_argument("--out", type=Path, default=Path("bench/results/anchor_start.json"))
    args = ap.parse_args()
    path, overrides, target = args.recipe, args.overrides, args.out
    out, validation = {}, None
    for anchor in [a for a in ANCHORS if a != "none"]:
        recipe = load_recipe(path, [*overrides, f"distiller.anchor={anchor}"])
        prepare(recipe, "finetune")  # the validation tasks
        backend = get_backend(recipe.backend)
        models = backend.build(recipe)
        template = backend.template(recipe)
        tic = time.perf_counter()
        if validation is None:  # ICL and zero-shot do not depend on the distiller: scored once
            validation = Validation(recipe, models, template, recipe.finetune.eval_queries, recipe.finetune.eval_sets)
        validation.models = models
        anchors = set_anchors(recipe, template, [qs.demos for qs in validation.sets], models.llm_tokenizer)
        vectors = distill(models, validation.contexts, recipe.distiller.max_length, 4, anchors)
        out[anchor] = {**validation.score(vectors), "seconds": time.perf_counter() - tic}
        print(anchor, json.dumps(out[anchor]), flush=True)
    result = {"recipe": path, "overrides": overrides, "validation_tasks": recipe.tasks.validation,
              "queries_per_task": recipe.finetune.eval_queries, "sets_per_task": recipe.finetune.eval_sets,
              "step0": out, **stamp()}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
