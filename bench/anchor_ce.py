"""Target-token CE on episodes of HELD-OUT meta-train tasks: zero-shot, ICL, the last K context tokens,
an anchored distiller (distiller.anchor=last) untrained and after a short stage 2, with and without
label remapping.

    PYTHONPATH=. python bench/anchor_ce.py recipes/llama/smollm2-demo.yaml --steps 100 \
        tasks.bigbench=null tasks.data_dir=DATA output_dir=runs/anchor-ce

The held-out tasks are taken out of the partition's meta-train list (a partition file written into
output_dir), so stage 2 never sees them; episodes are drawn as stage 2 draws them, with another
seed, once as they are and once with every episode's labels remapped (finetune.remap_labels=1).
Writes bench/results/anchor_ce.json after every configuration.
"""
from demo_setting import AS_MEASURED  # bench/ is on sys.path when a bench script runs
import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console

from mendctl.models.anchors import anchor_embeddings, anchor_ids
from mendctl.training.checkpoint import load_distiller
from mendctl.core.config import load_recipe
from mendctl.training.examples import TaskExamples
from mendctl.training.losses import TargetCE
from mendctl.core.partitions import load_partition
from mendctl.data.prepare import prepare
from mendctl.core.registry import get_backend
from mendctl.models.distiller import distiller_inputs
from mendctl.commands.train import train
from mendctl.data.workspace import data_dir

HELD_OUT = ["navigate", "snarks", "color-rgb", "anachronisms"]


def episodes(recipe, models, remap: float, n: int):
    spec = recipe.finetune.model_copy(update={"remap_labels": remap})
    ex = TaskExamples(spec, recipe.tasks, data_dir(recipe), HELD_OUT, get_backend(recipe.backend).template(recipe),
                      models.llm_tokenizer, seed=12345)
    return [ex.get(p) for p in range(n)]


@torch.no_grad()
def target_ce(models, recipe, eps, prefix_of) -> float:
    llm, ce, total = models.llm, TargetCE(), []
    for e in eps:
        t = lambda ids: torch.tensor(ids, dtype=torch.long)  # noqa: E731
        out = llm.target_logits([prefix_of(e)], [t(e.x)], [t(e.y)])
        total.append(ce(out.logits[out.is_y], out.targets[out.is_y]).item())
    return sum(total) / len(total)


def vectors_fn(models, recipe):
    k, distiller = recipe.num_vectors, models.distiller.eval()

    def make(e):
        ids, mask = distiller_inputs([e.distiller_text], models.distiller_tokenizer, recipe.distiller.max_length, "cpu")
        anchors = anchor_embeddings(models.llm, [anchor_ids("last", e.ctx, e.labels, k)], k)
        return distiller(ids, mask, anchors)[0]
    return make


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--remaps", default="0,0.5", help="remap_labels values to train with; '' trains nothing")
    ap.add_argument("--out", default="bench/results/anchor_ce.json")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()
    torch.set_grad_enabled(True)
    a.overrides = [*AS_MEASURED, *a.overrides]
    base = load_recipe(a.recipe, a.overrides)
    full = load_partition(base.tasks.partition)
    part = base.output_dir / "partition-heldout.json"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_text(json.dumps({"train": [t for t in full.train if t not in HELD_OUT], "test": list(full.test),
                                "task_types": {t: v for t, v in full.task_types.items() if t not in HELD_OUT}}))
    common = [*a.overrides, f"tasks.partition={part}", "distiller.anchor=last", f"finetune.steps={a.steps}",
              f"finetune.save_every={a.steps}", "finetune.lr=1e-4", "finetune.batch_size=2"]
    recipe = load_recipe(a.recipe, common)
    prepare(recipe, "finetune")
    models = get_backend(recipe.backend).build(recipe)
    llm, k = models.llm, recipe.num_vectors
    sets = {"as_is": episodes(recipe, models, 0.0, a.episodes), "remapped": episodes(recipe, models, 1.0, a.episodes)}
    emb = lambda ids: llm.embed(torch.tensor(ids, dtype=torch.long))  # noqa: E731
    # ICL on remapped episodes is the ceiling for vectors that carry the mapping.
    results = {"recipe": a.recipe, "overrides": common, "held_out_tasks": HELD_OUT, "episodes": a.episodes,
               "steps": a.steps, "target_ce": {}}

    # A rerun (say, with more steps) keeps the untrained measurements of an earlier run on the same episodes.
    earlier = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    if (earlier.get("held_out_tasks"), earlier.get("episodes")) == (HELD_OUT, a.episodes):
        results["target_ce"] = {n: v for n, v in earlier["target_ce"].items() if not n.startswith("anchored-") or
                                n == "anchored-step0"}

    def record(name, prefix_of):
        if name in results["target_ce"]:
            return
        results["target_ce"][name] = {s: target_ce(models, recipe, eps, prefix_of) for s, eps in sets.items()}
        print(name, results["target_ce"][name], flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")

    record("zero-shot", lambda e: emb([]))
    record("icl", lambda e: emb(e.ctx))
    record(f"last-{k}", lambda e: emb(e.ctx[-k:]))
    record("anchored-step0", vectors_fn(models, recipe))
    for remap in [float(r) for r in a.remaps.split(",") if r]:
        r = load_recipe(a.recipe, [*common, f"finetune.remap_labels={remap}",
                                   f"output_dir={recipe.output_dir / f'remap{remap}'}"])
        prepare(r, "finetune")
        tic = time.time()
        path = train(r, "finetune", restart=True, console=Console(quiet=True))
        trained = get_backend(r.backend).build(r)
        load_distiller(trained.distiller, path)
        models.distiller = trained.distiller
        results.setdefault("train_seconds", {})[str(remap)] = time.time() - tic
        record(f"anchored-{a.steps}steps-remap{remap}", vectors_fn(models, recipe))


if __name__ == "__main__":
    main()
