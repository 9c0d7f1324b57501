"""Semi-amortised vectors on the validation tasks: quality against per-set fitting steps, from the
trained distiller's vectors and from the anchors alone.

    .venv/bin/python bench/semi_amortised.py RECIPE [--steps 0,3,5,10,30] [--set key=value ...] [--out JSON]

The recipe's trained distiller (distill.checkpoint, or the finetune output `mendctl distill` would
load) makes each validation set's vectors in one pass; the anchors are the vectors an untrained
distiller starts from (with distill.refine_from: anchors, the anchors alone, and no distiller is
needed). From each start, one run of `refine` (the recipe's distill.refine_on,
refine_lr and refine_ce_weight) on the set's own demonstrations is read at every listed step, so
the curve costs the largest step once. Each point is scored as the learning curves score a distiller
(finetune.eval_sets sets a task, finetune.eval_queries queries a set): macro-F1, agreement with ICL
and KL, each a mean over tasks, with the one-off FLOPs per set. Nothing reads a test task.
"""
import json
import statistics
import time

import torch
from recipe_args import parser

from mendctl.evaluation import flops
from mendctl.models.anchors import anchor_embeddings
from mendctl.core.config import load_recipe
from mendctl.training.curves import Validation
from mendctl.models.distiller import distill, tokens_read
from mendctl.data.prepare import prepare
from mendctl.core.provenance import stamp
from mendctl.training.refine import refine, refine_flops
from mendctl.core.registry import get_backend
from mendctl.training.trained import load_trained


def main() -> None:
    ap = parser(__doc__, "bench/results/semi_amortised/curve.json")
    ap.add_argument("--steps", default="0,3,5,10,30")
    args = ap.parse_args()
    steps = sorted({int(s) for s in args.steps.split(",")})
    recipe = load_recipe(args.recipe, args.set)
    prepare(recipe, "finetune", "finetune")
    models, source = load_trained(recipe)
    template = get_backend(recipe.backend).template(recipe)
    spec, tok, llm, ft = recipe.distill, models.llm_tokenizer, models.llm, recipe.finetune
    validation = Validation(recipe, models, template, ft.eval_queries, ft.eval_sets)
    demos = [qs.demos for qs in validation.sets]
    # A recipe that fits from the anchors (distill.refine_from: anchors) has no distiller start: its curve is
    # the anchors' alone, with no trained distiller needed (the fitted ceiling at a recipe's num_vectors).
    starts = {} if spec.refine_from == "anchors" else {
        "distiller": distill(models, validation.contexts, recipe.distiller.max_length, spec.batch_size,
                             validation.anchors)}
    if validation.anchors is not None:  # a distiller with no anchor has no untrained start to fit from
        starts["anchors"] = list(anchor_embeddings(llm, validation.anchors, recipe.num_vectors))
    llm_config, d = llm.model.config, models.distiller
    curve: dict[str, dict[int, list[torch.Tensor]]] = {name: {s: [] for s in steps} for name in starts}
    tic = time.perf_counter()
    for i, ds in enumerate(demos):
        for name, vectors in starts.items():
            snap = curve[name]
            if 0 in snap:
                snap[0].append(vectors[i])
            keep = lambda n, v, snap=snap: snap[n].append(v) if n in snap else None  # noqa: E731
            refine(llm, vectors[i], ds.demos, template, tok, steps[-1], spec.refine_lr, spec.refine_on,
                   spec.refine_ce_weight, after_step=keep)
        print(f"set {i + 1}/{len(demos)} {ds.task}/{ds.seed} {time.perf_counter() - tic:.0f}s", flush=True)
    points = {}
    for name, by_step in curve.items():
        for s, vectors in by_step.items():
            fit = statistics.fmean(refine_flops(llm_config, recipe.num_vectors, ds.demos, template, tok, s,
                                                llm.is_encoder_decoder, models.gated_mlp, spec.refine_on)
                                   for ds in demos)
            one_pass = (statistics.fmean(flops.distill_flops(
                d.body.config, tokens_read(models, ds.context, recipe.distiller.max_length), d.num_vectors,
                causal=d.causal, gated_mlp=models.gated_mlp) for ds in demos) if name == "distiller" else 0.0)
            points[f"{name}@{s}"] = {"start": name, "steps": s, **validation.score(vectors),
                                     "one_off_flops_per_set": fit + one_pass}
            p = points[f"{name}@{s}"]
            print(f"{name}@{s}: F1 {100 * p['val_mend_f1']:.1f} agreement {p['val_agreement']:.2f} "
                  f"KL {p['val_kl']:.3f} one-off {p['one_off_flops_per_set'] / 1e12:.2f} TFLOPs", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"recipe": args.recipe, "overrides": args.set, "distiller": source,
                                    "steps": steps, "points": points, "baselines": validation.baselines,
                                    "seconds": time.perf_counter() - tic, **stamp()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
