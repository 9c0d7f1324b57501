"""Amortised fitting: fit vectors to many meta-train demonstration sets, then train the distiller to
regress them, and score it on the validation tasks along the way.

    .venv/bin/python bench/amortise.py RECIPE [--sets 150] [--fit-steps 5] [--episodes 8] [--remap 0.75]
        [--train-steps 400] [--batch 4] [--lr 1e-4] [--eval-every 100] [--set key=value ...] --out DIR

1. Targets (DIR/targets.pt, written every 10 sets and read back on a rerun, which goes on from there):
   set i draws a meta-train task (finetune.train_tasks less tasks.validation), k of its train examples,
   and with probability --remap a mapping of its labels to random words (so a target can only come from
   reading the set); its vectors are the anchors fitted --fit-steps steps on its first --episodes
   leave-one-out episodes (`refine` with the recipe's distill.refine_on, refine_lr, refine_ce_weight).
2. Training: the recipe's distiller, untrained (its vectors are the anchors), learns to give each set's
   target in one pass. The loss of a set is ||v - target||^2 / ||target - anchors||^2: 1 at the start,
   0 on the target, the same weight for a set whose fit moved little as for one that moved far.
3. Every --eval-every steps (and at step 0, the anchors): the validation curve as the trainer's
   (finetune.eval_sets sets a task, finetune.eval_queries queries), in DIR/metrics.jsonl, with the
   regression loss on the held-out tenth of the targets; the distiller at the lowest validation KL
   goes to DIR/best.safetensors (loadable as distill.checkpoint).

Also written: DIR/distances.json, ||target - anchors|| / ||anchors|| per vector over all targets, with
and without remapped labels, the share beyond distiller.max_correction (lever a: does the bound hold
them?) and the share of the corrections common to all targets. With --train-steps 0 the script stops
there. No test task is read.
"""
import json
import random
import statistics
import time

import torch
from recipe_args import parser

from mendctl.core.config import load_recipe
from mendctl.core.provenance import stamp
from mendctl.core.registry import get_backend
from mendctl.data.metaicl import read_examples, task_file
from mendctl.data.prepare import prepare
from mendctl.data.workspace import data_dir, partition_for
from mendctl.models.anchors import anchor_embeddings, anchor_ids, label_ids
from mendctl.models.distiller import distiller_inputs
from mendctl.models.render import context_ids, render_context
from mendctl.training.checkpoint import write_distiller
from mendctl.training.curves import Validation, common_share, correction_ratios
from mendctl.training.examples import REMAP_WORDS, meta_train_tasks
from mendctl.training.refine import refine


def draw_set(rng: random.Random, names: list[str], rows_of, k: int, remap: float) -> tuple[str, list[dict], bool]:
    """A meta-train task's k demonstrations, their labels (and options) remapped to random words or not."""
    task = rng.choice(names)
    demos = rng.sample(rows_of(task), k)
    options = demos[0].get("options") or []
    remapped = rng.random() < remap and 2 <= len(options) <= len(REMAP_WORDS)
    if remapped:
        m = dict(zip(options, rng.sample(REMAP_WORDS, len(options))))
        demos = [{**d, "output": m.get(d["output"], d["output"]),
                  "options": [m.get(o, o) for o in d.get("options") or []]} for d in demos]
    return task, demos, remapped


def make_targets(args, recipe, models, template, path) -> list[dict]:
    llm, tok, k, spec = models.llm, models.llm_tokenizer, recipe.tasks.k, recipe.distill
    root = data_dir(recipe)
    names = meta_train_tasks(recipe.finetune, root, partition_for(recipe), recipe.tasks)
    cache: dict[str, list[dict]] = {}
    rows_of = lambda t: cache.setdefault(t, read_examples(task_file(root, t, recipe.finetune.train_file)))  # noqa: E731
    targets = torch.load(path) if path.is_file() else []
    tic = time.perf_counter()
    for i in range(len(targets), args.sets):
        task, demos, remapped = draw_set(random.Random(f"amortise:{recipe.seed}:{i}"), names, rows_of, k, args.remap)
        context = render_context(template, demos, tok)
        ids = anchor_ids(recipe.distiller.anchor, context_ids(template, context, tok), label_ids(template, demos, tok),
                         recipe.num_vectors)
        anchors = anchor_embeddings(llm, [ids], recipe.num_vectors)[0]
        fitted = refine(llm, anchors, demos, template, tok, args.fit_steps, spec.refine_lr, spec.refine_on,
                        spec.refine_ce_weight, episodes=args.episodes)
        targets.append({"task": task, "remapped": remapped, "context": context, "anchor_ids": ids,
                        "target": fitted.float()})
        if (i + 1) % 10 == 0 or i + 1 == args.sets:
            torch.save(targets, path)
            print(f"targets {i + 1}/{args.sets} {time.perf_counter() - tic:.0f}s", flush=True)
    return targets


