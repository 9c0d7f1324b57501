"""Stage-2 ablations on the validation tasks: one recipe key changed at a time, learning curves compared.

    .venv/bin/python bench/ablate.py RECIPE --stop-at 100 [--only NAME ...] [--base METRICS] [--plot PNG]
                                     [--tag TAG] [--reuse] [key=value ...]

Each ablation is `mendctl finetune RECIPE key=value ... <its keys>` into runs/ablations/NAME,
with the recipe's own schedule (its `finetune.steps`: the learning rate at step N is the long run's),
stopped once its validation point at `--stop-at` is logged. The base is the recipe unchanged: the
long run's own curve (`--base` its metrics.jsonl) or, without `--base`, a run like the others.
Writes bench/results/ablations.json (the curves and the keys of each run) and prints a markdown table.
`--tag TAG` keeps a second series apart (another validation set, say): runs/ablations-TAG/NAME and
bench/results/ablations-TAG.json. `--reuse` reads a run already logged to `--stop-at` instead of
training it again, so that several invocations can run in parallel (each with its own tag) and one
table gather them once their folders are moved under one tag.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mendctl.core.config import load_recipe
from mendctl.core.provenance import stamp

# name -> the recipe keys that differ from the base (each a documented recipe key)
ABLATIONS = {
    "plain": ["distiller.anchor=none", "distiller.scale_to_embeddings=true"],
    "no-remap": ["finetune.remap_labels=0"],
    "partition-tasks": ["finetune.train_tasks=partition"],
    "kl-only": ["finetune.ce_weight=0"],
    "proportional": ["finetune.task_sampling=proportional"],
    "k32": ["num_vectors=32"],
    "depth3": ["distiller.init_from_llm_layers=3"],
    # Stage 2 from a stage-1 distiller, which `mendctl pretrain` must have written there first
    # (docs/benchmarks.md has the command): this script runs stage 2 only.
    "stage1": ["finetune.init_from=runs/ablations/stage1/pretrain"],
    # The same with a six times longer stage 1 (600 steps: docs/benchmarks.md has the command).
    "stage1-long": ["finetune.init_from=runs/smollm2-s1long/pretrain"],
    "label-set": ["distiller.anchor=label_set"],
    "labels": ["distiller.anchor=labels"],  # back to the anchors of the recipes before the sixth session
    "label-set-filled": ["distiller.anchor=label_set_filled"],
    "remap-all": ["finetune.remap_labels=1"],
    "lr-half": ["finetune.lr=1e-4"],
    # every run's validation KL was lowest at step 25 on the sixth session's validation tasks, then rose
    "lr-quarter": ["finetune.lr=5e-5"],
    # every classification task but the test tasks' families, each family drawn alike (fourth session)
    "all-families": ["finetune.train_tasks=all", "finetune.task_sampling=family"],
    # KL only at five times the learning rate: fitted vectors agree with ICL far more without the CE
    "kl-only-lr1e-3": ["finetune.ce_weight=0", "finetune.lr=1e-3"],
    # between the two: a small CE weight
    "ce0.3": ["finetune.ce_weight=0.3"],
    # twice the distiller's depth; a 6-layer stage-1 distiller does not fit it, so against a base without one
    "depth12": ["distiller.init_from_llm_layers=12", "finetune.init_from=null"],
    # Eight queries per set of demonstrations: eight times the queries per step for the distiller's same two sets.
    "q8": ["finetune.queries_per_episode=8", "finetune.batch_size=16"],
    "q8-kl-only": ["finetune.queries_per_episode=8", "finetune.batch_size=16", "finetune.ce_weight=0"],
    # The KL where the answer is read: the output's tokens, not the ~26 input tokens that outweigh them (fifth session)
    "kl-output": ["finetune.kl_on=output"],
    "kl-output-only": ["finetune.kl_on=output", "finetune.ce_weight=0"],
    "q8-kl-output-only": ["finetune.queries_per_episode=8", "finetune.batch_size=16", "finetune.kl_on=output",
                          "finetune.ce_weight=0"],
    "all-tasks": ["finetune.train_tasks=all"],
    "no-stage1": ["finetune.init_from=null"],
    # Room for a long label space (sixth session: seven labels of three to six tokens do not fit 16 anchors);
    # a 16-vector stage-1 distiller does not fit 24, so these against no stage 1
    "label-set-no-stage1": ["distiller.anchor=label_set", "finetune.init_from=null"],
    "k24-label-set-no-stage1": ["num_vectors=24", "distiller.anchor=label_set", "finetune.init_from=null"],
    "ema": ["finetune.ema=0.95"],
    # the placeholders read their anchors: a slot's correction can depend on the token it corrects (seventh session)
    "read-anchors": ["distiller.read_anchors=true"],
    # truncated ICL as the start: untrained, the closest of the anchor modes to ICL on the several-label validation tasks
    "last": ["distiller.anchor=last"],
    "last-lr-quarter": ["distiller.anchor=last", "finetune.lr=5e-5"],
    # four times the episodes a step: is the validation curve's wandering the batch's noise?
    "batch8": ["finetune.batch_size=8"],
    "last-batch8": ["distiller.anchor=last", "finetune.batch_size=8"],
    # the sixth session's recipe against the seventh's (anchor last, lr 5e-5)
    "label-set-lr2e-4": ["distiller.anchor=label_set", "finetune.lr=2e-4"],
    # each vector kept near its anchor token: trained unbounded, corrections reach 0.7-0.8 of the anchor's norm
    "max-correction-0.3": ["distiller.max_correction=0.3"],
    # with the drift bounded, do larger steps learn more?
    "max-correction-0.3-lr2e-4": ["distiller.max_correction=0.3", "finetune.lr=2e-4"],
    # the KL on what eval decides by: the distribution over the example's options (ninth session)
    "kl-options": ["finetune.kl_on=options"],
    "kl-options-only": ["finetune.kl_on=options", "finetune.ce_weight=0"],
}


def _curve(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k == "step" or k.startswith("val_") or k in ("ce", "teacher_ce", "kl")}
            for r in lines if "val_kl" in r]


def _run(recipe_path: str, keys: list[str], out: Path, stop_at: int, reuse: bool = False) -> list[dict]:
    """Trains until the validation point at `stop_at` is logged, then stops the run (its rest is not needed).

    With `reuse`, a run whose metrics already reach `stop_at` is read instead of trained again."""
    metrics = out / "finetune" / "metrics.jsonl"
    if reuse and any(r["step"] >= stop_at for r in _curve(metrics)):
        print(f"{out}: already at step {stop_at}, read", flush=True)
        return [r for r in _curve(metrics) if r["step"] <= stop_at]
    cmd = [str(Path(sys.executable).parent / "mendctl"), "finetune", recipe_path, *keys, f"output_dir={out}", "--restart"]
    print(" ".join(cmd), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "ablate.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None and not any(r["step"] >= stop_at for r in _curve(metrics)):
            time.sleep(5)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        elif proc.returncode:
            raise SystemExit(f"{cmd} failed ({proc.returncode}): see {out / 'ablate.log'}")
    return [r for r in _curve(metrics) if r["step"] <= stop_at]


def table(results: dict) -> str:
    rows = ["| run | keys | " + " | ".join(f"step {s}: F1 / agree / KL" for s in results["steps"]) + " |",
            "|---|---|" + "---|" * len(results["steps"])]
    for name, run in results["runs"].items():
        by_step = {r["step"]: r for r in run["curve"]}
        cells = [f"{100 * by_step[s]['val_mend_f1']:.1f} / {by_step[s]['val_agreement']:.2f} / {by_step[s]['val_kl']:.3f}"
                 if s in by_step else "-" for s in results["steps"]]
        rows.append(f"| {name} | {' '.join(run['keys']) or '(the recipe)'} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: dict, png: Path) -> None:
    """Validation KL and agreement per step, one line per run: the ablation table's curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, run in results["runs"].items():
        steps = [r["step"] for r in run["curve"]]
        for ax, key in zip(axes, ("val_kl", "val_agreement")):
            ax.plot(steps, [r[key] for r in run["curve"]], marker="o", label=name, linewidth=2.5 if name == "base" else 1)
    bar = next((r for run in results["runs"].values() for r in run["curve"] if "val_zero_shot_kl" in r), None)
    for ax, key, title in zip(axes, ("kl", "agreement"), ("KL(icl || mend)", "agreement with icl")):
        if bar:
            ax.axhline(bar[f"val_zero_shot_{key}"], color="black", linestyle=":", label="zero-shot")
        ax.set(xlabel="step", title=f"validation {title}")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="key=value for every run (e.g. the data folder)")
    ap.add_argument("--stop-at", type=int, required=True, help="last step compared (a multiple of eval_every)")
    ap.add_argument("--only", nargs="*", choices=sorted(ABLATIONS),
                    help="run only these; with no names, only refresh the base and print the table")
    ap.add_argument("--base", type=Path, help="the unchanged recipe's metrics.jsonl (the long run) instead of a run")
    ap.add_argument("--plot", type=Path, help="also draw the curves into this PNG")
    ap.add_argument("--tag", help="a separate series: runs/ablations-TAG/ and bench/results/ablations-TAG.json")
    ap.add_argument("--reuse", action="store_true",
                    help="read, not rerun, a run whose metrics already reach --stop-at (an interrupted invocation, "
                         "or runs made in parallel by other invocations and moved into this series' folder)")
    args = ap.parse_args()
    suffix = f"-{args.tag}" if args.tag else ""
    results_file, runs_dir = Path(f"bench/results/ablations{suffix}.json"), Path(f"runs/ablations{suffix}")
    recipe = load_recipe(args.recipe, args.overrides)
    if not recipe.finetune.eval_every or args.stop_at % recipe.finetune.eval_every:
        raise SystemExit("--stop-at must be a multiple of finetune.eval_every")
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"runs": {}}
    results.update(recipe=args.recipe, overrides=args.overrides, stop_at=args.stop_at,
                   steps=list(range(0, args.stop_at + 1, recipe.finetune.eval_every)),
                   validation_tasks=recipe.tasks.validation, queries_per_task=recipe.finetune.eval_queries, **stamp())
    runs = results["runs"]
    for name in ["base", *(args.only if args.only is not None else ABLATIONS)]:
        if name == "base":
            curve = (_curve(args.base) if args.base else
                     _run(args.recipe, args.overrides, runs_dir / "base", args.stop_at, args.reuse))
            curve = [r for r in curve if r["step"] <= args.stop_at]
        else:
            curve = _run(args.recipe, [*args.overrides, *ABLATIONS[name]], runs_dir / name, args.stop_at, args.reuse)
        runs[name] = {"keys": ABLATIONS.get(name, []), "curve": curve}
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
