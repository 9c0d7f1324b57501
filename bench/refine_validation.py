"""Vectors refined per set (distill.refine_*) scored on the validation tasks, as the curves score a distiller.

    .venv/bin/python bench/refine_validation.py RECIPE [--set key=value ...]
                     [--variant NAME key=value ...] ... [--out JSON]

Each `--variant` is a name and the recipe keys it sets over the recipe's (and --set's), for example
`--variant options distill.refine_from=anchors distill.refine_steps=30 distill.refine_on=options`.
For each, every validation set's vectors are made as `mendctl distill` makes a test set's
(`refine.set_vectors`: the distiller `mendctl distill` would load, or the anchors, then the refining
steps on the set's own demonstrations) and scored against ICL on the set's first `finetune.eval_queries` queries, on
`finetune.eval_sets` sets a task. The validation queries are never read by the refinement. Writes
bench/results/refine_validation.json, or --out.
"""
import json
import time

from recipe_args import parser

from mendctl.core.config import load_recipe
from mendctl.training.curves import Validation
from mendctl.data.prepare import prepare
from mendctl.core.provenance import stamp
from mendctl.training.refine import set_vectors
from mendctl.core.registry import get_backend
from mendctl.training.trained import load_trained


def main() -> None:
    ap = parser(__doc__, "bench/results/refine_validation.json")
    ap.add_argument("--variant", action="append", nargs="+", required=True, metavar="NAME KEY=VALUE",
                    help="a name, then the keys it sets (repeatable)")
    args = ap.parse_args()
    results = {"recipe": args.recipe, "overrides": args.set, "variants": {}}
    validation = None
    for name, *keys in args.variant:
        recipe = load_recipe(args.recipe, [*args.set, *keys])
        prepare(recipe, "finetune", "finetune")
        models, _ = load_trained(recipe, require=False)  # the distiller `mendctl distill` would use, if any
        template = get_backend(recipe.backend).template(recipe)
        if validation is None:  # ICL and zero-shot do not depend on the vectors: scored once
            validation = Validation(recipe, models, template, recipe.finetune.eval_queries, recipe.finetune.eval_sets)
            results["baselines"] = validation.baselines
        validation.models = models
        tic = time.perf_counter()
        vectors = list(set_vectors(recipe, models, template, [qs.demos for qs in validation.sets],
                                   recipe.distill.batch_size))
        results["variants"][name] = {"keys": keys, **validation.score(vectors),
                                     "seconds": time.perf_counter() - tic}
        print(name, json.dumps(results["variants"][name]), flush=True)
    results.update(stamp())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
