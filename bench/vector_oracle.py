"""What K vectors can carry of ICL on the test tasks at best: vectors fitted to ICL's own option
distributions on the test queries. A ceiling that chooses nothing: it reads the test queries (never
their gold labels) and is reported beside the goal, not used to pick anything.

    .venv/bin/python bench/vector_oracle.py RECIPE [--seeds 100] [--queries 100] [--fit-every 4] [--steps 30]
                                            [--every 10] [--lr 3e-3] [--set key=value ...] [--out JSON]

For each test task and seed: ICL's option losses on the set's first `--queries` test queries (from
the eval cache when `mendctl eval --limit` scored them), then K vectors that start at the recipe's
anchors (`last`: icl-truncated) are fitted with Adam to the KL between ICL's and their distributions
over the options (finetune.kl_on: options) of every `--fit-every`-th query, all of them each step.
Every `--every` steps both parts are scored: `fit` (the queries fitted: can K vectors make the LLM
answer as ICL does at all?) and `held_out` (the other queries: does what was fitted on some queries
of a task carry to its others?). Writes bench/results/vector_oracle.json, or --out.
"""
import json
import statistics
from pathlib import Path

import torch
from recipe_args import build, parser

from mendctl.evaluation import metrics
from mendctl.models.anchors import anchor_embeddings, set_anchors
from mendctl.training.curves import baseline
from mendctl.training.losses import OptionKL
from mendctl.core.provenance import stamp
from mendctl.evaluation.scoring import demo_set, query_set
from mendctl.data.workspace import data_dir, partition_for


def _scores(icl: list[list[float]], losses: list[list[float]], qs, idx: list[int]) -> dict:
    pick = lambda rows: [rows[i] for i in idx]  # noqa: E731
    preds = [min(range(len(lo)), key=lo.__getitem__) for lo in pick(losses)]
    icl_preds = [min(range(len(lo)), key=lo.__getitem__) for lo in pick(icl)]
    return {"agreement": metrics.agreement(icl_preds, preds), "kl": metrics.mean_kl(pick(icl), pick(losses)),
            "f1": metrics.macro_f1([qs.options[i][p] for i, p in zip(idx, preds)], pick(qs.golds))}


def main() -> None:
    ap = parser(__doc__, "bench/results/vector_oracle.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[100])
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--fit-every", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    recipe, models, template = build(args, "eval")
    llm, tok, k, root = models.llm, models.llm_tokenizer, recipe.num_vectors, data_dir(recipe)
    as_t = lambda ids: torch.tensor(ids, dtype=torch.long, device=llm.device)  # noqa: E731
    kl = OptionKL()
    results = {"recipe": args.recipe, "overrides": args.set, "seeds": args.seeds, "queries": args.queries,
               "fit_every": args.fit_every, "steps": args.steps, "lr": args.lr, "sets": {}}
    for task in partition_for(recipe).test:
        for seed in args.seeds:
            qs = query_set(root, demo_set(root, task, recipe.tasks.k, seed, template, tok), recipe.tasks.k, template,
                           tok, args.queries)
            with torch.no_grad():
                icl = baseline(recipe, models, template, qs, "icl", args.queries).losses
            anchors = set_anchors(recipe, template, [qs.demos], tok)
            start = anchor_embeddings(llm, anchors, k)[0] if anchors else torch.zeros(k, llm.hidden_size)
            vectors = start.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([vectors], lr=args.lr)
            queries = qs.rendered(vectors)
            ids = [(as_t(q.x), [as_t(o) for o in q.options]) for q in queries]
            fit = list(range(0, len(ids), args.fit_every))
            held = [i for i in range(len(ids)) if i % args.fit_every]
            target = [torch.tensor(icl[i]) for i in fit]
            curve = []
            for step in range(args.steps + 1):
                if step % args.every == 0:
                    with torch.no_grad():
                        now = [llm.option_losses(vectors, x, o).tolist() for x, o in ids]
                    curve.append({"step": step, "fit": _scores(icl, now, qs, fit),
                                  "held_out": _scores(icl, now, qs, held)})
                    print(task, seed, curve[-1], flush=True)
                if step == args.steps:
                    break
                loss = kl(target, [llm.option_losses(vectors, *ids[i]) for i in fit])
                opt.zero_grad()
                loss.backward()
                opt.step()
            results["sets"][qs.key] = curve
            _write(results, args.out)  # after every set: a run stopped early keeps what it scored
    print(json.dumps(results["mean"], indent=1))


def _write(results: dict, out: Path) -> None:
    by_step = {}
    for curve in results["sets"].values():
        for point in curve:
            by_step.setdefault(point["step"], []).append(point)
    results["mean"] = {step: {half: {m: statistics.fmean(p[half][m] for p in points) for m in ("agreement", "kl", "f1")}
                              for half in ("fit", "held_out")} for step, points in by_step.items()}
    results.update(stamp())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
