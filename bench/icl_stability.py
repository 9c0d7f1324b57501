"""How often ICL agrees with itself: the goal's agreement bar set beside ICL's own stability.

    .venv/bin/python bench/icl_stability.py RECIPE [--queries 100] [--set key=value ...] [--out JSON]

For each test task and seed of the recipe (tasks.seeds), ICL on the set's first `--queries` test
queries (from the eval cache when `mendctl eval --limit` scored them) is compared with ICL on the
same demonstrations changed in ways that should not change the task: their order reversed, their
order shuffled (seed 0), and the first (oldest) of them left out, which changes nothing where the
context budget had already cut it. Agreement is the share of queries where both pick the same
option, as `mendctl eval` reports MEND's; F1 is each run's macro-F1. Chooses nothing: it measures
the bar, not a method. Writes bench/results/icl_stability.json, or --out, after every set.
"""
import json
import random
import statistics

import torch
from recipe_args import build, parser

from mendctl.evaluation import metrics
from mendctl.training.curves import baseline
from mendctl.core.provenance import stamp
from mendctl.models.render import context_ids, render_context
from mendctl.evaluation.scoring import demo_sets, predicted, query_set, score
from mendctl.data.workspace import data_dir

VARIANTS = {
    "reversed": lambda demos: demos[::-1],
    "shuffled": lambda demos: random.Random(0).sample(demos, len(demos)),
    "first left out": lambda demos: demos[1:],
}


def main() -> None:
    ap = parser(__doc__, "bench/results/icl_stability.json")
    ap.add_argument("--queries", type=int, default=100)
    args = ap.parse_args()
    recipe, models, template = build(args, "eval")
    llm, tok, root = models.llm, models.llm_tokenizer, data_dir(recipe)
    results = {"recipe": args.recipe, "overrides": args.set, "queries": args.queries, "sets": {}}
    for ds in demo_sets(recipe, template, tok):
        qs = query_set(root, ds, recipe.tasks.k, template, tok, args.queries)
        with torch.no_grad():
            icl = baseline(recipe, models, template, qs, "icl", args.queries)
            runs = {"zero-shot": baseline(recipe, models, template, qs, "zero-shot", args.queries)}
            for name, change in VARIANTS.items():
                ids = context_ids(template, render_context(template, change(ds.demos), tok), tok)
                prefix = llm.embed(torch.tensor(ids, dtype=torch.long, device=llm.device))
                runs[name] = score(llm, prefix, qs, models.gated_mlp)
        f1 = {name: metrics.macro_f1(predicted(run.predictions, qs), qs.golds)
              for name, run in [("icl", icl), *runs.items()]}
        row = {"icl_f1": f1["icl"]}
        for name, run in runs.items():
            row[name] = {"agreement": metrics.agreement(icl.predictions, run.predictions), "f1": f1[name]}
        results["sets"][qs.key] = row
        print(qs.key, json.dumps(row), flush=True)
        rows = list(results["sets"].values())
        results["mean"] = {"icl_f1": statistics.fmean(r["icl_f1"] for r in rows),
                           **{name: {m: statistics.fmean(r[name][m] for r in rows) for m in ("agreement", "f1")}
                              for name in runs}}
        results.update(stamp())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results["mean"], indent=1))


if __name__ == "__main__":
    main()
