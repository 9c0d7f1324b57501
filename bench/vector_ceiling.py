"""How close to ICL K vectors get on the validation tasks when they are fitted to each task's own
demonstrations by gradient descent, with no distiller: what the vectors could carry of those
demonstrations, against which a distiller's validation KL can be read.

    .venv/bin/python bench/vector_ceiling.py RECIPE [--steps 60] [--lr 3e-3] [--every 20]
                                             [--set key=value ...] [--out JSON]

For each validation task (its demonstration set and queries as the learning curves take them):
leave-one-out episodes of its k demonstrations (the query is demonstration i, the teacher is ICL
with the other k-1), K vectors that start at the recipe's anchors (zeros when unanchored) are fitted
with Adam on stage 2's loss (finetune.kl_weight x KL + finetune.ce_weight x target CE, over all k
episodes each step), and scored every `--every` steps on the validation queries against ICL as
the curves score a distiller. The vectors never see a validation query: each point is a per-task
prompt tuning on the demonstrations alone. Writes bench/results/vector_ceiling.json, or --out.
"""
import argparse
import json
from pathlib import Path

import torch

from mendctl.models.anchors import anchor_embeddings
from mendctl.training.checkpoint import load_distiller
from mendctl.models.distiller import distill
from mendctl.core.config import load_recipe
from mendctl.training.curves import Validation
from mendctl.training.losses import ForwardKL, TargetCE
from mendctl.data.prepare import prepare
from mendctl.core.provenance import stamp
from mendctl.core.registry import get_backend
from mendctl.training.refine import leave_one_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], help="key=value recipe override (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/vector_ceiling.json"))
    ap.add_argument("--start", type=Path, help="a trained distiller: start from its vectors, not the anchors")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    prepare(recipe, "finetune", "finetune")
    backend = get_backend(recipe.backend)
    models, template = backend.build(recipe), backend.template(recipe)
    llm, tok, k = models.llm, models.llm_tokenizer, recipe.num_vectors
    spec = recipe.finetune
    validation = Validation(recipe, models, template, spec.eval_queries)
    kl, ce = ForwardKL(spec.temperature), TargetCE()
    if args.start:
        load_distiller(models.distiller, args.start)
        starts = distill(models, validation.contexts, recipe.distiller.max_length, 4, validation.anchors)
    snapshots: dict[int, list[torch.Tensor]] = {}  # step -> each task's vectors then
    for n, qs in enumerate(validation.sets):
        as_t = lambda ids: torch.tensor(ids, dtype=torch.long, device=llm.device)  # noqa: E731
        ctxs, xs, ys = ([as_t(ids) for ids in part] for part in zip(*leave_one_out(template, qs.demos.demos, tok)))
        with torch.no_grad():
            teacher = llm.target_logits([llm.embed(c) for c in ctxs], xs, ys).logits
        start = (starts[n] if args.start else anchor_embeddings(llm, [validation.anchors[n]], k)[0]
                 if validation.anchors is not None else torch.zeros(k, llm.hidden_size, dtype=llm.dtype, device=llm.device))
        vectors = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([vectors], lr=args.lr)
        for step in range(args.steps + 1):
            if step % args.every == 0 or step == args.steps:
                snapshots.setdefault(step, []).append(vectors.detach().clone())
            if step == args.steps:
                break
            student = llm.target_logits([vectors] * len(xs), xs, ys)
            loss = spec.kl_weight * kl(teacher, student.logits) + spec.ce_weight * ce(
                student.logits[student.is_y], student.targets[student.is_y])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(qs.demos.task, f"fitted: last loss {loss.item():.3f}", flush=True)
    curve = [{"step": step, **validation.score(vectors)} for step, vectors in sorted(snapshots.items())]
    result = {"recipe": args.recipe, "overrides": args.set, "steps": args.steps, "lr": args.lr,
              "start": str(args.start) if args.start else "anchors",
              "queries_per_task": spec.eval_queries, "validation_tasks": recipe.tasks.validation,
              "curve": curve, **stamp()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| step | F1 | agreement | KL(ICL \\|\\| vectors) |\n|---|---|---|---|")
    for r in curve:
        print(f"| {r['step']} | {100 * r['val_mend_f1']:.1f} | {r['val_agreement']:.2f} | {r['val_kl']:.3f} |")
    z = curve[0]
    print(f"| zero-shot | {100 * z['val_zero_shot_f1']:.1f} | {z['val_zero_shot_agreement']:.2f} | "
          f"{z['val_zero_shot_kl']:.3f} |\n| ICL | {100 * z['val_icl_f1']:.1f} | 1 | 0 |")


if __name__ == "__main__":
    main()
