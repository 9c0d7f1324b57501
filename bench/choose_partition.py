"""Candidate test tasks scored on the baselines alone, on their dev splits, to choose a test partition.

    .venv/bin/python bench/choose_partition.py RECIPE --tasks a,b,c [--set key=value ...] [--out JSON]

For each candidate task and each seed of the recipe, ICL reads the seed's `_train` demonstrations
and both ICL and zero-shot score the seed's `_dev` queries (k of them, disjoint from the test split
and from that seed's demonstrations). Nothing reads a test split and no distiller is scored, so a
task can be chosen for a test partition from this without having been scored on its test queries.
Prints and writes each task's ICL and zero-shot macro-F1 (mean over seeds), its labels and its gain.
"""
import json
import statistics

import torch
from recipe_args import build, parser

from mendctl.evaluation import metrics
from mendctl.data.metaicl import load_split
from mendctl.core.provenance import stamp
from mendctl.models.render import context_ids, render_query
from mendctl.evaluation.scoring import QuerySet, demo_set, predicted, score
from mendctl.data.workspace import data_dir


def dev_queries(root, ds, k, template, tok) -> QuerySet:
    rows = load_split(root, ds.task, k, ds.seed, "dev")
    queries, alone = ([render_query(template, r["input"], r["options"], tok, after_context=after) for r in rows]
                      for after in (True, False))
    return QuerySet(ds, queries, alone, [r["options"] for r in rows], [r["output"] for r in rows],
                    [r["_where"] for r in rows])


def main() -> None:
    ap = parser(__doc__, "bench/results/choose_partition/candidates.json")
    ap.add_argument("--tasks", required=True, help="comma-separated candidate tasks")
    args = ap.parse_args()
    recipe, models, template = build(args, "eval")
    root, k, tok, llm = data_dir(recipe), recipe.tasks.k, models.llm_tokenizer, models.llm
    rows = {}
    for task in args.tasks.split(","):
        f1 = {"icl": [], "zero-shot": []}
        labels = set()
        for seed in recipe.tasks.seeds:
            ds = demo_set(root, task, k, seed, template, tok)
            qs = dev_queries(root, ds, k, template, tok)
            labels |= set(qs.options[0])
            for method in f1:
                ids = context_ids(template, ds.context, tok) if method == "icl" else []
                with torch.no_grad():
                    run = score(llm, llm.embed(torch.tensor(ids, dtype=torch.long, device=llm.device)), qs,
                                models.gated_mlp)
                f1[method].append(metrics.macro_f1(predicted(run.predictions, qs), qs.golds))
        rows[task] = {"icl_f1": statistics.fmean(f1["icl"]), "zero_shot_f1": statistics.fmean(f1["zero-shot"]),
                      "icl_f1_by_seed": f1["icl"], "zero_shot_f1_by_seed": f1["zero-shot"], "labels": len(labels)}
        rows[task]["gain"] = rows[task]["icl_f1"] - rows[task]["zero_shot_f1"]
        print(task, json.dumps(rows[task]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"recipe": args.recipe, "overrides": args.set, "split": "dev",
                                        "seeds": recipe.tasks.seeds, "tasks": rows, **stamp()}, indent=2) + "\n")
    print("| task | labels | ICL F1 | zero-shot F1 | gain |")
    print("|---|---|---|---|---|")
    for t in sorted(rows, key=lambda t: -rows[t]["gain"]):
        r = rows[t]
        print(f"| {t} | {r['labels']} | {100 * r['icl_f1']:.1f} | {100 * r['zero_shot_f1']:.1f} | "
              f"{100 * r['gain']:+.1f} |")


if __name__ == "__main__":
    main()
