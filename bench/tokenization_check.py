"""Gold-output CE of the real LLM on stage-2 episodes, before vs after the tokenization fix (issue #9).

    PYTHONPATH=. .venv/bin/python bench/tokenization_check.py [--episodes 20] [overrides...]

before: the context tokenised with the separator, the query alone after it, no BOS (the old code).
after:  the context alone, separator + query tokenised together, BOS first (what mendctl does now).
Also the two halves apart (tokenization only; BOS only) and BOS = <|endoftext|> for comparison.
Zero-shot has no separator either way, so only BOS changes it. Writes bench/results/tokenization_check.json.
"""
from demo_setting import AS_MEASURED  # bench/ is on sys.path when a bench script runs
import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from mendctl.core.config import load_recipe
from mendctl.training.examples import TaskExamples, meta_train_tasks
from mendctl.data.prepare import prepare
from mendctl.core.provenance import stamp
from mendctl.core.registry import get_backend
from mendctl.data.workspace import data_dir, partition_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/llama/smollm2-demo.yaml")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--out", default="bench/results/tokenization_check.json")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    recipe = load_recipe(a.recipe, [*AS_MEASURED, *a.overrides])
    prepare(recipe, "finetune")
    backend = get_backend(recipe.backend)
    lm, tok, llm_id = backend.load_llm(recipe.llm, recipe.seed)
    template = backend.template(recipe)
    examples = TaskExamples(recipe.finetune, recipe.tasks, data_dir(recipe),
                            meta_train_tasks(recipe.finetune, data_dir(recipe), partition_for(recipe), recipe.tasks),
                            template, tok, recipe.seed)
    ids = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    sep = template.separator
    bos_ids = {"none": None, "tokenizer_bos": tok.bos_token_id, "eos_text_token": tok.convert_tokens_to_ids("<|endoftext|>")}
    variants = {  # name: (new tokenization?, BOS)
        "before": (False, "none"), "tokenization_only": (True, "none"),
        "bos_only": (False, "tokenizer_bos"), "after": (True, "tokenizer_bos"), "after_endoftext_bos": (True, "eos_text_token"),
    }
    ce = {f"{v}/{m}": [] for v in variants for m in ("icl", "zero-shot")}
    differ = []  # episodes whose ICL ids (context + query) the fix changes, with an example of the change
    for pos in range(a.episodes):
        e = examples.get(pos)
        query_text = tok.decode(e.x)
        assert query_text.startswith(sep), query_text
        old = {"ctx": ids(e.distiller_text + sep), "x": ids(query_text[len(sep):])}
        alone = ids(query_text[len(sep):])
        if old["ctx"] + old["x"] != e.ctx + e.x:
            differ.append({"episode": pos, "before_tail": tok.convert_ids_to_tokens((old["ctx"] + old["x"])[len(e.ctx) - 3:len(e.ctx) + 3]),
                           "after_tail": tok.convert_ids_to_tokens((e.ctx + e.x)[len(e.ctx) - 3:len(e.ctx) + 3])})  # zero-shot: nothing precedes, no separator either way
        for name, (new, bos) in variants.items():
            lm.bos_token_id = bos_ids[bos]
            ctx, x = (e.ctx, e.x) if new else (old["ctx"], old["x"])
            y = torch.tensor(e.y)
            for method, (prefix_ids, xs) in {"icl": (ctx, x), "zero-shot": ([], alone)}.items():
                with torch.no_grad():
                    out = lm.target_logits([lm.embed(torch.tensor(prefix_ids, dtype=torch.long))],
                                           [torch.tensor(xs, dtype=torch.long)], [y])
                ce[f"{name}/{method}"].append(F.cross_entropy(out.logits[out.is_y], out.targets[out.is_y]).item())
        print(pos, {k: round(v[-1], 3) for k, v in ce.items() if k.endswith("icl")}, flush=True)
    result = {"llm": llm_id, "episodes": a.episodes, "bos_ids": bos_ids,
              "bos_token": tok.bos_token, "template": template.model_dump(),
              "mean_gold_ce": {k: statistics.fmean(v) for k, v in ce.items()},
              "episodes_with_changed_icl_ids": differ, "per_episode": ce, **stamp()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    for k, v in result["mean_gold_ce"].items():
        print(f"{k:32s} {v:.4f}")


if __name__ == "__main__":
    main()