def distances(targets: list[dict], anchors: torch.Tensor, bound: float | None) -> dict:
    """‖target − anchor‖ / ‖anchor‖ per vector, over all targets and split by remapping; with `bound`
    (distiller.max_correction), the share of vectors beyond it too; and the share of the corrections
    that all targets have in common (`common_share`)."""
    def summary(values):
        values = sorted(values)
        outside = {} if bound is None else {"outside_bound": sum(v > bound for v in values) / len(values)}
        return {"n": len(values), "median": values[len(values) // 2], "p90": values[int(0.9 * len(values))],
                "max": values[-1], **outside} if values else {}

    out = {}
    for name, keep in (("all", lambda t: True), ("remapped", lambda t: t["remapped"]),
                       ("original", lambda t: not t["remapped"])):
        values = []
        for t, a in zip(targets, anchors):
            if keep(t):
                values += correction_ratios(t["target"], a).tolist()
        out[name] = summary(values)
    corrections = torch.stack([t["target"] for t in targets]) - anchors
    out["correction_shared"] = common_share(corrections)  # about 1/len(targets) when each set's own
    return out


def main() -> None:
    ap = parser(__doc__, "bench/results/amortise")
    for flag, kind, default in (("--sets", int, 150), ("--fit-steps", int, 5), ("--episodes", int, 8),
                                ("--remap", float, 0.75), ("--train-steps", int, 400), ("--batch", int, 4),
                                ("--lr", float, 1e-4), ("--eval-every", int, 100)):
        ap.add_argument(flag, type=kind, default=default)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(args.recipe, args.set)
    prepare(recipe, "finetune", "finetune")
    backend = get_backend(recipe.backend)
    models, template = backend.build(recipe), backend.template(recipe)
    llm, d, ft = models.llm, models.distiller, recipe.finetune
    targets = make_targets(args, recipe, models, template, out / "targets.pt")
    anchors = anchor_embeddings(llm, [t["anchor_ids"] for t in targets], recipe.num_vectors).float()
    (out / "distances.json").write_text(
        json.dumps(distances(targets, anchors, recipe.distiller.max_correction), indent=1) + "\n")
    if args.train_steps == 0:
        return  # the targets and their distances were all that was asked
    held = set(range(0, len(targets), 10))
    train = [i for i in range(len(targets)) if i not in held]

    def losses(idx: list[int]) -> torch.Tensor:
        ids, mask = distiller_inputs([targets[i]["context"] for i in idx], models.distiller_tokenizer,
                                     recipe.distiller.max_length, llm.device)
        a = anchors[idx].to(llm.dtype)
        v = d(ids, mask, a).float()
        t = torch.stack([targets[i]["target"] for i in idx])
        return ((v - t) ** 2).sum((1, 2)) / ((t - a.float()) ** 2).sum((1, 2)).clamp_min(1e-8)

    validation = Validation(recipe, models, template, ft.eval_queries, ft.eval_sets)
    params = [p for p in d.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = random.Random(f"amortise-train:{recipe.seed}")
    best, log, tic = None, out / "metrics.jsonl", time.perf_counter()
    log.write_text("")
    for step in range(args.train_steps + 1):
        if step % args.eval_every == 0 or step == args.train_steps:
            d.eval()
            with torch.no_grad():
                point = validation.score_distiller(recipe.distiller.max_length, recipe.distill.batch_size)
                held_loss = statistics.fmean(losses([i]).item() for i in sorted(held))
            d.train()
            point = {"step": step, "held_out_regression": held_loss, **point, "seconds": time.perf_counter() - tic}
            with log.open("a") as f:
                f.write(json.dumps(point) + "\n")
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in point.items()}, flush=True)
            if best is None or point["val_kl"] < best:
                best = point["val_kl"]
                write_distiller(out / "best.safetensors", d, recipe,
                                {"step": step, "amortise": vars(args) | {"out": str(out)}, "val_kl": best})
        if step == args.train_steps:
            break
        loss = losses(rng.sample(train, args.batch)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.perf_counter() - tic:.0f}s", flush=True)
    (out / "run.json").write_text(json.dumps({"recipe": args.recipe, "overrides": args.set, "args": vars(args) | {
        "out": str(out)}, "targets": len(targets), "best_val_kl": best, **stamp()}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
