"""What the bench scripts that measure on a recipe share: their common arguments, and the recipe's
models built (the scripts run as `python bench/NAME.py`, so this folder is on the import path)."""
import argparse
from pathlib import Path

from mendctl.core.config import load_recipe
from mendctl.data.prepare import prepare
from mendctl.core.registry import get_backend


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    """RECIPE, --set key=value (repeatable) and --out (default `out`); a script adds its own after."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], help="key=value recipe override (repeatable)")
    ap.add_argument("--out", type=Path, default=Path(out))
    return ap


def build(args: argparse.Namespace, *stage: str):
    """The recipe with its overrides, its data prepared for `stage` (as `prepare` takes it), its models and template."""
    recipe = load_recipe(args.recipe, args.set)
    prepare(recipe, *stage)
    backend = get_backend(recipe.backend)
    return recipe, backend.build(recipe), backend.template(recipe)


class MethodTable:
    """What a probe's methods predict on each validation set, as macro-F1 and agreement with ICL (a run
    named "icl" among each set's), summed up as means over sets, then tasks, in a JSON file and a table."""

    def __init__(self):
        self.per_task: dict[str, dict[str, list[float]]] = {}
        self.agree: dict[str, list[float]] = {}

    def add(self, qs, runs: dict[str, list[int]]) -> None:
        from mendctl.evaluation import metrics
        from mendctl.evaluation.scoring import predicted

        f1s = self.per_task.setdefault(qs.demos.task, {})
        for name, preds in runs.items():
            f1s.setdefault(name, []).append(metrics.macro_f1(predicted(preds, qs), qs.golds))
            self.agree.setdefault(name, []).append(metrics.agreement(runs["icl"], preds))
        print(qs.demos.task, qs.demos.seed, {n: round(100 * v[-1], 1) for n, v in f1s.items()}, flush=True)

    def f1(self) -> dict[str, float]:
        """Each method's macro-F1: the mean over a task's sets, then over the tasks."""
        import statistics

        mean, per_task = statistics.fmean, self.per_task
        return {n: mean(mean(per_task[t][n]) for t in per_task) for n in next(iter(per_task.values()))}

    def write(self, path: Path, **about) -> None:
        """The summary so far with `about` (the run's arguments) and provenance in `path`."""
        import json
        import statistics

        from mendctl.core.provenance import stamp

        mean = statistics.fmean
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**about, "macro_f1": self.f1(),
                                    "agreement_with_icl": {n: mean(v) for n, v in self.agree.items()},
                                    "per_task": self.per_task, **stamp()}, indent=2) + "\n")

    def print(self) -> None:
        import statistics

        print("| method | macro-F1 | agreement with ICL |")
        print("|---|---|---|")
        for n, f1 in self.f1().items():
            print(f"| {n} | {100 * f1:.1f} | {statistics.fmean(self.agree[n]):.2f} |")


def baseline_runs(recipe, models, template, qs) -> dict[str, list[int]]:
    """Zero-shot's, ICL's and icl-truncated's (the context's last num_vectors tokens) predictions on `qs`."""
    import torch

    from mendctl.evaluation.scoring import score
    from mendctl.models.render import context_ids

    llm = models.llm
    ids = context_ids(template, qs.demos.context, models.llm_tokenizer)
    runs = {}
    with torch.no_grad():
        for method, prefix in (("zero-shot", []), ("icl", ids), ("icl-truncated", ids[-recipe.num_vectors:])):
            embeds = llm.embed(torch.tensor(prefix, dtype=torch.long, device=llm.device))
            runs[method] = score(llm, embeds, qs, models.gated_mlp).predictions
    return runs
