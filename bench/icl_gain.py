"""How much ICL adds over zero-shot on each task of the meta-train side: where vectors that stand
in for the demonstrations have something to carry, to choose validation tasks from (never test tasks).

    .venv/bin/python bench/icl_gain.py RECIPE [--queries 25] [--set key=value ...] [--out JSON]

The candidates are every task `finetune.train_tasks: all` would train on (no test task, nor another
task of a test task's family) and the recipe's validation tasks. Each is scored as the learning
curves score a validation task (its first-seed demonstration set, its first `--queries` test
queries; ICL and zero-shot from the eval cache when there): macro-F1 of each and ICL's agreement
with zero-shot. Writes bench/results/icl_gain.json, or --out; prints the tasks by ICL's gain.
"""
import json
import statistics

from recipe_args import build, parser

from mendctl.evaluation import metrics
from mendctl.training.curves import Validation
from mendctl.training.examples import meta_train_tasks
from mendctl.core.provenance import stamp
from mendctl.evaluation.scoring import predicted
from mendctl.data.workspace import data_dir, partition_for


def main() -> None:
    ap = parser(__doc__, "bench/results/icl_gain.json")
    ap.add_argument("--queries", type=int, default=25)
    args = ap.parse_args()
    recipe, models, template = build(args, "finetune", "finetune")
    every = recipe.finetune.model_copy(update={"train_tasks": "all"})
    candidates = sorted({*meta_train_tasks(every, data_dir(recipe), partition_for(recipe), recipe.tasks),
                         *recipe.tasks.validation})
    rows = {}
    for task in candidates:
        one = recipe.model_copy(update={"tasks": recipe.tasks.model_copy(update={"validation": [task]})})
        try:
            v = Validation(one, models, template, args.queries)
        except (FileNotFoundError, ValueError) as e:  # no k-shot split for this task
            print(task, "skipped:", e, flush=True)
            continue
        qs, icl, zero = v.sets[0], v.icl[0], v.zero_shot[0]
        f1 = lambda run: metrics.macro_f1(predicted(run.predictions, qs), qs.golds)  # noqa: E731
        rows[task] = {"icl_f1": f1(icl), "zero_shot_f1": f1(zero), "gain": f1(icl) - f1(zero),
                      "agreement": metrics.agreement(icl.predictions, zero.predictions),
                      "labels": len(set(qs.golds)), "queries": len(qs.golds),
                      "validation": task in recipe.tasks.validation}
        print(task, json.dumps(rows[task]), flush=True)
    ranked = sorted(rows, key=lambda t: -rows[t]["gain"])
    gains = [r["gain"] for r in rows.values() if r["validation"]]  # none in a recipe without validation tasks
    result = {"recipe": args.recipe, "overrides": args.set, "queries": args.queries, "tasks": rows,
              "mean_gain_validation": statistics.fmean(gains) if gains else None, **stamp()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| task | ICL F1 | zero-shot F1 | gain | ICL agrees with zero-shot | labels | now a validation task |")
    print("|---|---|---|---|---|---|---|")
    for t in ranked:
        r = rows[t]
        print(f"| {t} | {100 * r['icl_f1']:.1f} | {100 * r['zero_shot_f1']:.1f} | {100 * r['gain']:+.1f} | "
              f"{r['agreement']:.2f} | {r['labels']} | {'yes' if r['validation'] else ''} |")


if __name__ == "__main__":
    main()
