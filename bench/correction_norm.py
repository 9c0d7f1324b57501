"""How far trained anchored distillers move their vectors from the anchors, on the validation sets.

    .venv/bin/python bench/correction_norm.py RECIPE DISTILLER... [--set key=value ...] [--out JSON]

For each distiller file (built with its own distiller keys, as bench/choose_distiller.py builds it),
the norm of vector - anchor per slot on each validation demonstration set (`finetune.eval_sets` sets a
task), beside the anchors' own norm: a correction near the anchor's norm puts the vector as far from
its token as another token is; and the share of the corrections that all sets have in common
(`common_share`, as the learning curves log it). Writes bench/results/correction_norm/correction_norm.json,
or --out.
"""
import json

import torch

from mendctl.models.anchors import anchor_embeddings
from mendctl.training.checkpoint import load_distiller
from mendctl.models.distiller import distill
from mendctl.training.curves import common_share, correction_ratios
from mendctl.core.provenance import file_hash, stamp

from choose_distiller import by_recipe, distiller_args


def main() -> None:
    args = distiller_args("bench/results/correction_norm/correction_norm.json")
    out = {}
    # one query a set: only the demonstrations matter here (the baselines come from the eval cache)
    for recipe, models, validation, paths in by_recipe(args, queries=1):
        anchors = anchor_embeddings(models.llm, validation.anchors, recipe.num_vectors)
        for path in paths:
            load_distiller(models.distiller, path)
            with torch.no_grad():
                vectors = torch.stack(distill(models, validation.contexts, recipe.distiller.max_length, 4,
                                              validation.anchors))
            correction = vectors - anchors  # [sets, K, d]
            moved = correction.norm(dim=-1)  # [sets, K]
            out[str(path)] = {"sha256_16": file_hash(path), "max_correction": recipe.distiller.max_correction,
                              "anchor_norm": anchors.norm(dim=-1).mean().item(),
                              "correction_norm": moved.mean().item(), "correction_norm_max": moved.max().item(),
                              "correction_over_anchor": correction_ratios(vectors, anchors).mean().item(),
                              "correction_shared": common_share(correction),
                              "correction_norm_per_slot": [round(x, 3) for x in moved.mean(0).tolist()]}
            print(path, json.dumps({k: v for k, v in out[str(path)].items() if k != "correction_norm_per_slot"}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"recipe": args.recipe, "overrides": args.set,
                                    "validation_tasks": recipe.tasks.validation, "distillers": out, **stamp()},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
