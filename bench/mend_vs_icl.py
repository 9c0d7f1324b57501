"""MEND against vanilla ICL in one run: quality, FLOPs, wall-clock and memory as ratios.

    MENDCTL_CACHE=... .venv/bin/python bench/mend_vs_icl.py recipes/llama/smollm2-demo.yaml --limit 15

Needs the recipe's trained distiller or vectors (run `make demo`, or the recipe's pretrain, finetune
and distill first). Writes bench/results/mend_vs_icl.json; the full results stay in output_dir/eval.
"""
import argparse
import json
from pathlib import Path

from mendctl.core.config import load_recipe
from mendctl.commands.eval import run_eval
from mendctl.data.prepare import prepare


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default="bench/results/mend_vs_icl.json")
    a = ap.parse_args()
    recipe = load_recipe(a.recipe, ["eval.methods=[zero-shot,icl,icl-truncated,mend]"])
    prepare(recipe, "eval")
    results = run_eval(recipe, limit=a.limit)
    agg = results["aggregate"]
    row = next(iter(results["vectors"]))  # the vectors row: mend, mend+fit@N or fitted@N, as they were made
    ratio = {key: agg[row][key] / agg["icl"][key]
             for key in ("score", "flops_per_query", "latency_ms_per_query", "memory_bytes")}
    summary = {"recipe": a.recipe, "limit": a.limit, "device": results["device"], "memory_kind": results["memory_kind"],
               "row": row, "mend_over_icl": ratio, "aggregate": agg, "mend_vs_icl": results["vs_icl"][row],
               "provenance": results["provenance"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"mend_over_icl": ratio}, indent=2))


if __name__ == "__main__":
    main()
